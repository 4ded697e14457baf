"""End to end: a provider down for a while opens its circuit; the outage costs no attempts.

Real processes (`worker.launcher.Stack`): a fresh embedded redis-server for this module, the
Invoice Ninja sandbox, two Celery workers; changes enqueued with `worker.producer.Producer`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import running_stack
from tests.helpers import enqueue_changes, sandbox_calls, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.launcher import Stack
from worker.redis_server import EmbeddedRedis

IN = "invoice_ninja"
THRESHOLD = 3


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with EmbeddedRedis() as server, running_stack(
        server.url, providers=[IN], workers=2, concurrency=4,
        CLIENTSYNC_RETRY_BASE_SECONDS="0.2", CLIENTSYNC_RETRY_CAP_SECONDS="0.5",
        CLIENTSYNC_INVOICE_NINJA_MAX_ATTEMPTS="30",
        CLIENTSYNC_CIRCUIT_FAILURE_THRESHOLD=str(THRESHOLD), CLIENTSYNC_CIRCUIT_COOLDOWN_SECONDS="1.5",
        CLIENTSYNC_CIRCUIT_MAX_COOLDOWN_SECONDS="3", CLIENTSYNC_CIRCUIT_RECHECK_SECONDS="0.3",
        CLIENTSYNC_PARK_POLL_SECONDS="0.1",
    ) as s:
        yield s


async def test_an_outage_opens_the_circuit_costs_no_attempts_and_ends_with_every_job_applied_once(
    stack: Stack, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    base = f"http://127.0.0.1:{stack.sandbox_port}/{IN}"
    outage_ends = time.time() + 5.0
    await set_faults(http, base, fail_until=outage_ends)
    job_ids = await enqueue_changes(redis, 6, IN)

    opens: dict[str, float] = {}  # opened_at -> reopen_at, as seen while the circuit was open
    waiting_seen: list[dict[str, Any]] = []  # job records seen parked on the open circuit
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # One snapshot (MULTI): the circuit and every job as they were at one instant.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.circuit(IN))
            for job_id in job_ids:
                pipe.hgetall(keys.job(job_id))
            circuit, *snapshot = await pipe.execute()
        if circuit.get("state") == "open":
            opens[circuit["opened_at"]] = float(circuit["reopen_at"])
            for record in snapshot:
                # A job running while the circuit reads open was let through before it
                # (re)opened: the probe whose failure reopened it, caught between its two
                # writes (the circuit, then its ledger record), or a call already in flight. It
                # runs; it does not wait (the calls-while-open check below covers it).
                if record.get("last_error_class") == "circuit_open" and record.get("state") != "running":
                    waiting_seen.append({**record, "seen_at": time.time()})
        states = [await redis.hget(keys.job(j), "state") for j in job_ids]
        if all(s == "succeeded" for s in states):
            break
        await asyncio.sleep(0.05)

    records = await wait_jobs(stack.redis_url, job_ids, timeout=1)
    assert all(r["state"] == "succeeded" for r in records.values()), records

    # The circuit opened, and jobs waiting on it showed as retrying with a next attempt time.
    assert opens, "the circuit never opened"
    assert waiting_seen, "no job was seen waiting on the open circuit"
    for record in waiting_seen:
        assert record["state"] == "retrying"
        assert float(record["next_attempt_at"]) > record["seen_at"] - 1.0

    # No provider call while the circuit was open (a call already in flight as it opened aside).
    calls = [c for c in await sandbox_calls(http, base)]
    for opened_at, reopen_at in opens.items():
        inside = [c for c in calls if float(opened_at) + 0.2 < c["at"] < reopen_at]
        assert inside == [], f"calls while open ({opened_at} .. {reopen_at}): {inside}"

    # Every failed call is one ledger attempt, and no attempt was spent without a call.
    history = [a for j in job_ids for a in await _attempts(redis, j)]
    failed_calls = [c for c in calls if c["status"] >= 500]
    failed_attempts = [a for a in history if a["outcome"] == "retrying"]
    assert len(failed_calls) == len(failed_attempts)
    assert all(a["error_class"] == "unavailable" for a in failed_attempts)
    # Without the circuit, 5 s of 0.2-0.5 s backoffs would be 10+ attempts per job; with it, each
    # job fails about once before it opens, and then only one probe per open period calls.
    assert len(failed_attempts) <= len(job_ids) + len(opens) + 2
    assert sum(int(r["attempts"]) for r in records.values()) == len(failed_attempts) + len(job_ids)

    # Once the provider is back, every job succeeded, and no client was created twice.
    assert all(c["at"] >= outage_ends for c in calls if c["status"] < 300)
    clients = await sandbox_clients(http, base)
    names = [c["name"] for c in clients]
    assert len(clients) == len(job_ids) and len(set(names)) == len(job_ids)
    assert (await redis.hget(keys.circuit(IN), "state")) == "closed"
    assert await redis.zcard(keys.DELAYED) == 0


async def _attempts(redis: aioredis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(a) for a in await redis.lrange(keys.job_attempts(job_id), 0, -1)]
