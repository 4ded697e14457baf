"""The job ledger: one durable record per (event, provider) in Redis, with its attempts.

States: queued → running → (retrying → running)* → succeeded | skipped | dead, and an
operator may move a dead job to `discarded` or (replay) back to `queued`.

A record is a hash (`keys.job`), its history a list (`keys.job_attempts`: the attempts, plus
operator actions with outcome `replayed` / `discarded`). Every record is indexed by last
update in `keys.JOBS_BY_TIME`, in one `keys.jobs_in_state` set, in one
`keys.jobs_of_provider_in_state` set and in its client's `keys.jobs_of_client` set, so
listing by state, provider, client or time never scans. Each transition is one Lua script
(one round trip) that also bumps the provider's shared counters (`keys.stats`) and, on
success, the receipt-to-applied latency histogram (`keys.latency`): the receiver exposes
them at /metrics although the transitions happen in the workers.

Retention is bounded by count and age and applies to finished jobs only: a queued, running
or retrying job is never dropped under a worker's feet (live jobs are bounded by the queue
itself). The count bound is kept by the transition script itself (a job that finishes past
`max_jobs` drops up to two of the oldest finished ones), so it holds at every moment
whatever the number of workers; age is swept by `trim`, which workers run every
`trim_every` new jobs and on a timer (`run_retention`). Redis memory stays flat under any load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
import redis.exceptions

from worker import keys
from worker.models import ClientChange, mask_emails

log = logging.getLogger("clientsync.ledger")

State = Literal["queued", "running", "retrying", "succeeded", "skipped", "dead", "discarded", "needs_attention"]
STATES: tuple[State, ...] = ("queued", "running", "retrying", "succeeded", "skipped", "dead", "discarded",
                             "needs_attention")
#: states a job stays in until an operator acts (needs_attention: several provider records could be
#: the client; resolved by adopting one or creating a new one)
FINAL: frozenset[str] = frozenset({"succeeded", "skipped", "dead", "discarded", "needs_attention"})
MAX_ATTEMPTS_KEPT = 50

#: upper bounds (seconds) of the receipt-to-applied latency histogram; +Inf is implied
LATENCY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

#: counter (in `keys.stats`) bumped when a job enters a state from another one
STATE_COUNTERS: dict[str, str] = {
    "succeeded": "applied", "retrying": "retried", "dead": "dead", "skipped": "skipped",
    "discarded": "discarded", "needs_attention": "needs_attention",
}
#: every counter field the transition script writes
COUNTERS: tuple[str, ...] = ("enqueued", "applied", "retried", "parked", "dead", "skipped", "replayed",
                             "discarded", "needs_attention", "requeued")


def bucket_label(bound: float) -> str:
    return f"{bound:g}"


def _lua_str(value: str) -> str:
    return json.dumps(value)  # a JSON string of ASCII key prefixes is a valid Lua string literal


# The one transition function every script shares. Key prefixes come from `worker.keys`, so
# the names built here are exactly the ones the readers build.
_LIB = f"""
local JOB, STATE, PS, CLIENT = {_lua_str(keys.job(""))}, {_lua_str(keys.jobs_in_state(""))},
  {_lua_str(keys.jobs_of_provider_in_state("", "")[:-1])}, {_lua_str(keys.jobs_of_client(""))}
local ALL, FINISHED = {_lua_str(keys.JOBS_BY_TIME)}, {_lua_str(keys.JOBS_FINISHED)}
local STATS, LATENCY, PROVIDERS = {_lua_str(keys.stats(""))}, {_lua_str(keys.latency(""))},
  {_lua_str(keys.STATS_PROVIDERS)}
local FINAL = {{succeeded=true, skipped=true, dead=true, discarded=true, needs_attention=true}}
local COUNTER = cjson.decode({_lua_str(json.dumps(STATE_COUNTERS))})
local BUCKETS = cjson.decode({_lua_str(json.dumps([[b, bucket_label(b)] for b in LATENCY_BUCKETS]))})
local KEEP_HISTORY = {MAX_ATTEMPTS_KEPT}
-- running jobs per owner (worker.inflight's reaper re-enqueues a dead owner's), and the owners' beats
local RUNNING, OWNERS, OWNER_TTL = {_lua_str(keys.running_jobs(""))}, {_lua_str(keys.OWNERS)},
  {keys.OWNER_TTL_SECONDS * 1000}

