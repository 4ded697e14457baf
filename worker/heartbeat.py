"""Worker heartbeats, for `GET /readyz` and the monitor summary: which workers are live, and how
long since each was last heard from.

Each worker process's runtime (`tasks.runtime`) writes `keys.heartbeat(owner)` every
`CLIENTSYNC_HEARTBEAT_SECONDS`: a hash with the time of the beat (`at_ms`, Redis's clock, so
the receiver and the workers need no common clock) and the process's interval (`every`). A
worker is **live** while its last beat is younger than `FRESH_BEATS` of its own intervals
(`fresh_within`): a SIGKILLed worker stops counting after two missed beats, whatever the key's
TTL. The key outlives that (`KEEP_BEATS` intervals) so readiness can still name the worker that
went silent; a clean stop deletes it at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from worker import keys
from worker.lua import NOW_LUA

log = logging.getLogger("clientsync.heartbeat")

#: a worker is live while its last beat is younger than this many of its intervals
FRESH_BEATS = 2
#: a silent worker's heartbeat is kept (and named by readiness) for this many of its intervals
KEEP_BEATS = 30
#: heartbeats listed in an answer (live ones first)
MAX_LISTED = 100


def fresh_within(every: float) -> float:
    """How young (s) a beat of a worker that beats every `every` s must be for it to be live."""
    return FRESH_BEATS * every


# KEYS: the heartbeat; ARGV: interval (s), key TTL (ms). DEL first: an older format is replaced.
_BEAT = NOW_LUA + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'at_ms', now_ms(''), 'every', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Heartbeat:
    """One worker process's heartbeat: `run` beats every `every` seconds, `forget` removes it."""

    def __init__(self, redis: aioredis.Redis, worker: str, every: float) -> None:
        self.redis = redis
        self.worker = worker
        self.every = every
        self._beat = redis.register_script(_BEAT)

    async def beat_once(self) -> None:
        await self._beat(keys=[keys.heartbeat(self.worker)],
                         args=[repr(float(self.every)), int(KEEP_BEATS * self.every * 1000)])

    async def run(self) -> None:
        while True:
            try:
                await self.beat_once()
            except Exception:  # Redis away: readiness will say so; keep beating
                log.warning("heartbeat failed", exc_info=True)
            await asyncio.sleep(self.every)

    async def forget(self) -> None:
        """A clean stop: /readyz and the summary stop counting this worker at once."""
        await self.redis.delete(keys.heartbeat(self.worker))


@dataclass(frozen=True)
class Seen:
    """A worker's last heartbeat as read now."""

    worker: str
    age_seconds: float
    every_seconds: float

    @property
    def live_within_seconds(self) -> float:
        return fresh_within(self.every_seconds)

    @property
    def live(self) -> bool:
        return self.age_seconds < self.live_within_seconds

    def view(self) -> dict[str, Any]:
        return {"worker": self.worker, "live": self.live, "age_seconds": round(self.age_seconds, 1),
                "live_within_seconds": self.live_within_seconds}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read(redis: aioredis.Redis) -> list[Seen]:
    """Every heartbeat in Redis, live ones first, each group youngest first. A key that is not a
    heartbeat of this format (or is gone by the time it is read) is left out."""
    names = [key async for key in redis.scan_iter(match=keys.HEARTBEAT_PATTERN, count=5000)]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in names:
            pipe.hmget(name, ["at_ms", "every"])
        replies = await pipe.execute(raise_on_error=False)
    seconds, micros = replies[0]
    now_ms = seconds * 1000 + micros / 1000
    prefix = keys.heartbeat("")
    seen: list[Seen] = []
    for name, reply in zip(names, replies[1:], strict=True):
        if isinstance(reply, Exception) or reply[0] is None or reply[1] is None:
            continue
        try:
            at_ms, every = float(reply[0]), float(reply[1])
        except ValueError:
            continue
        if every <= 0:
            continue
        seen.append(Seen(_text(name)[len(prefix):], max(0.0, (now_ms - at_ms) / 1000), every))
    return sorted(seen, key=lambda s: (not s.live, s.age_seconds, s.worker))
