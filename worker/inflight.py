"""Every copy of a message has an owner until its job finishes; a dead owner's work comes back in seconds.

kombu's Redis transport pops a message (BRPOP) and only then records it as unacked; a worker
killed between the two loses it (celery/celery#7950, celery/kombu#305), and a worker killed
while it holds a message leaves it unacked until the visibility timeout (an hour by default).
So clientsync's workers consume through `tasks.transport`, which tracks each copy at the
moment of delivery, whoever pushed it (the receiver, `clientsync send`, parked retries,
replays, kombu's own restores, a foreign producer's LPUSH):

1. `BLMOVE queue inbox`: the message moves atomically from the queue to the consuming
   process's *inbox* (`keys.inbox`), so it is never only in a process's memory;
2. `DELIVER_LUA` moves it from the inbox into kombu's unacked hash and index (exactly what
   kombu's own `QoS.append` writes), records its holder (`keys.HOLDERS`, `keys.held`) and
   registers the process as an owner (`keys.OWNERS`), in one script;
3. the ack (after the task body ran: `acks_late`) removes all of it.

Each process (Celery consumer and every pool process's runtime) beats in `keys.OWNERS` from
its own thread (`OwnerBeat`). A `Reaper` in every worker runtime looks for one owner whose beat
is older than `keys.OWNER_TTL_SECONDS` and gives its work back, a bounded batch per round trip:
its inbox and held messages go back onto the queue each came from (never another queue),
and its ledger jobs still shown `running` are re-enqueued from their stored change
(`Ledger.requeue_orphans`). Every operation is O(1) per message: nothing scans a queue.

A copy pushed back while the dead owner's effect already happened is harmless: idempotency
keys and the ledger's finished-job check absorb it. A live owner wrongly taken for dead
(a beat starved for a whole TTL) costs a duplicate run, never a loss. After a gap in
sweeping (Redis down, or restarted from its AOF) live owners get one more TTL to beat
before anyone is reaped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from worker import keys
from worker.ledger import Ledger
from worker.lua import NOW_LUA
from worker.parking import apply_message, task_key

log = logging.getLogger("clientsync.inflight")

#: kombu's priority sub-queues (`<queue>\x06\x16<n>`): foreign producers that set a priority
#: push there; the reaper moves them onto the queue, which is all clientsync consumes
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)

_owner_lock = threading.Lock()
_owner: tuple[int, str] | None = None


def process_owner() -> str:
    """This process's owner id: host, pid and a random part (a restarted worker reusing a pid is
    a new owner, so the dead one's work is still reaped)."""
    global _owner
    with _owner_lock:
        if _owner is None or _owner[0] != os.getpid():
            _owner = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}")
        return _owner[1]


# KEYS: source (inbox for 'inbox', the queue for 'pop'), unacked, unacked index, holders, held set,
#       owners, owner's queues, queue
# ARGV: owner, queue, mode ('inbox' | 'pop'), item (mode 'inbox': what BLMOVE returned)
# -> {item, tracked 1/0} or false when there is nothing to deliver
DELIVER_LUA = NOW_LUA + """
local item
if ARGV[3] == 'inbox' then
  item = ARGV[4]
  -- Gone from the inbox: a reaper took this owner for dead and pushed it back; that copy runs.
  if redis.call('LREM', KEYS[1], 1, item) == 0 then item = nil end
  -- Leftovers (a reply lost to a broken connection) go back to the front of the queue.
  for _ = 1, 100 do
    if not redis.call('LMOVE', KEYS[1], KEYS[8], 'RIGHT', 'RIGHT') then break end
  end
else
  item = redis.call('RPOP', KEYS[1])
end
if not item then return false end
local ok, msg = pcall(cjson.decode, item)
local props = ok and type(msg) == 'table' and msg.properties
local tag = type(props) == 'table' and props.delivery_tag
if type(tag) == 'number' then tag = tostring(tag) end
if type(tag) ~= 'string' then return {item, 0} end
local info = type(props.delivery_info) == 'table' and props.delivery_info or {}
local ex = type(info.exchange) == 'string' and info.exchange or ''
local rk = type(info.routing_key) == 'string' and info.routing_key or ARGV[2]
local now = now_ms('')
redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
redis.call('ZADD', KEYS[3], now / 1000, tag)
redis.call('HSET', KEYS[4], tag, ARGV[1])
redis.call('SADD', KEYS[5], tag)
redis.call('ZADD', KEYS[6], 'NX', now, ARGV[1])
redis.call('SADD', KEYS[7], ARGV[2])
return {item, 1}
"""

