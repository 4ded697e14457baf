"""Every message clientsync pushes is tracked until a worker starts it, and pushed again if lost.

kombu's Redis transport pops a message (BRPOP) and only then records it as unacked; a
worker killed between the two loses the message for good (celery/celery#7950,
celery/kombu#305). So each push of ours (webhook intake, `clientsync send`, parked retries,
replays) also records the message here, in the same Lua script as the LPUSH; the task
removes it when it starts (by then kombu's unacked entry exists, and kombu's visibility
timeout covers the rest). A sweeper in every worker process looks at entries older than a
grace period and pushes again only those that are neither still in the queue nor held by
kombu as unacked: lost ones. A duplicate push is harmless: idempotency keys and the
ledger's finished-job check absorb it.

Messages pushed by other systems' Celery clients are not tracked; kombu alone carries them.
"""

from __future__ import annotations

import asyncio
import logging
import random

import redis.asyncio as aioredis

from worker import keys
from worker.lua import NOW_LUA

log = logging.getLogger("clientsync.inflight")

#: a Lua function `track(message_json, now_ms)`; include it in any script that LPUSHes a
#: Celery message onto the queue, and call it right after the push
TRACK_LUA = f"""
local function track(m, now)
  local ok, msg = pcall(cjson.decode, m)
  if ok and type(msg) == 'table' and type(msg.headers) == 'table' and type(msg.headers.id) == 'string' then
    redis.call('ZADD', '{keys.INFLIGHT}', now, msg.headers.id)
    redis.call('HSET', '{keys.INFLIGHT_MESSAGES}', msg.headers.id, m)
  end
end
"""

# KEYS: inflight zset, inflight messages, queue list, kombu's unacked hash
# ARGV: grace_ms, batch
_SWEEP = NOW_LUA + TRACK_LUA + """
local now = now_ms('')
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
local pushed = 0
for _, id in ipairs(stale) do
  local m = redis.call('HGET', KEYS[2], id)
  if not m then
    redis.call('ZREM', KEYS[1], id)
  else
    local msg = cjson.decode(m)
    local tag = type(msg.properties) == 'table' and msg.properties.delivery_tag or nil
    local held = tag and redis.call('HEXISTS', KEYS[4], tag) == 1
    if not held and not redis.call('LPOS', KEYS[3], m) then
      redis.call('LPUSH', KEYS[3], m)
      pushed = pushed + 1
    end
    -- still queued, held by kombu, or pushed again: look again after another grace period
    redis.call('ZADD', KEYS[1], now, id)
  end
end
return pushed
"""


class Inflight:
    """Marks tracked messages started, and re-pushes the lost ones; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, queue: str, grace_seconds: float, batch: int = 200) -> None:
        self.redis = redis
        self.queue = queue
        self.grace_ms = int(grace_seconds * 1000)
        self.batch = batch
        self._sweep = redis.register_script(_SWEEP)

    async def started(self, task_id: str) -> None:
        """The task began: kombu holds its message as unacked now, so we stop tracking it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.INFLIGHT, task_id)
            pipe.hdel(keys.INFLIGHT_MESSAGES, task_id)
            await pipe.execute()

    async def sweep(self) -> int:
        """Push again, once, every tracked message that was lost; returns how many."""
        pushed = await self._sweep(
            keys=[keys.INFLIGHT, keys.INFLIGHT_MESSAGES, self.queue, keys.KOMBU_UNACKED],
            args=[self.grace_ms, self.batch],
        )
        if pushed:
            log.warning("pushed %d lost message(s) onto %s again", pushed, self.queue)
        return int(pushed)

    async def run_sweeper(self, interval: float, rng: random.Random | None = None) -> None:
        """Sweep forever (a worker process's background task; cancel to stop)."""
        rng = rng or random.Random()
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: the next sweep tries again
                log.warning("in-flight sweep failed", exc_info=True)
            await asyncio.sleep(interval * rng.uniform(0.8, 1.2))
