"""Redis refusing writes in the middle of a batch loses no job and duplicates none.

With `maxmemory` at one byte every write fails (OOM) for two seconds: ledger transitions,
claims, acks, requeues. Jobs caught by it are requeued (or left unacked and redelivered);
none may vanish, and none may be applied twice.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis

from tests.conftest import provider_timeouts, running_stack, uid
from tests.helpers import change, sandbox_calls, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.models import ClientChange
from worker.producer import Producer

PROVIDERS = ["invoice_ninja", "qonto"]
N = 40


async def test_jobs_caught_by_redis_refusing_writes_finish_once_redis_recovers(redis_server_url: str) -> None:
    with running_stack(
        redis_server_url, providers=PROVIDERS, workers=1, concurrency=8,
        CLIENTSYNC_VISIBILITY_TIMEOUT="3", CLIENTSYNC_UNACKED_RESTORE_INTERVAL="1", CLIENTSYNC_LEASE_SECONDS="3",
        **provider_timeouts(PROVIDERS),
        CLIENTSYNC_INFLIGHT_GRACE_SECONDS="3", CLIENTSYNC_INFLIGHT_SWEEP_SECONDS="1",
        CLIENTSYNC_RETRY_BASE_SECONDS="0.2", CLIENTSYNC_RETRY_CAP_SECONDS="1",
    ) as stack:
        batch = uid("oom-")
        events = [change(uid("e-"), f"{batch}-{i}", name=f"{batch} client {i}",
                         contacts=[{"first_name": "A", "last_name": f"B{i}"}]) for i in range(N)]
        admin = redis.Redis.from_url(stack.redis_url)
        r = redis.asyncio.from_url(stack.redis_url)
        base = {p: f"http://127.0.0.1:{stack.sandbox_port}/{p}" for p in PROVIDERS}
        async with aiohttp.ClientSession() as http:
            for url in base.values():
                await set_faults(http, url, latency_ms=100)
            producer = Producer(r, queue="celery", event_ttl=3600)
            for e in events:
                await producer.enqueue(ClientChange.model_validate(e), received_at=time.time())
            while len(await sandbox_calls(http, base["qonto"])) < 5:
                await asyncio.sleep(0.02)
            # Every write is now refused (OOM) for a while: ledger, locks, acks, requeues. Then the
            # server's own setting is put back (a shared Redis, CLIENTSYNC_REDIS_URL, keeps its own).
            previous = admin.config_get("maxmemory")["maxmemory"]
            admin.config_set("maxmemory", 1)
            try:
                await asyncio.sleep(2)
            finally:
                admin.config_set("maxmemory", previous)
            # Celery's consumer stops when the broker refuses its acks (it hands its unacked
            # messages back as it goes); a supervisor restarts it, as compose's restart policy does.
            await asyncio.sleep(1)
            if stack.procs["worker0"].poll() is not None:
                stack.start_worker("worker1", concurrency=8)
            records = await wait_jobs(stack.redis_url, [keys.job_id(p, e["event_id"]) for e in events
                                                        for p in PROVIDERS], timeout=120)
            assert {rec["state"] for rec in records.values()} == {"succeeded"}
            for provider, url in base.items():
                names = [c["name"] for c in await sandbox_clients(http, url)
                         if str(c.get("name", "")).startswith(batch)]
                assert sorted(names) == sorted(e["client"]["name"] for e in events), provider
        await r.aclose()
