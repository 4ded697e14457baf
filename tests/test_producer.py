"""The receiver's producer against a real Redis: changes sent at the same moment share one
pipeline, and each caller still gets its own script's answer."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from tests.helpers import change
from worker import keys
from worker.models import ClientChange
from worker.producer import Producer
from worker.redis_server import EmbeddedRedis


@pytest.fixture
async def r(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fresh_redis_url)
    yield client
    await client.aclose()


def _change(event_id: str, client_id: str, **fields: object) -> ClientChange:
    return ClientChange.model_validate(change(event_id, client_id, **fields))


async def _queued_event_ids(r: aioredis.Redis) -> list[str]:
    ids = []
    for raw in await r.lrange("celery", 0, -1):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.append(args[0]["event_id"])
    return ids


async def test_changes_sent_together_are_each_queued_once_with_their_own_task(r: aioredis.Redis) -> None:
    producer = Producer(r, queue="celery", event_ttl=60)
    script = producer._claim_and_push
    calls: list[int] = []

    async def counted(*, keys: list[str], args: list[object], client: aioredis.Redis) -> object:
        calls.append(len(keys) - 1)  # the changes in this call (its first key is the queue)
        return await script(keys=keys, args=args, client=client)

    producer._claim_and_push = counted  # type: ignore[assignment]
    changes = [_change(f"e{i}", f"c-{i}") for i in range(200)]
    results = await asyncio.gather(*(producer.enqueue(c, received_at=time.time()) for c in changes))
    # All 200 were waiting before the first call went out: one script call claimed and pushed them.
    assert calls == [200]
    assert {res.status for res in results} == {"queued"}
    assert len({res.task_id for res in results}) == 200
    assert sorted(await _queued_event_ids(r)) == sorted(c.event_id for c in changes)
    for c, res in zip(changes, results, strict=True):
        held = await r.get(keys.event(c.event_id))
        assert held is not None and held.decode().startswith(f"{res.task_id} ")


async def test_the_same_event_twice_in_one_batch_is_queued_once(r: aioredis.Redis) -> None:
    producer = Producer(r, queue="celery", event_ttl=60)
    same, other = _change("e1", "c-1", name="Acme"), _change("e2", "c-2", name="Acme")
    changed = _change("e2", "c-2", name="Acme Corp")
    sent = (same, same, other, changed)
    results = await asyncio.gather(*(producer.enqueue(c, received_at=time.time()) for c in sent))
    assert [res.status for res in results] == ["queued", "duplicate", "queued", "conflict"]
    assert sorted(await _queued_event_ids(r)) == ["e1", "e2"]


async def test_one_change_failing_in_redis_fails_alone(r: aioredis.Redis) -> None:
    producer = Producer(r, queue="celery", event_ttl=60)
    await r.rpush(keys.event("bad"), "not a claim")  # its script's GET meets a list: WRONGTYPE
    changes = [_change("a", "c-a"), _change("bad", "c-bad"), _change("b", "c-b")]
    results = await asyncio.gather(*(producer.enqueue(c, received_at=time.time()) for c in changes),
                                   return_exceptions=True)
    assert isinstance(results[1], redis.exceptions.ResponseError)
    assert [getattr(res, "status", None) for res in (results[0], results[2])] == ["queued", "queued"]
    assert sorted(await _queued_event_ids(r)) == ["a", "b"]


async def test_changes_are_queued_after_redis_lost_its_scripts() -> None:
    """On a redis-server of its own: SCRIPT FLUSH is server-wide, and on a shared Redis
    (CLIENTSYNC_REDIS_URL) it would drop every other test process's scripts too."""
    with EmbeddedRedis() as server:
        r = aioredis.from_url(server.url)
        try:
            producer = Producer(r, queue="celery", event_ttl=60)
            await producer.warm()
            await r.script_flush()
            changes = [_change(f"e{i}", f"c-{i}") for i in range(20)]
            results = await asyncio.gather(*(producer.enqueue(c, received_at=time.time()) for c in changes))
            assert {res.status for res in results} == {"queued"}
            assert len(await _queued_event_ids(r)) == 20
        finally:
            await r.aclose()


async def test_every_change_of_a_batch_fails_when_redis_is_unreachable() -> None:
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    producer = Producer(dead, queue="celery", event_ttl=60)
    changes = [_change(f"e{i}", f"c-{i}") for i in range(5)]
    results = await asyncio.gather(*(producer.enqueue(c, received_at=time.time()) for c in changes),
                                   return_exceptions=True)
    assert all(isinstance(res, redis.exceptions.ConnectionError) for res in results)
    await dead.aclose()


async def test_what_orjson_cannot_write_is_queued_all_the_same(r: aioredis.Redis) -> None:
    producer = Producer(r, queue="celery", event_ttl=60)
    huge = 2**70  # past 64 bits: orjson refuses it, the standard library writes it
    sent = _change("e1", "c-1", name="Zoë Café", version=huge)
    assert (await producer.enqueue(sent, received_at=time.time())).status == "queued"
    envelope = json.loads((await r.lrange("celery", 0, -1))[0])
    args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert ClientChange.model_validate(args[0]) == sent
    assert envelope["headers"]["task"] == "clientsync.sync_client" and "received_at" in kwargs


async def test_a_push_that_fails_after_its_claim_takes_the_claim_back(r: aioredis.Redis) -> None:
    producer = Producer(r, queue="celery", event_ttl=60)
    await r.set("celery", "not a list")  # every LPUSH fails: WRONGTYPE
    sent = [_change("q1", "c-1"), _change("q2", "c-2")]
    results = await asyncio.gather(*(producer.enqueue(c, received_at=time.time()) for c in sent),
                                   return_exceptions=True)
    assert all(isinstance(res, redis.exceptions.ResponseError) for res in results)
    assert await r.exists(keys.event("q1"), keys.event("q2")) == 0  # nothing claimed: the 503's retry works
    await r.delete("celery")
    assert [(await producer.enqueue(c, received_at=time.time())).status for c in sent] == ["queued", "queued"]
    assert sorted(await _queued_event_ids(r)) == ["q1", "q2"]


async def test_any_error_a_change_meets_is_its_callers_alone_and_the_rest_are_answered(r: aioredis.Redis) -> None:
    producer = Producer(r, queue="celery", event_ttl=60)

    async def run(_client: object, items: list[object]) -> list[object]:
        # redis-py makes some error replies (LOADING, NOAUTH) ConnectionErrors, not ResponseErrors
        return [1, redis.exceptions.ConnectionError("x"), 1][:len(items)]

    producer._run = run  # type: ignore[assignment,method-assign]
    results = await asyncio.wait_for(asyncio.gather(
        *(producer.enqueue(_change(f"e{i}", f"c-{i}"), received_at=time.time()) for i in range(3)),
        return_exceptions=True), timeout=30)  # guards a hang only
    assert [getattr(res, "status", None) for res in results] == ["queued", None, "queued"]
    assert isinstance(results[1], redis.exceptions.ConnectionError)
