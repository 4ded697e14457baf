"""How long one reaper round blocks Redis, with 100,000 messages queued (issue 11, item 5).

A real redis-server (the embedded one); the figure is Redis's own execution time of each
script (SLOWLOG, microseconds), i.e. how long every other client waits. Three rounds each:
- an idle round (no dead owner): what every worker runs every second;
- a full round for a dead owner holding `batch` (100) messages: the most one round does;
- for comparison, one `LPOS` of a message that is not in the queue: what the old in-flight
  sweeper ran per tracked message (it checked whether the message was still queued).

Run: .venv/bin/python bench/bench_sweep.py [--queued 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import redis.asyncio as aioredis

from worker import keys
from worker.inflight import DELIVER_LUA, Reaper, deliver_keys
from worker.ledger import Ledger
from worker.producer import task_message
from worker.redis_server import EmbeddedRedis

Q = "celery"


def message(i: int) -> bytes:
    return task_message("clientsync.sync_client", [{"event_id": f"e{i}", "n": i}], {}, queue=Q, task_id=f"t{i}")


async def slowest_us(r: aioredis.Redis) -> int:
    """The longest command in the slow log since the last reset (microseconds)."""
    entries = await r.slowlog_get(128)
    return max((int(e["duration"]) for e in entries), default=0)


async def measure(r: aioredis.Redis, fn: object, rounds: int = 3) -> list[int]:
    out = []
    for _ in range(rounds):
        await r.slowlog_reset()
        await fn()  # type: ignore[operator]
        out.append(await slowest_us(r))
    return out


async def main(queued: int) -> None:
    with EmbeddedRedis() as server:
        r = aioredis.from_url(server.url)
        await r.config_set("slowlog-log-slower-than", 0)
        await r.config_set("slowlog-max-len", 1024)
        started = time.perf_counter()
        for start in range(0, queued, 5000):
            await r.lpush(Q, *(message(i) for i in range(start, min(queued, start + 5000))))
        print(f"queued {await r.llen(Q):,} messages in {time.perf_counter() - started:.1f}s "
              f"(redis {(await r.info('server'))['redis_version']})")
        reaper = Reaper(r, Ledger(r), queues=[Q], batch=100)

        idle = await measure(r, reaper.sweep)

        async def full_round() -> None:
            owner = f"bench:{time.monotonic_ns()}"
            await r.zadd(keys.OWNERS, {owner: 0})
            for _ in range(reaper.batch):
                item = await r.blmove(Q, keys.inbox(Q, owner), 1, "RIGHT", "LEFT")
                await r.eval(DELIVER_LUA, 8, *deliver_keys(Q, owner, mode="inbox"), owner, Q, "inbox", item)
            await r.zadd(keys.OWNERS, {owner: 0})  # its beat is long gone
            await r.slowlog_reset()
            done = await reaper.sweep()
            assert done.messages == reaper.batch, done

        full = []
        for _ in range(3):
            await full_round()
            full.append(await slowest_us(r))
        assert await r.llen(Q) == queued

        missing = json.dumps({"not": "queued"})
        lpos = await measure(r, lambda: r.lpos(Q, missing))
        await r.aclose()
    print(f"{'round':<46} {'blocks Redis (µs), 3 rounds':>30}")
    print(f"{'idle reaper round':<46} {', '.join(map(str, idle)):>30}")
    print(f"{'dead owner, 100 held messages pushed back':<46} {', '.join(map(str, full)):>30}")
    print(f"{'old sweeper: one LPOS over the queue':<46} {', '.join(map(str, lpos)):>30}")
    print(f"worst reaper round: {max(idle + full) / 1000:.2f} ms (target <= 5 ms); "
          f"median LPOS {statistics.median(lpos) / 1000:.1f} ms per tracked message")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().queued))
