"""The job ledger: one durable record per (event, provider) in Redis, with its attempts.

States: queued → running → (retrying → running)* → succeeded | skipped | dead.
A record is a hash (`keys.job`), its attempts a list (`keys.job_attempts`); every record is
indexed by last update in `keys.JOBS_BY_TIME` and in one `keys.jobs_in_state` set, so
listing by state or time never scans. Each transition is one Lua script (one round trip).
Retention is bounded by count and age (`trim`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis

from worker import keys
from worker.models import ClientChange

State = Literal["queued", "running", "retrying", "succeeded", "skipped", "dead"]
STATES: tuple[State, ...] = ("queued", "running", "retrying", "succeeded", "skipped", "dead")
FINAL: frozenset[str] = frozenset({"succeeded", "skipped", "dead"})
MAX_ATTEMPTS_KEPT = 50

# KEYS: job hash, attempts list, all-jobs zset
# ARGV: job_id, new state, now_ms, mode, fields JSON, attempt JSON ('' for none), state-set prefix
#   mode 'create'   : only if the record does not exist (first sight of a job)
#   mode 'live'     : not over a final state (a redelivered duplicate must not reopen it)
#   mode 'force'    : always (replay, discard)
_TRANSITION = """
local job, attempts, all = KEYS[1], KEYS[2], KEYS[3]
local id, new, now, mode, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[7]
local old = redis.call('HGET', job, 'state')
if mode == 'create' and old then return old end
if mode == 'live' and (old == 'succeeded' or old == 'skipped' or old == 'dead') then return old end
if old then redis.call('ZREM', prefix .. old, id) end
local fields = cjson.decode(ARGV[5])
local flat = {}
for k, v in pairs(fields) do
  if v == cjson.null then redis.call('HDEL', job, k) else table.insert(flat, k); table.insert(flat, tostring(v)) end
end
table.insert(flat, 'state'); table.insert(flat, new)
table.insert(flat, 'updated_at'); table.insert(flat, now)
if not old then table.insert(flat, 'created_at'); table.insert(flat, now) end
redis.call('HSET', job, unpack(flat))
if ARGV[6] ~= '' then
  redis.call('RPUSH', attempts, ARGV[6])
  redis.call('LTRIM', attempts, -tonumber(ARGV[8]), -1)
  redis.call('HINCRBY', job, 'attempts', 1)