# KEYS: inbox, queue -> how many leftovers went back to the front of the queue
FLUSH_INBOX_LUA = """
local n = 0
for _ = 1, 1000 do
  if not redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'RIGHT') then break end
  n = n + 1
end
return n
"""

# KEYS: owners; ARGV: owner
_BEAT = NOW_LUA + """
redis.call('ZADD', KEYS[1], now_ms(''), ARGV[1])
return 1
"""


def _lua_str(value: str) -> str:
    """A Lua string literal (decimal escapes for control characters, which JSON writes as \\uXXXX)."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\{ord(c)}" for c in value) + '"'


# KEYS: owners, reaper last, reaper grace, unacked, unacked index, holders
# ARGV: ttl_ms, batch
# -> {dead owner or '', messages pushed back, running job ids of that owner...}
_REAP = NOW_LUA + f"""
local INBOX, HELD = {_lua_str(keys.inbox("", "")[:-1])}, {_lua_str(keys.held("", "")[:-1])}
local OWNER_QUEUES, RUNNING = {_lua_str(keys.owner_queues(""))}, {_lua_str(keys.running_jobs(""))}
local now, ttl, batch = now_ms(''), tonumber(ARGV[1]), tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '')
redis.call('SET', KEYS[2], now)
if last and now - last > ttl / 2 then redis.call('SET', KEYS[3], now + ttl) end
if now < tonumber(redis.call('GET', KEYS[3]) or '0') then return {{'', 0}} end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl, 'LIMIT', 0, 1)[1]
if not dead then return {{'', 0}} end
local pushed, budget = 0, batch
local oq = OWNER_QUEUES .. dead
for _, q in ipairs(redis.call('SMEMBERS', oq)) do
  local inbox, held = INBOX .. q .. ':' .. dead, HELD .. q .. ':' .. dead
  while budget > 0 and redis.call('LMOVE', inbox, q, 'RIGHT', 'RIGHT') do
    pushed = pushed + 1; budget = budget - 1
  end
  if budget > 0 then
    for _, tag in ipairs(redis.call('SPOP', held, budget)) do
      budget = budget - 1
      if redis.call('HGET', KEYS[6], tag) == dead then
        redis.call('HDEL', KEYS[6], tag)
        local entry = redis.call('HGET', KEYS[4], tag)
        redis.call('HDEL', KEYS[4], tag)
        redis.call('ZREM', KEYS[5], tag)
        if entry then
          -- [message, exchange, routing key] as DELIVER_LUA wrote it: cut the message out unchanged
          local e = cjson.decode(entry)
          local tail = ',' .. cjson.encode(e[2]) .. ',' .. cjson.encode(e[3]) .. ']'
          local m
          if string.sub(entry, -#tail) == tail then m = string.sub(entry, 2, #entry - #tail)
          else m = cjson.encode(e[1]) end
          redis.call('RPUSH', q, m)
          pushed = pushed + 1
        end
      end
    end
  end
  if redis.call('EXISTS', inbox) == 0 and redis.call('EXISTS', held) == 0 then redis.call('SREM', oq, q) end
end
local jobs = redis.call('SRANDMEMBER', RUNNING .. dead, batch)
if redis.call('EXISTS', oq) == 0 and #jobs == 0 then redis.call('ZREM', KEYS[1], dead) end
local out = {{dead, pushed}}
for _, j in ipairs(jobs) do table.insert(out, j) end
return out
"""

# KEYS: queue; ARGV: batch -> messages moved from kombu's priority sub-queues onto the queue
_PROMOTE = f"""
local n = 0
for _, step in ipairs({{{', '.join(str(s) for s in PRIORITY_STEPS)}}}) do
  local sub = KEYS[1] .. {_lua_str(PRIORITY_SEPARATOR)} .. step
  while n < tonumber(ARGV[1]) and redis.call('LMOVE', sub, KEYS[1], 'RIGHT', 'LEFT') do n = n + 1 end
end
return n
"""

# KEYS: queue, owners, holders, unacked, unacked index; ARGV: ttl_ms, batch
# -> {queued messages removed, dead owners' held copies of this queue removed}
_PURGE = NOW_LUA + f"""
local INBOX, HELD = {_lua_str(keys.inbox("", "")[:-1])}, {_lua_str(keys.held("", "")[:-1])}
local q, batch = KEYS[1], tonumber(ARGV[2])
local removed = 0
local n = redis.call('LLEN', q)
if n <= batch then
  redis.call('DEL', q); removed = n
else
  redis.call('LTRIM', q, 0, -batch - 1); removed = batch
end
for _, step in ipairs({{{', '.join(str(s) for s in PRIORITY_STEPS)}}}) do
  local sub = q .. {_lua_str(PRIORITY_SEPARATOR)} .. step
  removed = removed + redis.call('LLEN', sub)
  redis.call('DEL', sub)
end
local tracked = 0
local now = now_ms('')
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, 100)) do
  local inbox, held = INBOX .. q .. ':' .. dead, HELD .. q .. ':' .. dead
  tracked = tracked + redis.call('LLEN', inbox)
  redis.call('DEL', inbox)
  for _, tag in ipairs(redis.call('SPOP', held, batch)) do
    if redis.call('HGET', KEYS[3], tag) == dead then
      redis.call('HDEL', KEYS[3], tag); redis.call('HDEL', KEYS[4], tag); redis.call('ZREM', KEYS[5], tag)
      tracked = tracked + 1
    end
  end
