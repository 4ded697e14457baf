"""A worker killed with SIGKILL mid-batch loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis

from tests.conftest import provider_timeouts, running_stack, uid
from tests.helpers import change, sandbox_calls, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.producer import Producer

IN = "invoice_ninja"
N = 200


async def test_sigkill_mid_batch_loses_none_and_duplicates_none(redis_server_url: str) -> None:
    with running_stack(
        redis_server_url, providers=[IN], workers=1, concurrency=8,
        # Short leases and redelivery so the test does not wait an hour for the broker.
        CLIENTSYNC_VISIBILITY_TIMEOUT="4", CLIENTSYNC_UNACKED_RESTORE_INTERVAL="1", CLIENTSYNC_LEASE_SECONDS="3",
        **provider_timeouts([IN]),
        CLIENTSYNC_INFLIGHT_GRACE_SECONDS="3", CLIENTSYNC_INFLIGHT_SWEEP_SECONDS="1",
        CLIENTSYNC_RETRY_BASE_SECONDS="0.2", CLIENTSYNC_RETRY_CAP_SECONDS="1",
    ) as stack:
        base = f"http://127.0.0.1:{stack.sandbox_port}/{IN}"
        batch = uid("batch-")
        # Half the clients get a second change, so updates race with creates too.
        events = [change(uid("e-"), f"{batch}-{i}", name=f"{batch} client {i}") for i in range(N)]
        events += [change(uid("e-"), f"{batch}-{i}", name=f"{batch} client {i}", version=2, phone="+33 1 23")
                   for i in range(0, N, 2)]
        r = redis.asyncio.from_url(stack.redis_url)
        async with aiohttp.ClientSession() as http:
            # Every provider call takes 150 ms, so at the kill several are in flight.
            await set_faults(http, base, latency_ms=150)
            producer = Producer(r, queue="celery", event_ttl=3600)
            for e in events:
                from worker.models import ClientChange

                await producer.enqueue(ClientChange.model_validate(e), received_at=time.time())
            job_ids = [keys.job_id(IN, e["event_id"]) for e in events]
            # Kill once a quarter of the provider calls happened.
            for _ in range(600):
                if len(await sandbox_calls(http, base)) >= len(events) // 4:
                    break
                await asyncio.sleep(0.05)
            stack.kill("worker0")
            done_at_kill = await r.zcard(keys.jobs_in_state("succeeded"))
            assert done_at_kill < len(events), "the worker finished before the kill; slow the sandbox"
            stack.start_worker("worker1", concurrency=8)
            records = await wait_jobs(stack.redis_url, job_ids, timeout=180)
            await set_faults(http, base, latency_ms=0)
            assert {rec["state"] for rec in records.values()} <= {"succeeded", "skipped"}
            clients = [c for c in await sandbox_clients(http, base) if str(c.get("name", "")).startswith(batch)]
            names = sorted(c["name"] for c in clients)
            assert len(names) == N, f"expected {N} clients, got {len(names)}"
            assert len(set(names)) == N, "a client was created twice"
            # Every client ended with its newest change applied.
            phones = {c["name"]: c.get("phone") for c in clients}
            assert all(phones[f"{batch} client {i}"] == "+33 1 23" for i in range(0, N, 2))
            # Proof the kill hit work in progress: some jobs had to be claimed a second time.
            idem = [keys.idempotency(keys.idempotency_key(e["event_id"], IN, "upsert")) for e in events]
            async with r.pipeline(transaction=False) as pipe:
                for k in idem:
                    pipe.hget(k, "attempts")
                attempts = [int(a or 0) for a in await pipe.execute()]
            assert sum(1 for a in attempts if a >= 2) >= 1
        await r.aclose()
