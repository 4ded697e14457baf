"""Lost-message recovery (worker.inflight) against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.helpers import change
from worker import keys
from worker.inflight import Inflight
from worker.models import ClientChange
from worker.producer import Producer

Q = "celery"


@pytest.fixture
async def r(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fresh_redis_url)
    yield client
    await client.aclose()


async def push(r: aioredis.Redis, event_id: str) -> str:
    """Enqueue a change the way the receiver does; returns its Celery task id."""
    result = await Producer(r, queue=Q, event_ttl=60).enqueue(
        ClientChange.model_validate(change(event_id, "c-1")), received_at=time.time())
    assert result.task_id is not None
    return result.task_id


async def test_a_message_still_in_the_queue_is_not_pushed_again(r: aioredis.Redis) -> None:
    await push(r, "e1")
    await asyncio.sleep(0.1)
    assert await Inflight(r, queue=Q, grace_seconds=0.05).sweep() == 0
    assert await r.llen(Q) == 1


async def test_a_message_popped_and_lost_before_kombu_recorded_it_is_pushed_again_once(r: aioredis.Redis) -> None:
    task_id = await push(r, "e1")
    lost = await r.rpop(Q)  # a worker's BRPOP took it, then died before HSET unacked
    await asyncio.sleep(0.1)
    sweeper = Inflight(r, queue=Q, grace_seconds=0.05)
    assert await sweeper.sweep() == 1
    assert await r.lrange(Q, 0, -1) == [lost]
    assert await sweeper.sweep() == 0  # looked at again only after another grace period
    assert json.loads(lost)["headers"]["id"] == task_id


async def test_a_message_held_unacked_by_kombu_is_left_to_kombu(r: aioredis.Redis) -> None:
    await push(r, "e1")
    popped = json.loads(await r.rpop(Q))
    await r.hset(keys.KOMBU_UNACKED, popped["properties"]["delivery_tag"], "[...]")
    await asyncio.sleep(0.1)
    assert await Inflight(r, queue=Q, grace_seconds=0.05).sweep() == 0
    assert await r.llen(Q) == 0


async def test_a_started_task_is_no_longer_tracked(r: aioredis.Redis) -> None:
    task_id = await push(r, "e1")
    await r.rpop(Q)
    sweeper = Inflight(r, queue=Q, grace_seconds=0.05)
    await sweeper.started(task_id)
    await asyncio.sleep(0.1)
    assert await sweeper.sweep() == 0
    assert await r.zcard(keys.INFLIGHT) == 0 and await r.hlen(keys.INFLIGHT_MESSAGES) == 0


async def test_a_young_message_is_not_checked_before_its_grace_period(r: aioredis.Redis) -> None:
    await push(r, "e1")
    await r.rpop(Q)
    assert await Inflight(r, queue=Q, grace_seconds=30).sweep() == 0
