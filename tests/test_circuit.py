"""The shared circuit breaker: its Lua scripts against a real redis-server, with injected clocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from worker import keys
from worker.circuit import CircuitBreaker

T0 = 1_700_000_000_000  # an injected "now" in unix ms


@pytest.fixture
async def redis(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fresh_redis_url, decode_responses=True)
    yield client
    await client.aclose()


def breaker(redis: aioredis.Redis, **kw: float) -> CircuitBreaker:
    opts: dict[str, float] = {"threshold": 3, "cooldown": 10, "max_cooldown": 35, "probe_lease": 60, **kw}
    return CircuitBreaker(redis, threshold=int(opts["threshold"]), cooldown=opts["cooldown"],
                          max_cooldown=opts["max_cooldown"], probe_lease=opts["probe_lease"])


async def trip(cb: CircuitBreaker, now: int = T0) -> None:
    for i in range(cb.threshold):
        await cb.record("p", f"job{i}", "failure", now_ms=now)


async def test_a_circuit_never_used_is_closed_and_costs_no_write(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    assert (await cb.allow("p", "t", now_ms=T0)).state == "closed"
    assert (await cb.record("p", "t", "success", now_ms=T0)).state == "closed"
    assert await redis.exists(keys.circuit("p")) == 0


async def test_it_opens_after_n_consecutive_failures(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    for i in range(2):
        state = await cb.record("p", f"j{i}", "failure", now_ms=T0)
        assert state.state == "closed" and not state.opened
    opened = await cb.record("p", "j2", "failure", now_ms=T0 + 5)
    assert opened.state == "open" and opened.opened and opened.wait == 10
    verdict = await cb.allow("p", "other", now_ms=T0 + 4005)
    assert not verdict.go and verdict.state == "open" and verdict.wait == pytest.approx(6.0)


async def test_a_success_resets_the_count_of_consecutive_failures(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    for outcome in ("failure", "failure", "success", "failure", "failure"):
        await cb.record("p", "j", outcome, now_ms=T0)  # type: ignore[arg-type]
    assert (await cb.allow("p", "j", now_ms=T0)).state == "closed"
    assert (await redis.hget(keys.circuit("p"), "failures")) == "2"


async def test_neutral_outcomes_neither_open_nor_close_it(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    for _ in range(10):
        await cb.record("p", "j", "neutral", now_ms=T0)
    assert (await cb.allow("p", "j", now_ms=T0)).state == "closed"
    await trip(cb)
    await cb.record("p", "j", "neutral", now_ms=T0 + 1)
    assert (await cb.allow("p", "j", now_ms=T0 + 2)).state == "open"


async def test_after_the_cooldown_exactly_one_of_many_workers_wins_the_probe(fresh_redis_url: str) -> None:
    clients = [aioredis.from_url(fresh_redis_url) for _ in range(25)]
    try:
        await trip(breaker(clients[0]))
        verdicts = await asyncio.gather(*(breaker(c).allow("p", f"worker{i}", now_ms=T0 + 10_000)
                                          for i, c in enumerate(clients)))
        states = sorted(v.state for v in verdicts)
        assert states.count("probe") == 1
        assert states.count("half_open") == 24
        assert all(v.wait > 0 for v in verdicts if v.state == "half_open")
    finally:
        for c in clients:
            await c.aclose()


async def test_a_successful_probe_closes_it(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    await trip(cb)
    assert (await cb.allow("p", "probe", now_ms=T0 + 10_000)).state == "probe"
    assert (await cb.record("p", "probe", "success", now_ms=T0 + 10_100)).state == "closed"
    assert (await cb.allow("p", "anyone", now_ms=T0 + 10_101)).state == "closed"
    h = await redis.hgetall(keys.circuit("p"))
    assert h["state"] == "closed" and h["failures"] == "0" and "probe" not in h


async def test_a_failed_probe_reopens_it_for_twice_as_long_up_to_the_cap(redis: aioredis.Redis) -> None:
    cb = breaker(redis)  # cool-downs 10, 20, 35 (cap), 35
    await trip(cb)
    now = T0
    for expected in (20, 35, 35):
        now += int(await _seconds_until_probe(redis, now) * 1000)
        assert (await cb.allow("p", "probe", now_ms=now)).state == "probe"
        state = await cb.record("p", "probe", "failure", now_ms=now + 50)
        assert state.state == "open" and state.opened and state.wait == expected
        now += 50


async def _seconds_until_probe(redis: aioredis.Redis, now: int) -> float:
    return float(await redis.hget(keys.circuit("p"), "reopen_at") or 0) - now / 1000


async def test_a_probe_that_reached_nobody_hands_the_probe_on(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    await trip(cb)
    assert (await cb.allow("p", "first", now_ms=T0 + 10_000)).state == "probe"
    assert (await cb.allow("p", "second", now_ms=T0 + 10_001)).state == "half_open"
    await cb.record("p", "first", "neutral", now_ms=T0 + 10_002)  # e.g. the job was rate-limited
    assert (await cb.allow("p", "second", now_ms=T0 + 10_003)).state == "probe"


async def test_a_vanished_probe_holder_loses_the_probe_after_its_lease(redis: aioredis.Redis) -> None:
    cb = breaker(redis, probe_lease=30)
    await trip(cb)
    assert (await cb.allow("p", "crashed", now_ms=T0 + 10_000)).state == "probe"
    waiting = await cb.allow("p", "next", now_ms=T0 + 20_000)
    assert waiting.state == "half_open" and waiting.wait == pytest.approx(20.0)
    assert (await cb.allow("p", "next", now_ms=T0 + 40_001)).state == "probe"


async def test_the_circuit_hash_has_the_documented_fields(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    await trip(cb, now=T0)
    h = await redis.hgetall(keys.circuit("p"))
    assert {"state", "failures", "opened_at", "reopen_at", "cooldown", "opens", "updated_at"} <= set(h)
    assert h["state"] == "open" and h["failures"] == "3"
    assert float(h["opened_at"]) == pytest.approx(T0 / 1000)
    assert float(h["reopen_at"]) == pytest.approx(T0 / 1000 + 10)
    assert float(h["cooldown"]) == 10
