"""Worker heartbeats, for `GET /readyz` and the monitor summary: which workers are live, and how
long since each was last heard from.

Each worker process's runtime (`tasks.runtime`) writes its field of `keys.HEARTBEATS` every
`CLIENTSYNC_HEARTBEAT_SECONDS`: the time of the beat (Redis's clock, so the receiver and the
workers need no common clock) and the process's interval. A worker is **live** while its last
beat is younger than `FRESH_BEATS` of its own intervals (`fresh_within`): a SIGKILLed worker
stops counting after two missed beats. Its entry is kept `KEEP_BEATS` intervals, so readiness
can still name the worker that went silent, then dropped (by the next beat of any worker, and
never listed by a reader); a clean stop removes it at once. One hash, not a key per worker:
readiness reads every heartbeat in one round trip instead of scanning the keyspace.
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


# KEYS: the heartbeats hash; ARGV: worker, interval (s), KEEP_BEATS. Drops the entries of
# workers silent for longer than KEEP_BEATS of their own intervals (and any unreadable one).
_BEAT = NOW_LUA + """
local now = now_ms('')
redis.call('HSET', KEYS[1], ARGV[1], now .. ' ' .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local at, every = string.match(all[i + 1], '^(%S+) (%S+)$')
  at, every = tonumber(at), tonumber(every)
  if not at or not every or now - at > tonumber(ARGV[3]) * every * 1000 then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
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
        await self._beat(keys=[keys.HEARTBEATS], args=[self.worker, repr(float(self.every)), KEEP_BEATS])

    async def run(self) -> None:
        while True:
            try:
                await self.beat_once()
            except Exception:  # Redis away: readiness will say so; keep beating
                log.warning("heartbeat failed", exc_info=True)
            await asyncio.sleep(self.every)

    async def forget(self) -> None:
        """A clean stop: /readyz and the summary stop counting this worker at once."""
        await self.redis.hdel(keys.HEARTBEATS, self.worker)


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
    """Every heartbeat, live ones first, each group youngest first (one round trip). An entry
    that is unreadable, or older than KEEP_BEATS of its worker's intervals, is left out."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.hgetall(keys.HEARTBEATS)
        (seconds, micros), entries = await pipe.execute()
    now_ms = seconds * 1000 + micros / 1000
    seen: list[Seen] = []
    for name, value in entries.items():
        try:
            at_ms, every = (float(part) for part in _text(value).split(" "))
        except ValueError:
            continue
        age = max(0.0, (now_ms - at_ms) / 1000)
        if every > 0 and age <= KEEP_BEATS * every:
            seen.append(Seen(_text(name), age, every))
    return sorted(seen, key=lambda s: (not s.live, s.age_seconds, s.worker))
