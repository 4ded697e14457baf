"""The shared token bucket: its Lua script against a real redis-server, with injected clocks."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from worker import keys
from worker.errors import RateLimitedError
from worker.ratelimit import BucketEmpty, Limit, RateLimiter

T0 = 1_700_000_000_000  # an injected "now" in unix ms


@pytest.fixture
async def redis(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fresh_redis_url)
    yield client
    await client.aclose()


def limiter(redis: aioredis.Redis, calls: int | None = 5, period: float = 1.0, max_wait: float = 0.0) -> RateLimiter:
    return RateLimiter(redis, {"p": Limit(calls, period)}, max_wait=max_wait)


async def test_a_full_bucket_lets_a_tenth_of_the_limit_go_at_once_then_paces(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=50, period=1.0)  # burst 5, then 45 more per second
    grants = [await rl.try_acquire("p", now_ms=T0) for _ in range(5)]
    assert all(g.granted and g.wait == 0 for g in grants)
    refused = await rl.try_acquire("p", now_ms=T0)
    assert not refused.granted
    assert refused.wait == pytest.approx(1 / 45, abs=0.001)


async def test_tokens_refill_with_time_up_to_the_burst(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=50, period=1.0)
    for _ in range(5):
        assert (await rl.try_acquire("p", now_ms=T0)).granted
    assert (await rl.try_acquire("p", now_ms=T0 + 23)).granted  # 45/s: one token per 22.2 ms
    assert not (await rl.try_acquire("p", now_ms=T0 + 23)).granted
    # an hour idle refills to the burst, not beyond
    later = T0 + 3_600_000
    assert sum([(await rl.try_acquire("p", now_ms=later)).granted for _ in range(8)]) == 5


@pytest.mark.parametrize(("calls", "period"), [(50, 1.0), (500, 60.0), (1000, 10.0), (3, 1.0)])
async def test_no_window_of_one_period_ever_holds_more_than_the_limit(
    redis: aioredis.Redis, calls: int, period: float
) -> None:
    """Greedy callers at every millisecond tick for three periods: count starts per window."""
    rl = RateLimiter(redis, {"p": Limit(calls, period)}, max_wait=0)
    starts: list[int] = []
    step = max(1, int(period * 1000 / (calls * 2)))
    for now in range(T0, T0 + int(3 * period * 1000), step):
        while (await rl.try_acquire("p", now_ms=now)).granted:
            starts.append(now)
    window = int(period * 1000)
    worst = max(bisect.bisect_left(starts, s + window) - i for i, s in enumerate(starts))
    assert worst <= calls
    limit = Limit(calls, period)
    assert len(starts) >= 0.7 * (limit.burst + 3 * limit.refill)  # and the limit is used, not starved


async def test_a_short_wait_reserves_the_slot_and_books_later_calls_behind_it(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=10, period=1.0, max_wait=0.5)  # burst 1, 9 per second
    assert (await rl.try_acquire("p", now_ms=T0)).wait == 0
    waits = [(await rl.try_acquire("p", now_ms=T0)) for _ in range(5)]
    assert [g.granted for g in waits] == [True] * 4 + [False]
    assert [g.wait for g in waits[:4]] == pytest.approx([1 / 9, 2 / 9, 3 / 9, 4 / 9], abs=0.001)
    assert waits[4].wait == pytest.approx(5 / 9, abs=0.001)  # refused, and nothing was taken:
    assert (await rl.try_acquire("p", now_ms=T0, max_wait=2)).wait == pytest.approx(5 / 9, abs=0.001)


async def test_a_refused_call_takes_no_token(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=1, period=10.0)
    assert (await rl.try_acquire("p", now_ms=T0)).granted
    for _ in range(20):
        assert not (await rl.try_acquire("p", now_ms=T0 + 5000)).granted
    assert (await rl.try_acquire("p", now_ms=T0 + 10_000)).granted


async def test_many_workers_racing_share_one_bucket(fresh_redis_url: str) -> None:
    clients = [aioredis.from_url(fresh_redis_url) for _ in range(20)]
    try:
        grants = await asyncio.gather(*(limiter(c, calls=70, period=60).try_acquire("p", now_ms=T0)
                                        for c in clients))
        assert sum(g.granted for g in grants) == 7  # the burst: a tenth of 70
    finally:
        for c in clients:
            await c.aclose()


async def test_providers_have_separate_buckets(redis: aioredis.Redis) -> None:
    rl = RateLimiter(redis, {"a": Limit(1, 60), "b": Limit(1, 60)}, max_wait=0)
    assert (await rl.try_acquire("a", now_ms=T0)).granted
    assert (await rl.try_acquire("b", now_ms=T0)).granted
    assert not (await rl.try_acquire("a", now_ms=T0)).granted


async def test_a_429_block_stops_every_call_until_it_ends(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=100, period=1.0, max_wait=0)
    assert await rl.block("p", 2.0, now_ms=T0) == T0 + 2000
    during = await rl.try_acquire("p", now_ms=T0 + 500)
    # the block's end, plus one token's time: the bucket restarts empty
    assert not during.granted and during.wait == pytest.approx(1.5 + 1 / 90, abs=0.001)
    assert (await rl.blocked_for("p", now_ms=T0 + 500)) == pytest.approx(1.5)
    # the bucket restarts empty at the block's end: the backlog does not burst
    at_end = await rl.try_acquire("p", now_ms=T0 + 2000, max_wait=1)
    assert at_end.granted and 0 < at_end.wait <= 0.012
    assert await rl.blocked_for("p", now_ms=T0 + 2000) == 0


async def test_a_block_applies_to_a_provider_without_a_limit(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=None, max_wait=0)
    assert all([(await rl.try_acquire("p", now_ms=T0)).granted for _ in range(50)])
    await rl.block("p", 3.0, now_ms=T0)
    assert not (await rl.try_acquire("p", now_ms=T0 + 1000)).granted
    assert (await rl.try_acquire("p", now_ms=T0 + 1000, max_wait=2)).wait == pytest.approx(2.0)
    assert (await rl.try_acquire("p", now_ms=T0 + 3000)).granted


async def test_a_shorter_block_never_shortens_a_longer_one(redis: aioredis.Redis) -> None:
    rl = limiter(redis)
    await rl.block("p", 10, now_ms=T0)
    assert await rl.block("p", 1, now_ms=T0 + 1000) == T0 + 10_000
    assert await rl.blocked_for("p", now_ms=T0 + 5000) == pytest.approx(5.0)


async def test_acquire_waits_for_a_near_slot_and_raises_for_a_far_one(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=None, max_wait=1.0)
    await rl.block("p", 0.3)
    start = time.time()
    await rl.acquire("p")
    assert time.time() - start >= 0.29  # not a call before the block ends (ms rounding aside)
    await rl.block("p", 30)
    with pytest.raises(BucketEmpty) as caught:
        await rl.acquire("p")
    assert isinstance(caught.value, RateLimitedError) and caught.value.retryable
    assert 29 < (caught.value.retry_after or 0) <= 30
    assert caught.value.status is None  # no provider call was made


async def test_a_block_set_while_waiting_for_a_slot_is_honoured(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=1, period=0.5, max_wait=2.0)  # burst 1, one more per 0.5 s
    assert (await rl.try_acquire("p")).granted  # the only token
    waiter = asyncio.create_task(rl.acquire("p"))  # books the next slot, ~0.5 s away
    await asyncio.sleep(0.1)
    await rl.block("p", 1.0)  # another job's 429 arrives meanwhile
    blocked_until = time.time() + 1.0
    await waiter
    assert time.time() >= blocked_until - 0.005


async def test_the_bucket_hash_has_the_documented_fields(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=5, period=2.0)
    await rl.try_acquire("p", now_ms=T0)
    await rl.block("p", 1, now_ms=T0)
    raw = await redis.hgetall(keys.rate_bucket("p"))
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    assert set(fields) == {"limit", "period", "burst", "tokens", "tokens_at", "blocked_until", "blocks"}
    assert float(fields["limit"]) == 5 and float(fields["period"]) == 2 and fields["burst"] == "1"
    assert float(fields["blocked_until"]) == pytest.approx((T0 + 1000) / 1000)
    assert fields["blocks"] == "1"


async def test_the_monitor_shows_the_real_bucket_a_tenth_of_the_limit(redis: aioredis.Redis) -> None:
    from worker.monitor import rate_view

    limiter = RateLimiter(redis, {"p": Limit(1000, 10.0)}, max_wait=0)
    assert (await limiter.try_acquire("p")).granted
    raw = await redis.hgetall(keys.rate_bucket("p"))
    data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}
    at = float(data["tokens_at"])
    just_after = rate_view("hash", data, now=at)
    assert just_after["tokens"] == 99 and just_after["capacity"] == 100 and just_after["limit"] == 1000
    # refilled at (limit - burst) / period = 90 per second, and never past the bucket's 100
    assert rate_view("hash", data, now=at + 0.01)["tokens"] == pytest.approx(99.9)
    assert rate_view("hash", data, now=at + 60)["tokens"] == 100


async def test_without_a_limit_calls_honour_the_blocks_this_process_knows_without_a_round_trip(
    redis: aioredis.Redis,
) -> None:
    here = limiter(redis, calls=None, max_wait=0.5)
    there = limiter(redis, calls=None, max_wait=0.5)  # another worker process
    await here.before_call("p")  # no block known: at once
    assert not await redis.exists(keys.rate_bucket("p"))  # and no token taken: nothing to count
    await there.block("p", 30)  # the other worker's job got a 429
    # A job of this process learns it when it starts (its start script reads the block), and
    # from then on no call of any job of this process starts before the block ends.
    here.learn_block("p", await here.blocked_for("p"))
    with pytest.raises(BucketEmpty) as far:
        await here.before_call("p")
    assert far.value.retry_after is not None and 29 < far.value.retry_after <= 30
    # A block this process records itself is known at once; a short one is waited out.
    other = RateLimiter(redis, {"q": Limit(None, 1.0)}, max_wait=5)
    await other.block("q", 0.2)
    until = time.monotonic() + 0.2
    await other.before_call("q")
    assert time.monotonic() >= until - 0.01


async def test_with_a_limit_every_call_still_takes_a_shared_token(redis: aioredis.Redis) -> None:
    rl = limiter(redis, calls=10, period=60.0, max_wait=0)  # a burst of 1, then one per 6.7 s
    await rl.before_call("p")
    with pytest.raises(BucketEmpty):
        await rl.before_call("p")
