"""Retry engine benchmark (not a test): the shared token bucket and the parked-retry mover.

On a fresh embedded redis-server:
1. `--workers` simulated worker processes (one Redis connection each) call through one
   provider's bucket of `--limit` per `--period` s for `--seconds`: the achieved call rate
   (it should sit at the limit, never above) and the acquire round trip (p50/p99).
2. `--parked` retries are parked due now, then movers drain them: entries moved per second.

    .venv/bin/python bench/bench_retry_engine.py --workers 16 --limit 200 --period 1 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import platform
import statistics
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.errors import RateLimitedError
from worker.parking import Parking
from worker.ratelimit import Limit, RateLimiter
from worker.redis_server import EmbeddedRedis


async def bucket(url: str, workers: int, limit: int, period: float, seconds: float) -> None:
    clients = [aioredis.from_url(url) for _ in range(workers)]
    calls: list[float] = []
    trips: list[float] = []
    parked = 0
    stop = time.time() + seconds

    async def worker(client: aioredis.Redis) -> None:
        nonlocal parked
        rl = RateLimiter(client, {"p": Limit(limit, period)}, max_wait=0.5)
        while time.time() < stop:
            t = time.perf_counter()
            try:
                grant = await rl.try_acquire("p")
            finally:
                trips.append(time.perf_counter() - t)
            if not grant.granted:
                parked += 1
                await asyncio.sleep(min(grant.wait, 0.5))
                continue
            await asyncio.sleep(grant.wait)
            calls.append(time.time())

    start = time.time()
    await asyncio.gather(*(worker(c) for c in clients))
    for c in clients:
        await c.aclose()
    calls.sort()
    worst = max(bisect.bisect_left(calls, t + period) - i for i, t in enumerate(calls))
    steady = [c for c in calls if c >= start + period]
    span = max(calls) - (start + period) if steady else 1
    print(f"bucket: {workers} workers, limit {limit}/{period:g}s, {seconds:g}s")
    print(f"  calls {len(calls)}; busiest {period:g}s window {worst} (limit {limit}); steady rate "
          f"{len(steady) / span:.1f}/s (the burst's tenth of the limit is kept back); turned away {parked}")
    q = statistics.quantiles(trips, n=100)
    print(f"  acquire round trip p50 {q[49] * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms ({len(trips)} trips)")


async def mover(url: str, parked: int, movers: int) -> None:
    client = aioredis.from_url(url)
    parking = Parking(client, queue="bench")
    change = {"event_id": "e", "client": {"id": "c", "name": "n"}}
    t = time.perf_counter()
    async with client.pipeline(transaction=False) as pipe:
        for i in range(parked):
            pipe.zadd("cs:delayed", {f'{{"headers": {{"clientsync_job": "p:{i}"}}, "n": {i}}}': 0})
        await pipe.execute()
    await parking.park("p:x", change, "p", 1, 0)  # one real message among them
    filled = time.perf_counter() - t
    movers_ = [Parking(aioredis.from_url(url), queue="bench") for _ in range(movers)]

    async def drain(p: Parking) -> int:
        total = 0
        while n := await p.move_due():
            total += n
        return total

    t = time.perf_counter()
    moved = sum(await asyncio.gather(*(drain(p) for p in movers_)))
    took = time.perf_counter() - t
    assert moved == parked + 1 and await client.llen("bench") == parked + 1
    print(f"mover: {moved} due entries moved by {movers} movers in {took:.2f}s ({moved / took:,.0f}/s); "
          f"fill {filled:.2f}s")
    for p in movers_:
        await p.redis.aclose()
    await client.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--period", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--parked", type=int, default=50_000)
    ap.add_argument("--movers", type=int, default=4)
    args = ap.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}")
    with EmbeddedRedis() as server:
        await bucket(server.url, args.workers, args.limit, args.period, args.seconds)
        await mover(server.url, args.parked, args.movers)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except RateLimitedError as exc:  # pragma: no cover - only if the bench is misconfigured
        raise SystemExit(str(exc)) from exc
