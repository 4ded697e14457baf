"""The shared circuit breaker: its Lua scripts against a real redis-server, with injected clocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from worker import keys
from worker.circuit import PROBE_MARGIN_SECONDS, CircuitBreaker, audit, credentials_fingerprint, operate

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


# --- auth failures, operator controls, probe lease (issue 9 item 3, issue 11 item 6) ---------------
async def test_an_auth_failure_holds_the_provider_until_the_credentials_change(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    state = await cb.record("p", "j1", "auth", now_ms=T0, fingerprint="old")
    assert state.state == "auth_failed" and state.opened
    # the same credentials: every job is held, whatever the time (no cool-down ends it)
    for later in (T0 + 1, T0 + 10_000_000):
        verdict = await cb.allow("p", "j2", now_ms=later, fingerprint="old")
        assert verdict.state == "auth_failed" and verdict.held and not verdict.go
    # new credentials: exactly one job probes them, the others wait for it
    assert (await cb.allow("p", "j3", now_ms=T0 + 2, fingerprint="new")).state == "probe"
    assert (await cb.allow("p", "j4", now_ms=T0 + 3, fingerprint="new")).state == "half_open"
    assert (await cb.record("p", "j3", "success", now_ms=T0 + 4)).state == "closed"
    assert (await cb.allow("p", "j5", now_ms=T0 + 5, fingerprint="old")).state == "closed"
    assert await redis.hget(keys.circuit("p"), "auth_fp") is None


async def test_new_credentials_refused_again_hold_the_provider_again(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    await cb.record("p", "j1", "auth", now_ms=T0, fingerprint="old")
    assert (await cb.allow("p", "j2", now_ms=T0 + 1, fingerprint="new")).state == "probe"
    assert (await cb.record("p", "j2", "auth", now_ms=T0 + 2, fingerprint="new")).state == "auth_failed"
    assert (await cb.allow("p", "j3", now_ms=T0 + 3, fingerprint="new")).state == "auth_failed"
    entries = await audit(redis)
    assert [(e["action"], e["actor"]) for e in entries] == [("auth_failed", "worker")] * 2


async def test_pause_holds_every_job_and_only_resume_or_probe_ends_it(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    done = await operate(redis, "p", "pause", actor="cli", note="maintenance")
    assert (done["before"], done["after"]) == ("closed", "paused")
    assert (await cb.allow("p", "j1")).state == "paused"
    # outcomes of jobs that were already running change nothing
    for outcome in ("success", "failure", "auth"):
        assert (await cb.record("p", "j0", outcome)).state == "paused"  # type: ignore[arg-type]
    assert (await operate(redis, "p", "probe", actor="api"))["after"] == "half_open"
    assert (await cb.allow("p", "j2")).state == "probe"
    assert (await cb.allow("p", "j3")).state == "half_open"
    await operate(redis, "p", "pause", actor="api")
    assert (await operate(redis, "p", "resume", actor="dashboard"))["after"] == "closed"
    assert (await cb.allow("p", "j4")).state == "closed"
    entries = await audit(redis)
    assert [(e["action"], e["actor"], e["before"], e["after"]) for e in entries] == [
        ("resume", "dashboard", "paused", "closed"), ("pause", "api", "half_open", "paused"),
        ("probe", "api", "paused", "half_open"), ("pause", "cli", "closed", "paused")]
    assert entries[-1]["note"] == "maintenance" and isinstance(entries[-1]["at"], float)


async def test_probe_now_lets_the_next_job_probe_an_open_circuit_before_its_cool_down(
        redis: aioredis.Redis) -> None:
    cb = breaker(redis, cooldown=3600, max_cooldown=3600)
    await trip(cb, now=T0)
    assert (await cb.allow("p", "j1", now_ms=T0 + 1)).state == "open"
    await operate(redis, "p", "probe")
    assert (await cb.allow("p", "j1")).state == "probe"


async def test_resume_ends_an_auth_failure_and_forgets_the_refused_credentials(redis: aioredis.Redis) -> None:
    cb = breaker(redis)
    await cb.record("p", "j1", "auth", fingerprint="old")
    await operate(redis, "p", "resume")
    assert (await cb.allow("p", "j2", fingerprint="old")).state == "closed"


async def test_the_probe_lease_is_the_providers_call_timeout_plus_a_margin(redis: aioredis.Redis) -> None:
    cb = breaker(redis, probe_lease=120)
    await trip(cb, now=T0)
    assert (await cb.allow("p", "prober", now_ms=T0 + 10_000, call_timeout=3.0)).state == "probe"
    until = float(await redis.hget(keys.circuit("p"), "probe_until") or 0)
    assert until * 1000 == T0 + 10_000 + (3.0 + PROBE_MARGIN_SECONDS) * 1000
    # a probe holder that vanished is replaced once that lease is over
    later = T0 + 10_000 + int((3.0 + PROBE_MARGIN_SECONDS) * 1000)
    assert (await cb.allow("p", "other", now_ms=later - 1, call_timeout=3.0)).state == "half_open"
    assert (await cb.allow("p", "other", now_ms=later + 1, call_timeout=3.0)).state == "probe"
    # the configured lease stays a cap
    assert cb.lease_for(600.0) == 120 and cb.lease_for(None) == 120


def test_the_credentials_fingerprint_changes_with_a_secret_or_the_url_and_hides_them() -> None:
    from worker.providers.qonto import QontoConfig

    a = credentials_fingerprint(QontoConfig(token="one", url="http://127.0.0.1:1"))
    assert a == credentials_fingerprint(QontoConfig(token="one", url="http://127.0.0.1:1", timeout=3))
    assert a != credentials_fingerprint(QontoConfig(token="two", url="http://127.0.0.1:1"))
    assert a != credentials_fingerprint(QontoConfig(token="one", url="http://127.0.0.1:2"))
    assert "one" not in a and len(a) == 16
