"""Parked retries: jobs waiting in Redis for their time, never in a Celery countdown.

Why not `self.retry(countdown=…)`: with the Redis broker, a countdown is an ETA message the
worker holds unacked; one held longer than the visibility timeout is redelivered to another
worker and runs twice, and one held by a worker that crashes waits a whole visibility timeout
(an hour by default) before anyone sees it again. So every retry is parked, whatever its
length: one path, durable in Redis, visible to the monitor, and a crash costs nothing.

- `park` stores the full Celery message of the next `clientsync.apply_change` run in the
  sorted set `keys.DELAYED`, scored by its due time (unix ms, Redis's clock), and remembers
  it per job in `keys.DELAYED_JOBS`, so parking a job again replaces its entry instead of
  adding a second one. The task then returns and its message is acked.
- `move_due`, run by a mover in every worker process (`run_mover`, every ~0.5 s), pops due
  entries and LPUSHes them onto the Celery queue in one Lua script: two movers never both
  move an entry, and an entry is never lost between the pop and the push.

Each message is exactly what `celery.send_task` would write (`worker.producer.task_message`),
with two extra headers: `clientsync_job`, naming the ledger job, and `clientsync_mark`, the
authenticity mark: an HMAC-SHA256 (`mark`) over the job id, the provider, the attempt and the
canonical JSON of the change, under a key kept in Redis (`keys.TASK_KEY`, 32 random bytes made
once by the first process that needs it). The worker's intake gate (`tasks.intake`)
dead-letters any `clientsync.apply_change` whose mark is missing or wrong, whose provider is
unknown or whose job is not in the ledger: a foreign producer cannot forge an internal task.
Give foreign producers a Redis ACL user limited to pushing onto the queue and they cannot read
the key either (see the README, "Poison-proof intake").
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import uuid
from typing import Any

import redis.asyncio as aioredis

from worker import keys
from worker.lua import NOW_LUA
from worker.producer import task_message

log = logging.getLogger("clientsync.parking")

#: the Celery task that applies one change to one provider (args: change, provider; kwargs: attempt)
APPLY_TASK = "clientsync.apply_change"


# KEYS: delayed zset, job index hash; ARGV: job_id, message, delay_ms, now_ms ('' = Redis time) -> due_ms
_PARK = NOW_LUA + """
local due = now_ms(ARGV[4]) + tonumber(ARGV[3])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then redis.call('ZREM', KEYS[1], old) end
redis.call('ZADD', KEYS[1], due, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return due
"""

# KEYS: delayed zset, job index hash, queue list; ARGV: batch, now_ms ('' = Redis time) -> moved
_MOVE = NOW_LUA + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('LPUSH', KEYS[3], m)
  redis.call('ZREM', KEYS[1], m)
  local ok, msg = pcall(cjson.decode, m)
  if ok and type(msg) == 'table' and type(msg.headers) == 'table' then
    local job = msg.headers.clientsync_job
    if type(job) == 'string' and redis.call('HGET', KEYS[2], job) == m then redis.call('HDEL', KEYS[2], job) end
  end
end
return #due
"""


# KEYS: the task key -> the key (made now, at random, if there was none)
TASK_KEY_LUA = """
local k = redis.call('GET', KEYS[1])
if not k then
  k = ARGV[1]
  redis.call('SET', KEYS[1], k)
end
return k
"""


def new_task_key() -> str:
    return secrets.token_hex(32)


def mark(key: bytes, job_id: str, change: Any, provider: Any, attempt: Any) -> str:
    """The authenticity mark of one `clientsync.apply_change` message (hex HMAC-SHA256)."""
    canonical = json.dumps([job_id, provider, attempt, change], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def mark_matches(key: bytes, given: Any, job_id: str, change: Any, provider: Any, attempt: Any) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), mark(key, job_id, change, provider,
                                                                                attempt).encode())


async def task_key(redis: aioredis.Redis) -> bytes:
    """The shared HMAC key of internal task messages (one round trip; created on first use)."""
    value = await redis.eval(TASK_KEY_LUA, 1, keys.TASK_KEY, new_task_key())
    return value.encode() if isinstance(value, str) else bytes(value)


def marked_headers(key: bytes, job_id: str, change: dict[str, Any], provider: str, attempt: int) -> dict[str, str]:
    """The two headers that make a `clientsync.apply_change` message one of clientsync's own
    (the intake gate, `tasks.intake`, dead-letters one without them as forged)."""
    return {"clientsync_job": job_id, "clientsync_mark": mark(key, job_id, change, provider, attempt)}


def apply_message(job_id: str, change: dict[str, Any], provider: str, attempt: int, *, queue: str,
                  key: bytes) -> str:
    """The Celery message that runs `attempt` of one (event, provider) job, marked with `key`."""
    task_id = str(uuid.uuid4())
    message = json.loads(task_message(APPLY_TASK, [change, provider], {"attempt": attempt}, queue=queue,
                                      task_id=task_id))
    message["headers"].update(marked_headers(key, job_id, change, provider, attempt))
    message["headers"]["retries"] = max(0, attempt - 1)  # what Flower shows as retries
    message["headers"]["kwargsrepr"] = json.dumps({"attempt": attempt})
    return json.dumps(message)


class Parking:
    """Park retries in Redis and move them to the queue when due; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, queue: str, batch: int = 200) -> None:
        self.redis = redis
        self.queue = queue
        self.batch = batch
        self._park = redis.register_script(_PARK)
        self._move = redis.register_script(_MOVE)
        self._key: bytes | None = None

    async def park(self, job_id: str, change: dict[str, Any], provider: str, attempt: int, delay: float,
                   *, now_ms: int | None = None) -> float:
        """Park `attempt` of the job to run in `delay` seconds; returns its due time (unix seconds)."""
        if self._key is None:
            self._key = await task_key(self.redis)
        message = apply_message(job_id, change, provider, attempt, queue=self.queue, key=self._key)
        due = await self._park(
            keys=[keys.DELAYED, keys.DELAYED_JOBS],
            args=[job_id, message, max(0, math.ceil(delay * 1000)), "" if now_ms is None else now_ms],
        )
        return int(due) / 1000

    async def move_due(self, *, now_ms: int | None = None) -> int:
        """Move up to one batch of due entries onto the queue; returns how many moved."""
        moved = await self._move(keys=[keys.DELAYED, keys.DELAYED_JOBS, self.queue],
                                 args=[self.batch, "" if now_ms is None else now_ms])
        return int(moved)

    async def run_mover(self, interval: float, rng: random.Random | None = None) -> None:
        """Move due entries forever (a worker process's background task; cancel to stop)."""
        rng = rng or random.Random()
        while True:
            try:
                moved = await self.move_due()
            except Exception:  # Redis away: parked entries wait in Redis; try again next tick
                log.warning("moving parked retries failed", exc_info=True)
                moved = 0
            if moved:
                log.debug("moved %d parked retries to %s", moved, self.queue)
            if moved >= self.batch:
                continue  # a backlog is due: keep going
            # Jitter keeps the movers of many processes from polling in lock step.
            await asyncio.sleep(interval * rng.uniform(0.5, 1.0))