end
redis.call('ZADD', prefix .. new, now, id)
redis.call('ZADD', all, now, id)
return old or ''
"""

# KEYS: all-jobs zset; ARGV: max count, min score (ms), state-set prefix, states...
_TRIM = """
local all, keep, oldest, prefix = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local victims = redis.call('ZRANGEBYSCORE', all, '-inf', '(' .. oldest, 'LIMIT', 0, 1000)
local n = redis.call('ZCARD', all) - #victims
if n > keep then
  local extra = redis.call('ZRANGE', all, #victims, #victims + math.min(n - keep, 1000) - 1)
  for _, id in ipairs(extra) do table.insert(victims, id) end
end
for _, id in ipairs(victims) do
  local st = redis.call('HGET', ARGV[4] .. id, 'state')
  if st then redis.call('ZREM', prefix .. st, id) end
  redis.call('DEL', ARGV[4] .. id, ARGV[4] .. id .. ':attempts')
  redis.call('ZREM', all, id)
end
return #victims
"""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Attempt:
    """One try at a job."""

    number: int
    at: float
    outcome: str  # succeeded | skipped | retrying | dead
    error_class: str | None = None
    status: int | None = None
    message: str | None = None
    field_errors: dict[str, list[str]] = field(default_factory=dict)
    next_attempt_at: float | None = None
    duration_ms: float | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass(frozen=True)
class Job:
    """A ledger record as read back."""

    id: str
    state: str
    provider: str
    event_id: str
    client_id: str
    action: str
    fields: dict[str, str]
    attempts: list[dict[str, Any]]

    @property
    def change(self) -> dict[str, Any] | None:
        raw = self.fields.get("change")
        return json.loads(raw) if raw else None


class Ledger:
    """Read and write job records; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, max_jobs: int = 100_000, max_age_seconds: float = 14 * 86400):
        self.redis = redis
        self.max_jobs = max_jobs
        self.max_age_seconds = max_age_seconds
        self._transition = redis.register_script(_TRANSITION)
        self._trim = redis.register_script(_TRIM)

    async def _move(
        self,
        job_id: str,
        state: State,
        *,
        mode: str = "live",
        fields: dict[str, Any] | None = None,
        attempt: Attempt | None = None,
    ) -> str:
        old = await self._transition(
            keys=[keys.job(job_id), keys.job_attempts(job_id), keys.JOBS_BY_TIME],
            args=[
                job_id, state, now_ms(), mode, json.dumps(fields or {}),
                attempt.to_json() if attempt else "", keys.jobs_in_state(""), MAX_ATTEMPTS_KEPT,
            ],
        )
        return old.decode() if isinstance(old, bytes) else str(old)

    # --- writes ----------------------------------------------------------------------------
    async def enqueued(self, change: ClientChange, provider: str, *, received_at: float | None = None) -> str:
        """First sight of a job; a no-op if the job is already known (a redelivered fan-out)."""
        job_id = keys.job_id(provider, change.event_id)
        await self._move(job_id, "queued", mode="create", fields={
            "provider": provider,
            "event_id": change.event_id,
            "client_id": change.client.id,
            "action": change.action,
            "change": change.model_dump_json(),
            "received_at": received_at or time.time(),
        })
        return job_id

    async def running(self, job_id: str) -> str:
        """Returns the previous state (a final one means this run is a redelivered duplicate)."""
        return await self._move(job_id, "running", fields={"next_attempt_at": None})

    async def retrying(self, job_id: str, attempt: Attempt) -> None:
        await self._move(job_id, "retrying", attempt=attempt, fields={
            "next_attempt_at": attempt.next_attempt_at, "last_error": attempt.message or "",
            "last_error_class": attempt.error_class or "",
        })

    async def succeeded(self, job_id: str, attempt: Attempt, *, result: str, provider_id: str | None) -> None:
        await self._move(job_id, "succeeded", mode="force", attempt=attempt, fields={
            "result": result, "provider_id": provider_id, "reason": None, "next_attempt_at": None,
            "finished_at": attempt.at,
        })

    async def skipped(self, job_id: str, attempt: Attempt, *, reason: str, provider_id: str | None) -> None:
        await self._move(job_id, "skipped", mode="force", attempt=attempt, fields={
            "result": "skipped", "reason": reason, "provider_id": provider_id, "next_attempt_at": None,
            "finished_at": attempt.at,
        })

    async def dead(self, job_id: str, attempt: Attempt) -> None:
        await self._move(job_id, "dead", mode="force", attempt=attempt, fields={
            "next_attempt_at": None, "last_error": attempt.message or "",
            "last_error_class": attempt.error_class or "", "finished_at": attempt.at,
        })

    async def dead_letter(self, job_id: str, *, raw: str, attempt: Attempt) -> None:
        """A message that never became a valid job: kept with its payload and the reason."""
        await self._move(job_id, "dead", mode="force", attempt=attempt, fields={
            "provider": "-", "event_id": "-", "client_id": "-", "action": "-",
            "raw": raw[:64 * 1024], "last_error": attempt.message or "",
            "last_error_class": attempt.error_class or "",
        })

    async def requeued(self, job_id: str, *, note: str) -> None:
        """An operator replayed the job."""
        await self._move(job_id, "queued", mode="force", fields={"replayed_at": time.time(), "note": note,
                                                                  "next_attempt_at": None})

    async def trim(self) -> int:
        """Apply retention: drop records past `max_jobs` (oldest first) or older than the max age."""
        oldest = now_ms() - int(self.max_age_seconds * 1000)
        removed = await self._trim(
            keys=[keys.JOBS_BY_TIME],
            args=[self.max_jobs, oldest, keys.jobs_in_state(""), keys.job("")],
        )
        return int(removed)

    # --- reads -----------------------------------------------------------------------------
    async def get(self, job_id: str) -> Job | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.lrange(keys.job_attempts(job_id), 0, -1)
            raw, attempts = await pipe.execute()
        if not raw:
            return None
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return Job(
            id=job_id, state=f.get("state", ""), provider=f.get("provider", ""), event_id=f.get("event_id", ""),
            client_id=f.get("client_id", ""), action=f.get("action", ""), fields=f,
            attempts=[json.loads(a) for a in attempts],
        )

    async def ids(self, state: str | None = None, *, newest_first: bool = True, start: int = 0,
                  count: int = 50) -> list[str]:
        key = keys.jobs_in_state(state) if state else keys.JOBS_BY_TIME
        fn = self.redis.zrevrange if newest_first else self.redis.zrange
        return [i.decode() for i in await fn(key, start, start + count - 1)]

    async def many(self, job_ids: Iterable[str]) -> list[Job]:
        out = []
        for job_id in job_ids:
            job = await self.get(job_id)
            if job:
                out.append(job)
        return out

    async def counts(self) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for s in STATES:
                pipe.zcard(keys.jobs_in_state(s))
            values = await pipe.execute()
        return dict(zip(STATES, (int(v) for v in values), strict=True))

    # --- retry engine (worker.jobs) ----------------------------------------------------------
    async def waiting(self, job_id: str, *, next_attempt_at: float, reason: str, message: str) -> None:
        """The job is parked without spending an attempt (circuit open, rate limit): `retrying`,
        with its next attempt time and why, and no entry in its attempt history."""
        await self._move(job_id, "retrying", fields={
            "next_attempt_at": next_attempt_at, "last_error": message, "last_error_class": reason,
        })