-- Whether `owner` has no live heartbeat (absent, or older than the TTL).
local function owner_dead(owner, now)
  if not owner then return true end
  local beat = tonumber(redis.call('ZSCORE', OWNERS, owner) or '')
  return not beat or beat < now - OWNER_TTL
end

-- Forget one job: its record, history and every index entry.
local function drop(id)
  local job = JOB .. id
  local m = redis.call('HMGET', job, 'state', 'provider', 'client_id')
  if m[1] then
    redis.call('ZREM', STATE .. m[1], id)
    redis.call('ZREM', PS .. (m[2] or '?') .. ':' .. m[1], id)
  end
  if m[3] then redis.call('ZREM', CLIENT .. m[3], id) end
  redis.call('DEL', job, job .. ':attempts')
  redis.call('ZREM', ALL, id)
  redis.call('ZREM', FINISHED, id)
end

-- mode: 'create' only if absent; 'live' not over a final state; 'force' always;
-- 'guard' only from a state in `allowed` (a set). entry: JSON for the history list or '';
-- counts: whether the entry is an attempt (bumps the `attempts` field).
-- keep: the most finished jobs kept (0 = no limit): a job that finishes past it drops up to
-- two of the oldest finished ones, so the count bound holds at every moment, not per sweep.
local function transition(id, new, now, mode, fields, entry, counts, allowed, keep)
  local job = JOB .. id
  local old = redis.call('HGET', job, 'state')
  if mode == 'create' and old then return old, false end
  if mode == 'live' and old and FINAL[old] then return old, false end
  if mode == 'guard' and not (old and allowed[old]) then return old or '', false end
  local prev_owner = redis.call('HGET', job, 'owner')
  if old == 'running' and prev_owner then redis.call('SREM', RUNNING .. prev_owner, id) end
  if new == 'running' then
    if type(fields.owner) == 'string' then redis.call('SADD', RUNNING .. fields.owner, id)
    else redis.call('HDEL', job, 'owner', 'queue') end
  end
  local flat = {{}}
  for k, v in pairs(fields) do
    if v == cjson.null then redis.call('HDEL', job, k) else table.insert(flat, k); table.insert(flat, tostring(v)) end
  end
  table.insert(flat, 'state'); table.insert(flat, new)
  table.insert(flat, 'updated_at'); table.insert(flat, now)
  if not old then table.insert(flat, 'created_at'); table.insert(flat, now) end
  redis.call('HSET', job, unpack(flat))
  if entry ~= '' then
    redis.call('RPUSH', job .. ':attempts', entry)
    redis.call('LTRIM', job .. ':attempts', -KEEP_HISTORY, -1)
    if counts then redis.call('HINCRBY', job, 'attempts', 1) end
  end
  local meta = redis.call('HMGET', job, 'provider', 'client_id', 'received_at')
  local provider = meta[1] or '?'
  if old then
    redis.call('ZREM', STATE .. old, id)
    redis.call('ZREM', PS .. provider .. ':' .. old, id)
  end
  redis.call('ZADD', STATE .. new, now, id)
  redis.call('ZADD', PS .. provider .. ':' .. new, now, id)
  redis.call('ZADD', ALL, now, id)
  if meta[2] and meta[2] ~= '-' then redis.call('ZADD', CLIENT .. meta[2], now, id) end
  if FINAL[new] then
    redis.call('ZADD', FINISHED, now, id)
    if keep and keep > 0 then
      local over = redis.call('ZCARD', FINISHED) - keep
      if over > 0 then
        for _, victim in ipairs(redis.call('ZRANGE', FINISHED, 0, math.min(over, 2) - 1)) do
          if victim ~= id then drop(victim) end
        end
      end
    end
  else
    redis.call('ZREM', FINISHED, id)
  end
  local stats = STATS .. provider
  redis.call('SADD', PROVIDERS, provider)
  if not old then redis.call('HINCRBY', stats, 'enqueued', 1) end
  if new ~= old then
    local counter = COUNTER[new]
    if new == 'queued' and old then counter = old == 'running' and fields.requeued and 'requeued' or 'replayed' end
    if new == 'retrying' and not counts then counter = 'parked' end
    if counter then redis.call('HINCRBY', stats, counter, 1) end
    if new == 'succeeded' and tonumber(meta[3] or '') then
      local took = math.max(0, now / 1000 - tonumber(meta[3]))
      local label = '+Inf'
      for _, b in ipairs(BUCKETS) do
        if took <= b[1] then label = b[2]; break end
      end
      local lat = LATENCY .. provider
      redis.call('HINCRBY', lat, label, 1)
      redis.call('HINCRBY', lat, 'count', 1)
      redis.call('HINCRBYFLOAT', lat, 'sum', took)
    end
  end
  return old or '', true
