"""Parked retries: the park and move Lua scripts against a real redis-server."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.helpers import change
from worker import keys
from worker.parking import APPLY_TASK, Parking

T0 = 1_700_000_000_000  # an injected "now" in unix ms
Q = "celery"


@pytest.fixture
async def redis(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fresh_redis_url, decode_responses=True)
    yield client
    await client.aclose()


def decode(message: str) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    envelope = json.loads(message)
    args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    return envelope, args, kwargs


async def test_a_parked_job_moves_to_the_queue_at_its_time_not_before(redis: aioredis.Redis) -> None:
    parking = Parking(redis, queue=Q)
    body = change("e1", "c1")
    due = await parking.park("invoice_ninja:e1", body, "invoice_ninja", 3, 7200, now_ms=T0)
    assert due == (T0 + 7_200_000) / 1000  # a 2-hour wait is fine: nothing holds it but Redis
    assert await redis.zscore(keys.DELAYED, await redis.hget(keys.DELAYED_JOBS, "invoice_ninja:e1")) == T0 + 7_200_000
    assert await parking.move_due(now_ms=T0 + 7_199_999) == 0
    assert await redis.llen(Q) == 0
    assert await parking.move_due(now_ms=T0 + 7_200_000) == 1
    assert await redis.zcard(keys.DELAYED) == 0 and await redis.hlen(keys.DELAYED_JOBS) == 0
    envelope, args, kwargs = decode(await redis.rpop(Q))
    assert envelope["headers"]["task"] == APPLY_TASK
    assert envelope["headers"]["clientsync_job"] == "invoice_ninja:e1"
    assert envelope["headers"]["eta"] is None  # a plain message: no ETA for the worker to hold
    assert envelope["properties"]["delivery_info"]["routing_key"] == Q
    assert args == [body, "invoice_ninja"] and kwargs == {"attempt": 3}


async def test_parking_a_job_again_replaces_its_entry(redis: aioredis.Redis) -> None:
    parking = Parking(redis, queue=Q)
    await parking.park("p:e1", change("e1", "c1"), "p", 2, 10, now_ms=T0)
    await parking.park("p:e1", change("e1", "c1"), "p", 2, 60, now_ms=T0)  # e.g. a redelivered run
    assert await redis.zcard(keys.DELAYED) == 1
    assert await parking.move_due(now_ms=T0 + 59_000) == 0
    assert await parking.move_due(now_ms=T0 + 60_000) == 1
    assert await redis.llen(Q) == 1


async def test_due_entries_move_oldest_first_in_batches(redis: aioredis.Redis) -> None:
    parking = Parking(redis, queue=Q, batch=3)
    for i in range(5):
        await parking.park(f"p:e{i}", change(f"e{i}", "c"), "p", 1, 5 - i, now_ms=T0)
    assert await parking.move_due(now_ms=T0 + 10_000) == 3
    assert await parking.move_due(now_ms=T0 + 10_000) == 2
    jobs = [json.loads(m)["headers"]["clientsync_job"] for m in await redis.lrange(Q, 0, -1)]
    assert list(reversed(jobs)) == ["p:e4", "p:e3", "p:e2", "p:e1", "p:e0"]  # consumers pop the right end


async def test_racing_movers_move_every_entry_exactly_once(fresh_redis_url: str) -> None:
    clients = [aioredis.from_url(fresh_redis_url, decode_responses=True) for _ in range(8)]
    try:
        parking = [Parking(c, queue=Q, batch=25) for c in clients]
        for i in range(300):
            await parking[0].park(f"p:e{i}", change(f"e{i}", f"c{i}"), "p", 2, 0, now_ms=T0)

        async def drain(p: Parking) -> int:
            total = 0
            while n := await p.move_due(now_ms=T0 + 1):
                total += n
            return total

        moved = await asyncio.gather(*(drain(p) for p in parking))
        assert sum(moved) == 300
        queued = [json.loads(m)["headers"]["clientsync_job"] for m in await clients[0].lrange(Q, 0, -1)]
        assert sorted(queued) == sorted(f"p:e{i}" for i in range(300))
        assert await clients[0].zcard(keys.DELAYED) == 0
    finally:
        for c in clients:
            await c.aclose()


async def test_a_foreign_entry_is_moved_too_never_stuck(redis: aioredis.Redis) -> None:
    await redis.zadd(keys.DELAYED, {"not json": T0})
    assert await Parking(redis, queue=Q).move_due(now_ms=T0) == 1
    assert await redis.lrange(Q, 0, -1) == ["not json"]


async def test_the_mover_runs_in_the_background_on_redis_time(redis: aioredis.Redis) -> None:
    parking = Parking(redis, queue=Q)
    await parking.park("p:e1", change("e1", "c1"), "p", 2, 0.3)
    mover = asyncio.create_task(parking.run_mover(0.05))
    try:
        await asyncio.sleep(0.15)
        assert await redis.llen(Q) == 0
        for _ in range(50):
            if await redis.llen(Q):
                break
            await asyncio.sleep(0.05)
        assert await redis.llen(Q) == 1
    finally:
        mover.cancel()
