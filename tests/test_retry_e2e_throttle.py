"""End to end: a provider's 429 + Retry-After holds back every job's calls to it until the time.

Real processes (`worker.launcher.Stack`): a fresh embedded redis-server for this module, the
Invoice Ninja sandbox, two Celery workers; changes enqueued with `worker.producer.Producer`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import running_stack
from tests.helpers import enqueue_changes, sandbox_calls, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.launcher import Stack
from worker.redis_server import EmbeddedRedis

IN = "invoice_ninja"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with EmbeddedRedis() as server, running_stack(
        server.url, providers=[IN], workers=2, concurrency=4,
        CLIENTSYNC_RETRY_BASE_SECONDS="0.2", CLIENTSYNC_RETRY_CAP_SECONDS="0.5",
        CLIENTSYNC_PARK_POLL_SECONDS="0.1",
    ) as s:
        yield s


async def test_after_a_429_with_retry_after_no_call_reaches_the_provider_before_the_time(
    stack: Stack, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    base = f"http://127.0.0.1:{stack.sandbox_port}/{IN}"
    await set_faults(http, base, throttle_next=1, retry_after=2)
    first = await enqueue_changes(redis, 1, IN)

    # The first job's call is answered 429 + Retry-After: 2 ...
    deadline = time.monotonic() + 30
    while not (calls := await sandbox_calls(http, base)):
        assert time.monotonic() < deadline, "no call reached the sandbox"
        await asyncio.sleep(0.02)
    throttled = calls[0]
    assert throttled["status"] == 429
    # ... and once the worker has shared that with every worker, more jobs arrive.
    while not float(await redis.hget(keys.rate_bucket(IN), "blocked_until") or 0):
        assert time.monotonic() < deadline, "the 429 was not shared"
        await asyncio.sleep(0.01)
    others = await enqueue_changes(redis, 5, IN)

    records = await wait_jobs(stack.redis_url, first + others, timeout=30)
    assert all(r["state"] == "succeeded" for r in records.values()), records

    calls = await sandbox_calls(http, base)
    later = calls[1:]
    assert later and all(c["status"] < 300 for c in later)
    early = [c for c in later if c["at"] < throttled["at"] + 2.0]
    assert early == [], f"calls before the Retry-After passed: {early} (429 at {throttled['at']})"

    # The throttled job spent one attempt (its real call); the others spent none waiting.
    assert int(records[first[0]]["attempts"]) == 2
    history = json.loads((await redis.lrange(keys.job_attempts(first[0]), 0, 0))[0])
    assert history["error_class"] == "rate_limited" and history["status"] == 429
    assert all(int(records[j]["attempts"]) == 1 for j in others)
    assert len(await sandbox_clients(http, base)) == 6
