"""The operator's view end to end: real Redis, receiver, Celery worker and sandbox processes.

A permanent provider error makes a job dead; a replay through the monitor API applies it
exactly once; readiness follows the worker's heartbeat; /metrics counts what the workers did;
retention keeps the ledger bounded while real workers process jobs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest
import redis

from tests.conftest import running_stack, uid
from tests.helpers import change, post_webhook, sandbox_calls, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.launcher import Stack

PROVIDER = "lsp_expert"
RETENTION = 40


@pytest.fixture(scope="module")
def stack(redis_server_url: str) -> Iterator[Stack]:
    with running_stack(
        redis_server_url, providers=[PROVIDER], workers=1, concurrency=8,
        CLIENTSYNC_RETRY_BASE_SECONDS="0.2", CLIENTSYNC_RETRY_CAP_SECONDS="1",
        CLIENTSYNC_LEDGER_MAX_JOBS=str(RETENTION), CLIENTSYNC_LEDGER_TRIM_EVERY="10",
        CLIENTSYNC_LEDGER_TRIM_INTERVAL_SECONDS="1",
    ) as s:
        yield s


def auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.env['CLIENTSYNC_MONITOR_TOKEN']}"}


def sandbox(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"


async def test_readyz_turns_ready_when_the_worker_heartbeats(stack: Stack, http: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 30
    while True:
        async with http.get(f"{stack.receiver_url}/readyz") as resp:
            body = await resp.json()
            if resp.status == 200:
                break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.3)
    assert body["redis"] == "ok" and body["workers"] and body["missing"] == []


async def test_a_dead_job_replayed_from_the_api_is_applied_exactly_once(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    client_id, event_id = uid("client-"), uid("evt-")
    job_id = keys.job_id(PROVIDER, event_id)
    await set_faults(http, sandbox(stack), fail_until=time.time() + 3600, error_status=422)
    try:
        assert await post_webhook(http, stack.receiver_url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"],
                                  change(event_id, client_id, email="jane.doe@example.com")) == 202
        record = (await wait_jobs(stack.redis_url, [job_id], timeout=30))[job_id]
        assert record["state"] == "dead", record
    finally:
        await set_faults(http, sandbox(stack), fail_until=0, error_status=503)
    async with http.get(f"{stack.receiver_url}/monitor/jobs/{job_id}", headers=auth(stack)) as resp:
        job = await resp.json()
    assert job["replayable"] and job["history"][-1]["status"] == 422
    assert "jane.doe@example.com" not in str(job)

    async with http.post(f"{stack.receiver_url}/monitor/jobs/{job_id}/replay", headers=auth(stack)) as resp:
        assert resp.status == 202, await resp.text()
    record = (await wait_jobs(stack.redis_url, [job_id], timeout=30))[job_id]
    assert record["state"] == "succeeded", record
    mine = [c for c in await sandbox_clients(http, sandbox(stack)) if client_id in str(c)]
    assert len(mine) == 1

    # A succeeded job is not replayable, and nothing reaches the provider again.
    writes_before = [c for c in await sandbox_calls(http, sandbox(stack)) if c["method"] != "GET"]
    async with http.post(f"{stack.receiver_url}/monitor/jobs/{job_id}/replay", headers=auth(stack)) as resp:
        assert resp.status == 409
    await asyncio.sleep(0.5)
    writes_after = [c for c in await sandbox_calls(http, sandbox(stack)) if c["method"] != "GET"]
    assert writes_after == writes_before

    async with http.get(f"{stack.receiver_url}/monitor/jobs/{job_id}", headers=auth(stack)) as resp:
        job = await resp.json()
    assert [h["outcome"] for h in job["history"]] == ["dead", "replayed", "succeeded"]
    async with http.get(f"{stack.receiver_url}/metrics") as resp:
        text = await resp.text()
    lines = set(text.splitlines())
    assert f'clientsync_jobs_replayed_total{{provider="{PROVIDER}"}} 1.0' in lines
    assert f'clientsync_apply_latency_seconds_count{{provider="{PROVIDER}"}} 1.0' in lines
    assert "@" not in text


async def test_retention_bounds_the_ledger_while_real_workers_process_jobs(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    applied_before = int(r.hget(keys.stats(PROVIDER), "applied") or 0)
    n = 150
    secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
    statuses = await asyncio.gather(*(post_webhook(http, stack.receiver_url, secret, change(uid("evt-"), uid("c-")))
                                      for _ in range(n)))
    assert statuses == [202] * n
    deadline = time.monotonic() + 60
    while int(r.hget(keys.stats(PROVIDER), "applied") or 0) < applied_before + n:
        assert time.monotonic() < deadline, r.hgetall(keys.stats(PROVIDER))
        await asyncio.sleep(0.3)
    # the worker trims every 10 new jobs and on a 1 s timer
    deadline = time.monotonic() + 10
    while r.zcard(keys.JOBS_BY_TIME) > RETENTION:
        assert time.monotonic() < deadline, r.zcard(keys.JOBS_BY_TIME)
        await asyncio.sleep(0.2)
    assert r.zcard(keys.JOBS_FINISHED) <= RETENTION
    assert len(r.keys(keys.job("*"))) <= 2 * RETENTION  # a hash and an attempts list per job kept