end
"""

# ARGV: job_id, new state, now_ms, mode, fields JSON, entry JSON ('' for none), '1' if the entry is an
# attempt, max finished jobs kept
TRANSITION_LUA = _LIB + """
local old = transition(ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], cjson.decode(ARGV[5]), ARGV[6],
                       ARGV[7] == '1', {}, tonumber(ARGV[8]))
return old
"""

# One change's jobs at several providers, first sight of each (a known job is left as it is).
# KEYS: the time index (unused: the prefixes are in _LIB); ARGV: now_ms, max finished jobs kept,
# then pairs of (job_id, fields JSON) -> how many jobs were new
_ENQUEUE_MANY = _LIB + """
local now, keep, created = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
for i = 3, #ARGV, 2 do
  local _, moved = transition(ARGV[i], 'queued', now, 'create', cjson.decode(ARGV[i + 1]), '', false, {}, keep)
  if moved then created = created + 1 end
end
return created
"""

# Operator actions on many jobs at once, each guarded by the job's current state.
# KEYS: the Celery queue (for replay; unused by discard)
# ARGV: action ('replay'|'discard'), now_ms, allowed states (comma-separated), note, then
#       pairs of (job_id, Celery message or '') -> one result per job: 'ok' or the state that refused
_OPERATE = _LIB + """
local action, now, note = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local allowed = {}
for s in string.gmatch(ARGV[3], '[^,]+') do allowed[s] = true end
local new = action == 'replay' and 'queued' or 'discarded'
local entry = cjson.encode({outcome = action == 'replay' and 'replayed' or 'discarded', at = now / 1000,
                            note = note})
local fields = {next_attempt_at = cjson.null}
if action == 'replay' then fields.replayed_at = now / 1000 else fields.discarded_at = now / 1000 end
fields.note = note
local out = {}
for i = 5, #ARGV, 2 do
  local id, message = ARGV[i], ARGV[i + 1]
  local old, moved
  local cur = redis.call('HMGET', JOB .. id, 'state', 'owner')
  if cur[1] == 'running' and allowed.running and not owner_dead(cur[2], now) then
    old, moved = 'running', false  -- its worker is alive: still owned
  else
    old, moved = transition(id, new, now, 'guard', fields, entry, false, allowed, 0)
  end
  if moved then
    if action == 'replay' then
      redis.call('LPUSH', KEYS[1], message)
      redis.call('HINCRBY', JOB .. id, 'replays', 1)
    end
    table.insert(out, 'ok')
  else
    table.insert(out, old == '' and 'missing' or old)
  end
end
return out
"""

# A dead owner's jobs still shown running go back to the queue they came from, from their stored
# change; jobs it no longer runs only leave its running set.
# ARGV: owner, now_ms, then triples of (job_id, queue, Celery message or '') -> 'ok' or why not, per job
_REQUEUE_ORPHANS = _LIB + """
local owner, now = ARGV[1], tonumber(ARGV[2])
local note = 'its worker ' .. owner .. ' died while running it; re-enqueued from the stored change'
local entry = cjson.encode({outcome = 'requeued', at = now / 1000, note = note})
local out = {}
for i = 3, #ARGV, 3 do
  local id, queue, message = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local cur = redis.call('HMGET', JOB .. id, 'state', 'owner')
  if cur[1] == 'running' and cur[2] == owner and message ~= '' then
    transition(id, 'queued', now, 'force', {next_attempt_at = cjson.null, note = note, requeued = now / 1000},
               entry, false, {}, 0)
    redis.call('RPUSH', queue, message)  -- the consuming end: it waited long enough
    table.insert(out, 'ok')
  else
    table.insert(out, cur[1] or 'missing')
  end
  redis.call('SREM', RUNNING .. owner, id)