end
return {{removed, tracked}}
"""


def deliver_keys(queue: str, owner: str, *, mode: str) -> list[str]:
    """KEYS for `DELIVER_LUA` (mode 'inbox' after a BLMOVE, 'pop' for a direct get)."""
    source = keys.inbox(queue, owner) if mode == "inbox" else queue
    return [source, keys.KOMBU_UNACKED, keys.KOMBU_UNACKED_INDEX, keys.HOLDERS, keys.held(queue, owner),
            keys.OWNERS, keys.owner_queues(owner), queue]


class OwnerBeat:
    """One heartbeat thread per process: `ZADD keys.OWNERS now owner` every TTL / N seconds.

    A thread of its own (with its own Redis client), so a busy event loop or a long task cannot
    starve it; it dies with the process, which is the point.
    """

    _lock = threading.Lock()
    _current: OwnerBeat | None = None

    def __init__(self, redis_url: str, owner: str) -> None:
        self.owner = owner
        self.pid = os.getpid()
        self.interval = keys.OWNER_TTL_SECONDS / keys.OWNER_BEATS_PER_TTL
        self._client = redis.Redis.from_url(redis_url, socket_timeout=self.interval,
                                            socket_connect_timeout=self.interval)
        self._beat = self._client.register_script(_BEAT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clientsync-owner-beat", daemon=True)

    @classmethod
    def ensure(cls, redis_url: str) -> OwnerBeat:
        """This process's beat, started on first use (again in a forked child)."""
        with cls._lock:
            if cls._current is None or cls._current.pid != os.getpid():
                beat = cls(redis_url, process_owner())
                beat.beat_once()  # registered before the first delivery or job
                beat._thread.start()
                cls._current = beat
            return cls._current

    def beat_once(self) -> bool:
        try:
            self._beat(keys=[keys.OWNERS], args=[self.owner])
            return True
        except redis.RedisError:
            log.warning("owner heartbeat failed (Redis away?)", exc_info=True)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat_once()

    def stop(self) -> None:
        self._stop.set()
        self._client.close()


