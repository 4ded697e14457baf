"""End to end: a backoff longer than the broker's visibility timeout runs once, at its time.

Scaled down from "a 2-hour backoff with a 1-hour visibility timeout": here the visibility
timeout is 2 s and the provider asks for 5 s (429 + Retry-After: 5). A Celery countdown would
be an unacked ETA message that any worker's visibility sweep hands out again after 2 s, so
the job would run twice; a parked retry sits in Redis with nothing unacked, and runs once.

Real processes (`worker.launcher.Stack`): a fresh embedded redis-server for this module, the
Invoice Ninja sandbox, one Celery worker; changes enqueued with `worker.producer.Producer`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from kombu import Connection

from tests.conftest import running_stack
from tests.helpers import enqueue_changes, sandbox_calls, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.launcher import Stack
from worker.redis_server import EmbeddedRedis

IN = "invoice_ninja"
VISIBILITY = 2


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with EmbeddedRedis() as server, running_stack(
        server.url, providers=[IN], workers=1, concurrency=4,
        CLIENTSYNC_VISIBILITY_TIMEOUT=str(VISIBILITY), CLIENTSYNC_PARK_POLL_SECONDS="0.2",
        CLIENTSYNC_INVOICE_NINJA_MAX_ATTEMPTS="3",
    ) as s:
        yield s


def visibility_sweep(redis_url: str) -> None:
    """What every Celery worker does periodically: hand out again unacked messages older than
    the visibility timeout (kombu's Redis transport `restore_visible`)."""
    with Connection(redis_url, transport_options={"visibility_timeout": VISIBILITY}) as conn:
        conn.default_channel.qos.restore_visible(num=1000, interval=1)


async def test_a_backoff_longer_than_the_visibility_timeout_runs_once_at_its_time(
    stack: Stack, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    base = f"http://127.0.0.1:{stack.sandbox_port}/{IN}"
    await set_faults(http, base, throttle_next=1, retry_after=5)
    job_id = (await enqueue_changes(redis, 1, IN))[0]
    await wait_jobs(stack.redis_url, [job_id], states={"retrying"}, timeout=30)
    record = await redis.hgetall(keys.job(job_id))
    throttled = (await sandbox_calls(http, base))[0]
    assert throttled["status"] == 429
    due = float(record["next_attempt_at"])
    assert due >= throttled["at"] + 5

    # Parked in Redis; the message that failed is acked: nothing is held unacked or queued.
    await asyncio.sleep(0.3)
    assert await redis.zcard(keys.DELAYED) == 1 and await redis.hexists(keys.DELAYED_JOBS, job_id)
    assert await redis.llen("celery") == 0
    assert await redis.hlen("unacked") == 0

    # Past the visibility timeout, a sweep finds nothing to hand out again.
    await asyncio.sleep(VISIBILITY + 0.5)
    await asyncio.to_thread(visibility_sweep, stack.redis_url)
    assert await redis.llen("celery") == 0

    records = await wait_jobs(stack.redis_url, [job_id], timeout=30)
    await asyncio.sleep(1.0)  # room for a duplicate run to show itself
    calls = await sandbox_calls(http, base)
    # The throttled call (the lookup by the stamp before a first create, at Invoice Ninja), then one create.
    posts = [c["status"] for c in calls if c["method"] == "POST" or c["status"] == 429]
    assert len(posts) == 2 and posts[0] == 429 and 200 <= posts[1] < 300
    retry_calls = calls[1:]
    assert all(c["at"] >= throttled["at"] + 5 for c in retry_calls), "the retry ran before its time"
    assert records[job_id]["state"] == "succeeded"
    assert int(records[job_id]["attempts"]) == 2  # one run per attempt: no redelivered duplicate
    history = [json.loads(a) for a in await redis.lrange(keys.job_attempts(job_id), 0, -1)]
    assert [a["outcome"] for a in history] == ["retrying", "succeeded"]
    assert len(await sandbox_clients(http, base)) == 1
    assert await redis.zcard(keys.DELAYED) == 0 and await redis.hlen(keys.DELAYED_JOBS) == 0


async def test_the_providers_own_max_attempts_ends_a_failing_job_dead(
    stack: Stack, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    base = f"http://127.0.0.1:{stack.sandbox_port}/{IN}"
    await http.post(f"{base}/_sandbox/reset")
    await set_faults(http, base, fail_next=3)  # CLIENTSYNC_INVOICE_NINJA_MAX_ATTEMPTS=3
    job_id = (await enqueue_changes(redis, 1, IN))[0]
    records = await wait_jobs(stack.redis_url, [job_id], timeout=30)
    assert records[job_id]["state"] == "dead" and records[job_id]["attempts"] == "3"
    assert len(await sandbox_calls(http, base)) == 3
    assert await redis.zcard(keys.DELAYED) == 0