end
return out
"""

# ARGV: max finished jobs kept, min score (ms) kept, batch size
_TRIM = _LIB + """
local keep, oldest, batch = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local victims = redis.call('ZRANGEBYSCORE', FINISHED, '-inf', '(' .. oldest, 'LIMIT', 0, batch)
local n = redis.call('ZCARD', FINISHED) - #victims
if n > keep and #victims < batch then
  local extra = redis.call('ZRANGE', FINISHED, #victims, #victims + math.min(n - keep, batch - #victims) - 1)
  for _, id in ipairs(extra) do table.insert(victims, id) end
end
for _, id in ipairs(victims) do drop(id) end
return #victims
"""

TRIM_BATCH = 1000

#: the provider name dead letters are filed under (messages that never became a job)
INTAKE = "intake"

# A dead letter: the transition to `dead` plus its reason's counter (`keys.DEAD_LETTERS`), at once.
# KEYS: the dead-letter counters; ARGV: job_id, now_ms, fields JSON, attempt JSON, max finished jobs, reason
DEAD_LETTER_LUA = _LIB + """
local old = transition(ARGV[1], 'dead', tonumber(ARGV[2]), 'force', cjson.decode(ARGV[3]), ARGV[4], true, {},
                       tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[1], ARGV[6], 1)
return old
"""

# Drop the stored change (emails, addresses) of jobs that finished in `state` before a cut-off.
# A watermark per state remembers how far earlier passes went, so each pass reads only new jobs.
# KEYS: the state's index, the watermark hash; ARGV: state, cut-off (ms), batch -> scrubbed count
_SCRUB = f"""
local JOB = {_lua_str(keys.job(""))}
local from = redis.call('HGET', KEYS[2], ARGV[1]) or '-inf'
if from ~= '-inf' then from = '(' .. from end
local batch = redis.call('ZRANGEBYSCORE', KEYS[1], from, ARGV[2], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for i = 1, #batch, 2 do
  if redis.call('HDEL', JOB .. batch[i], 'change') == 1 then
    redis.call('HSET', JOB .. batch[i], 'change_dropped_at', ARGV[2])
    n = n + 1
  end
end
if #batch > 0 then redis.call('HSET', KEYS[2], ARGV[1], batch[#batch]) end
return {{n, #batch / 2}}
"""

#: finished states whose stored change is dropped after `change_ttl_seconds` (a dead job keeps it:
#: an operator may replay it)
SCRUBBED_STATES: tuple[str, ...] = ("succeeded", "skipped")


def dead_letter_fields(raw: str, attempt: Attempt, *, reason: str, stage: str,
                       task_id: str | None = None) -> dict[str, Any]:
    """The record of a message that never became a valid job (see `DEAD_LETTER_LUA`)."""
    return {
        "provider": INTAKE, "event_id": "-", "client_id": "-", "action": "-",
        "raw": raw[:64 * 1024], "last_error": attempt.message or "", "last_error_class": attempt.error_class or "",
        "reason": reason, "stage": stage, "task_id": task_id, "finished_at": attempt.at,
    }


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
    #: of `duration_ms`, the time spent waiting on the provider (`worker.lease.provider_time`)
    provider_ms: float | None = None

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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Ledger:
    """Read and write job records; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, max_jobs: int = 100_000, max_age_seconds: float = 14 * 86400,
                 trim_every: int = 500, change_ttl_seconds: float = 7 * 86400):
        self.redis = redis
        self.change_ttl_seconds = change_ttl_seconds
        self._dead_letter = redis.register_script(DEAD_LETTER_LUA)
        self._scrub = redis.register_script(_SCRUB)
        self.max_jobs = max_jobs
        self.max_age_seconds = max_age_seconds
        self.trim_every = trim_every
        self._created = 0
        self._trimming: asyncio.Task[None] | None = None
        self._transition = redis.register_script(TRANSITION_LUA)
        self._enqueue_many = redis.register_script(_ENQUEUE_MANY)
        self._operate = redis.register_script(_OPERATE)
        self._trim = redis.register_script(_TRIM)
        self._requeue_orphans = redis.register_script(_REQUEUE_ORPHANS)

    def transition_call(
        self,
        job_id: str,
        state: State,
        *,
        mode: str = "live",
        fields: dict[str, Any] | None = None,
        attempt: Attempt | None = None,
    ) -> tuple[list[str], list[Any]]:
        """One transition's keys and arguments (`TRANSITION_LUA`; also a piece of the job's start
        and finish scripts, `worker.steps`)."""
        return ([keys.job(job_id), keys.job_attempts(job_id), keys.JOBS_BY_TIME],
                [job_id, state, now_ms(), mode, json.dumps(fields or {}),
                 attempt.to_json() if attempt else "", "1" if attempt else "0", self.max_jobs])

    async def _move(self, call: tuple[list[str], list[Any]]) -> str:
        """Run one transition (`transition_call`'s keys and arguments); returns the previous state."""
        script_keys, args = call
        return _text(await self._transition(keys=script_keys, args=args))

    # --- writes ----------------------------------------------------------------------------
    @staticmethod
    def _queued_fields(change: ClientChange, provider: str, received_at: float | None) -> dict[str, Any]:
        return {
            "provider": provider,
            "event_id": change.event_id,
            "client_id": change.client.id,
            "action": change.action,
            "change": change.model_dump_json(),
            "received_at": received_at or time.time(),
        }

    async def enqueued(self, change: ClientChange, provider: str, *, received_at: float | None = None) -> str:
        """First sight of a job; a no-op if the job is already known (a redelivered fan-out)."""
        return (await self.enqueued_many(change, [provider], received_at=received_at))[0]

    async def enqueued_many(self, change: ClientChange, providers: Sequence[str], *,
                            received_at: float | None = None) -> list[str]:
        """First sight of one change's job at each of `providers`, in one round trip; a job
        already known (a redelivered fan-out) is left as it is. Returns the job ids, in order."""
        job_ids = [keys.job_id(p, change.event_id) for p in providers]
        if not job_ids:
            return []
        args: list[Any] = [now_ms(), self.max_jobs]
        for provider, job_id in zip(providers, job_ids, strict=True):
            args += [job_id, json.dumps(self._queued_fields(change, provider, received_at))]
        created = await self._enqueue_many(keys=[keys.JOBS_BY_TIME], args=args)
        for _ in range(int(created)):
            await self._maybe_trim()
        return job_ids

    def open_call(self, change: ClientChange, provider: str, *,
                  received_at: float | None) -> tuple[list[str], list[Any]]:
        """`enqueued_many`'s first sight of one job (`queued`, only if absent) as a transition's keys
        and arguments: the first piece of a first attempt's start script (`worker.steps`)."""
        return self.transition_call(keys.job_id(provider, change.event_id), "queued", mode="create",
                                    fields=self._queued_fields(change, provider, received_at))

    def opened(self) -> None:
        """A job was opened by a start script (`open_call`): the retention cadence counts it. A trim
        that falls due runs as a task of its own: the job that opened is holding its claim, its
        client's lock and maybe the circuit's probe, and must not wait on a trim of thousands of
        records (one trim at a time; a trim already running covers this one)."""
        if not self._trim_due():
            return
        if self._trimming is not None and not self._trimming.done():
            return
        self._trimming = asyncio.get_running_loop().create_task(self._trim_logged())

    @staticmethod
    def running_fields(owner: str | None, queue: str | None) -> dict[str, Any]:
        """The fields a `running` transition sets (see `running`)."""
        fields: dict[str, Any] = {"next_attempt_at": None}
        if owner is not None:
            fields.update(owner=owner, queue=queue)
        return fields

    async def running(self, job_id: str, *, owner: str | None = None, queue: str | None = None) -> str:
        """Returns the previous state (a final one means this run is a redelivered duplicate).

        `owner` (the process's id in `keys.OWNERS`) and `queue` let a reaper re-enqueue the job
        if that process dies while running it (`worker.inflight`)."""
        return await self._move(self.transition_call(job_id, "running", fields=self.running_fields(owner, queue)))

    async def retrying(self, job_id: str, attempt: Attempt) -> None:
        await self._move(self.transition_call(job_id, "retrying", attempt=attempt, fields={
            "next_attempt_at": attempt.next_attempt_at, "last_error": attempt.message or "",
            "last_error_class": attempt.error_class or "",
        }))

    @staticmethod
    def succeeded_fields(attempt: Attempt, *, result: str, provider_id: str | None,
                         unsupported: Sequence[str] = ()) -> dict[str, Any]:
        """The fields a `succeeded` transition sets (mode `force`, with `attempt`)."""
        return {
            "result": result, "provider_id": provider_id, "reason": None, "next_attempt_at": None,
            "finished_at": attempt.at, "unsupported": ",".join(unsupported) or None,
        }

    @staticmethod
    def skipped_fields(attempt: Attempt, *, reason: str, provider_id: str | None) -> dict[str, Any]:
        """The fields a `skipped` transition sets (mode `force`, with `attempt`)."""
        return {
            "result": "skipped", "reason": reason, "provider_id": provider_id, "next_attempt_at": None,
            "finished_at": attempt.at,
        }

    async def succeeded(self, job_id: str, attempt: Attempt, *, result: str, provider_id: str | None,
                        unsupported: Sequence[str] = ()) -> None:
        """`unsupported`: canonical fields the provider could not take (shown on the job)."""
        fields = self.succeeded_fields(attempt, result=result, provider_id=provider_id, unsupported=unsupported)
        await self._move(self.transition_call(job_id, "succeeded", mode="force", attempt=attempt, fields=fields))

    async def skipped(self, job_id: str, attempt: Attempt, *, reason: str, provider_id: str | None) -> None:
        fields = self.skipped_fields(attempt, reason=reason, provider_id=provider_id)
        await self._move(self.transition_call(job_id, "skipped", mode="force", attempt=attempt, fields=fields))

    async def dead(self, job_id: str, attempt: Attempt) -> None:
        await self._move(self.transition_call(job_id, "dead", mode="force", attempt=attempt, fields={
            "next_attempt_at": None, "last_error": attempt.message or "",
            "last_error_class": attempt.error_class or "", "finished_at": attempt.at,
        }))

    async def needs_attention(self, job_id: str, attempt: Attempt, *, candidates: list[dict[str, Any]]) -> None:
        """Several provider records could be this client: the job waits for an operator's choice."""
        await self._move(self.transition_call(job_id, "needs_attention", mode="force", attempt=attempt, fields={
            "next_attempt_at": None, "last_error": attempt.message or "",
            "last_error_class": attempt.error_class or "", "candidates": json.dumps(candidates),
        }))

    async def dead_letter(self, job_id: str, *, raw: str, attempt: Attempt, reason: str | None = None,
                          stage: str = "task", task_id: str | None = None) -> None:
        """A message that never became a valid job: kept with its payload (emails masked) and the
        reason, filed under provider `intake`, and counted by reason (`keys.DEAD_LETTERS`)."""
        reason = reason or attempt.error_class or "invalid"
        fields = dead_letter_fields(mask_emails(raw), attempt, reason=reason, stage=stage, task_id=task_id)
        await self._dead_letter(keys=[keys.DEAD_LETTERS], args=[
            job_id, now_ms(), json.dumps(fields), attempt.to_json(), self.max_jobs, reason])

    async def scrub_changes(self, *, batch: int = TRIM_BATCH) -> int:
        """Drop the stored change of succeeded and skipped jobs older than `change_ttl_seconds`
        (the record, its outcome and history stay). Returns how many were dropped."""
        cutoff = now_ms() - int(self.change_ttl_seconds * 1000)
        total = 0
        for state in SCRUBBED_STATES:
            while True:
                n, seen = await self._scrub(keys=[keys.jobs_in_state(state), keys.LEDGER_SCRUBBED],
                                            args=[state, cutoff, batch])
                total += int(n)
                if int(seen) < batch:
                    break
        return total

    async def requeued(self, job_id: str, *, note: str) -> None:
        """An operator replayed the job (record only; `replay` also enqueues, atomically)."""
        await self._move(self.transition_call(job_id, "queued", mode="force", fields={
            "replayed_at": time.time(), "note": note, "next_attempt_at": None,
        }))

    async def replay(self, queue: str, messages: Sequence[tuple[str, str]], *, allowed: Iterable[str],
                     note: str = "replayed") -> list[str]:
        """For each (job_id, Celery message): if the job is in an `allowed` state, mark it queued and
        LPUSH the message onto `queue`, atomically. One round trip for the whole batch; returns
        'ok' or the refusing state ('missing' for an unknown job) per job, in order."""
        return await self._operate_many("replay", queue, messages, allowed, note)

    async def discard(self, job_ids: Sequence[str], *, allowed: Iterable[str] = ("dead",),
                      note: str = "discarded") -> list[str]:
        """Mark jobs `discarded` (kept with their history, out of the dead list); guarded like `replay`."""
        return await self._operate_many("discard", "", [(j, "") for j in job_ids], allowed, note)

    async def _operate_many(self, action: str, queue: str, pairs: Sequence[tuple[str, str]],
                            allowed: Iterable[str], note: str) -> list[str]:
        if not pairs:
            return []
        args: list[Any] = [action, now_ms(), ",".join(allowed), note]
        for job_id, message in pairs:
            args += [job_id, message]
        out = await self._operate(keys=[queue or keys.JOBS_BY_TIME], args=args)
        return [_text(r) for r in out]

    async def requeue_orphans(self, owner: str, entries: Sequence[tuple[str, str, str]]) -> list[str]:
        """For each (job_id, queue, message): if the job is still `running` for the dead `owner`,
        mark it queued and push the message onto `queue`; either way drop it from the owner's
        running set. One round trip; returns 'ok' or the job's state per entry."""
        if not entries:
            return []
        args: list[Any] = [owner, now_ms()]
        for entry in entries:
            args += list(entry)
        out = await self._requeue_orphans(keys=[keys.OWNERS], args=args)
        return [_text(r) for r in out]

    async def trim(self) -> int:
        """Apply retention once: drop up to one batch of finished records past `max_jobs` (oldest
        first) or older than the max age. Returns how many were dropped."""
        oldest = now_ms() - int(self.max_age_seconds * 1000)
        removed = await self._trim(keys=[keys.JOBS_FINISHED], args=[self.max_jobs, oldest, TRIM_BATCH])
        return int(removed)

    async def trim_all(self) -> int:
        """Trim until within retention (several batches after a burst)."""
        total = 0
        while True:
            n = await self.trim()
            total += n
            if n < TRIM_BATCH:
                return total

    def _trim_due(self) -> bool:
        """Count one new job; whether retention's trim is due (every `trim_every` new jobs)."""
        self._created += 1
        return bool(self.trim_every) and self._created % self.trim_every == 0

    async def _trim_logged(self) -> None:
        try:
            await self.trim_all()
        except redis.exceptions.RedisError:
            log.warning("ledger trim failed; the timer will retry", exc_info=True)

    async def _maybe_trim(self) -> None:
        if self._trim_due():
            await self._trim_logged()

    async def run_retention(self, interval: float = 10.0) -> None:
        """Trim forever, every `interval` seconds (a worker's background task; cancel to stop)."""
        while True:
            try:
                removed = await self.trim_all()
                if removed:
                    log.debug("ledger retention dropped %d finished jobs", removed)
                if await self.scrub_changes():
                    log.debug("ledger retention dropped the stored changes of old finished jobs")
            except (redis.exceptions.RedisError, OSError):
                log.warning("ledger trim failed; retrying in %ss", interval, exc_info=True)
            await asyncio.sleep(interval)

    # --- reads -----------------------------------------------------------------------------
    async def get(self, job_id: str) -> Job | None:
        return (await self.get_many([job_id]))[0]

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """Records with their history, one pipeline for all of them; None where unknown."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.job(job_id))
                pipe.lrange(keys.job_attempts(job_id), 0, -1)
            replies = await pipe.execute()
        out: list[Job | None] = []
        for i, job_id in enumerate(job_ids):
            raw, attempts = replies[2 * i], replies[2 * i + 1]
            if not raw:
                out.append(None)
                continue
            f = {_text(k): _text(v) for k, v in raw.items()}
            out.append(Job(
                id=job_id, state=f.get("state", ""), provider=f.get("provider", ""),
                event_id=f.get("event_id", ""), client_id=f.get("client_id", ""), action=f.get("action", ""),
                fields=f, attempts=[json.loads(a) for a in attempts],
            ))
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
        await self._move(self.transition_call(job_id, "retrying", fields={
            "next_attempt_at": next_attempt_at, "last_error": message, "last_error_class": reason,
        }))