@dataclass(frozen=True)
class Reaped:
    """What one reaper round did."""

    owner: str | None
    messages: int = 0
    jobs: int = 0


class Reaper:
    """Gives a dead owner's messages and running jobs back; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, ledger: Ledger, *, queues: Sequence[str], batch: int = 100,
                 ttl_seconds: float = keys.OWNER_TTL_SECONDS) -> None:
        self.redis = redis
        self.ledger = ledger
        self.queues = list(queues)
        self.batch = batch
        self.ttl_ms = int(ttl_seconds * 1000)
        self._reap = redis.register_script(_REAP)
        self._promote = redis.register_script(_PROMOTE)

    async def sweep(self) -> Reaped:
        """One bounded round: at most `batch` messages and `batch` jobs of one dead owner."""
        for queue in self.queues:
            moved = int(await self._promote(keys=[queue], args=[self.batch]))
            if moved:
                log.warning("moved %d message(s) from priority sub-queues onto %s", moved, queue)
        out = await self._reap(
            keys=[keys.OWNERS, keys.REAPER_LAST, keys.REAPER_GRACE, keys.KOMBU_UNACKED, keys.KOMBU_UNACKED_INDEX,
                  keys.HOLDERS],
            args=[self.ttl_ms, self.batch],
        )
        owner = _text(out[0])
        if not owner:
            return Reaped(None)
        pushed = int(out[1])
        job_ids = [_text(j) for j in out[2:]]
        requeued = await self._requeue_jobs(owner, job_ids) if job_ids else 0
        if pushed or requeued:
            log.warning("owner %s is dead: pushed %d message(s) back and re-enqueued %d running job(s)",
                        owner, pushed, requeued)
        return Reaped(owner, pushed, requeued)

    async def _requeue_jobs(self, owner: str, job_ids: list[str]) -> int:
        """Re-enqueue the dead owner's `running` jobs from the change the ledger stored."""
        entries: list[tuple[str, str, str]] = []
        key = await task_key(self.redis)
        for job in await self.ledger.get_many(job_ids):
            if job is None:
                continue
            change = job.change
            queue = job.fields.get("queue") or (self.queues[0] if self.queues else "")
            message = ""
            if change is not None and job.provider not in ("", "-") and queue:
                attempt = int(job.fields.get("attempts") or 0) + 1
                message = apply_message(job.id, change, job.provider, attempt, queue=queue, key=key)
            entries.append((job.id, queue, message))
        missing = set(job_ids) - {e[0] for e in entries}
        entries += [(j, "", "") for j in missing]
        results = await self.ledger.requeue_orphans(owner, entries)
        return sum(1 for r in results if r == "ok")

    async def run(self, interval: float, rng: random.Random | None = None) -> None:
        """Reap forever (a worker process's background task; cancel to stop)."""
        rng = rng or random.Random()
        while True:
            try:
                reaped = await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: the next round tries again
                log.warning("reaper round failed", exc_info=True)
                reaped = Reaped(None)
            if reaped.owner and (reaped.messages or reaped.jobs):
                continue  # more of the dead owner's work may be waiting
            await asyncio.sleep(interval * rng.uniform(0.8, 1.2))


async def purge(redis_client: aioredis.Redis, queue: str, *, batch: int = 1000) -> dict[str, int]:
    """Empty `queue` (and its priority sub-queues) together with the tracked copies dead owners
    still hold for it, so no reaper pushes them back; one bounded script per batch. Messages
    that live workers are running are left to them."""
    script = redis_client.register_script(_PURGE)
    total = {"queued": 0, "tracked": 0}
    while True:
        removed, tracked = await script(
            keys=[queue, keys.OWNERS, keys.HOLDERS, keys.KOMBU_UNACKED, keys.KOMBU_UNACKED_INDEX],
            args=[keys.OWNER_TTL_SECONDS * 1000, batch],
        )
        total["queued"] += int(removed)
        total["tracked"] += int(tracked)
        if int(removed) < batch and int(tracked) == 0:
            return total


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
