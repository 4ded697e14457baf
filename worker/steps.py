"""A job's bookkeeping on its success path in two Redis round trips: its start and its finish.

A run of a job touches four stores, each with its own scripts: the 429 block
(`worker.ratelimit`), the circuit (`worker.circuit`), the ledger (`worker.ledger`) and the
exactly-once state (`worker.store`). Called one by one they cost a round trip each. Here they
run as two scripts composed from those same scripts (`worker.lua.as_function`), so each rule
keeps one source of truth, and the order between them is the order below:

- **start** = (a first attempt: ledger `queued`, if the job is new) → 429 block → circuit allow
  → ledger `running` → store `begin` (claim + client lock) → (a provider with a rate limit: the
  job's first token from the shared bucket, if one is free at once).
  The first attempts of a change open their jobs here rather than in a round trip of their own
  before them (`worker.jobs.run_first_attempts`); a job already open is left as it is.
  A block longer than the limiter's `max_wait` stops it first (the job is parked as
  `rate_limited`: never shown running, no probe taken); a circuit that refuses stops it next
  (a job that waits on the circuit never shows as running); a ledger that shows the job
  finished (a redelivered copy) stops it before any claim is taken.
- **finish** = store `finish` → ledger `succeeded` | `skipped` → circuit `record`.
  A store that refuses (our lease ran out, or the record is another client's) stops it: the
  ledger and the circuit are left to the failure path, so `succeeded` is only ever written
  after the store's finish, in the same script.

Redis runs a script atomically, so no reader sees a state in between. A script that fails half
way keeps what it wrote before (Redis has no rollback): the same as a worker dying between two
of the separate calls, which the leases, the ledger's owner and the reaper already cover.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from worker.circuit import ALLOW_LUA, RECORD_LUA, CircuitState, Verdict, parse_verdict, recorded
from worker.ledger import FINAL, TRANSITION_LUA
from worker.lua import SLICE_LUA, as_function
from worker.ratelimit import ACQUIRE_LUA, BLOCKED_FOR_LUA
from worker.store import BEGIN_LUA, FINISH_LUA, Begin, parse_begin

log = logging.getLogger("clientsync.steps")

Call = tuple[list[str], list[Any]]

_FINAL_LUA = "local FINAL_STATES = {" + ", ".join(f"{s}=true" for s in sorted(FINAL)) + "}\n"

# KEYS: [1] rate bucket, [2] circuit, [3-5] the ledger's job keys, [6-8] the store's keys
# ARGV: [1] '1' to check the 429 block, [2] its max wait (ms), [3] BLOCKED_FOR_LUA's argument,
#       [4] '1' to ask the circuit, [5-8] ALLOW_LUA's, [9-16] TRANSITION_LUA's (running), [17-21] BEGIN_LUA's,
#       [22] '1' to open the job first, [23-30] TRANSITION_LUA's (queued, mode 'create': same job keys),
#       [31] '1' to take the job's first token with its start, [32-37] ACQUIRE_LUA's (on KEYS[1], no wait)
# -> {'blocked' | 'refused' | 'finished' | 'started', verdict, verdict wait (ms), block left (ms),
#     previous ledger state, 1 if this script opened the job (0: not asked, or it was open), then
#     when started: 1 if it took the job's first token (0: not asked, or none free at once), and
#     BEGIN_LUA's reply}
START_LUA = (SLICE_LUA + _FINAL_LUA + as_function("blocked_for", BLOCKED_FOR_LUA) + as_function("allow", ALLOW_LUA)
             + as_function("running", TRANSITION_LUA) + as_function("begin", BEGIN_LUA)
             + as_function("first_token", ACQUIRE_LUA) + """
local opened = 0
if ARGV[22] == '1' and running(slice(KEYS, 3, 3), slice(ARGV, 23, 8)) == '' then opened = 1 end
local left = 0
if ARGV[1] == '1' then
  left = blocked_for(slice(KEYS, 1, 1), slice(ARGV, 3, 1))
  if left > tonumber(ARGV[2]) then return {'blocked', '', 0, left, '', opened} end
end
local verdict, wait = 'closed', 0
if ARGV[4] == '1' then
  -- A circuit that cannot be read fails open ('unread'): it must not strand the job.
  local ok, v = pcall(allow, slice(KEYS, 2, 1), slice(ARGV, 5, 4))
  if ok then verdict, wait = v[1], v[2] else verdict = 'unread' end
  if verdict ~= 'closed' and verdict ~= 'probe' and verdict ~= 'unread' then
    return {'refused', verdict, wait, left, '', opened}
  end
end
local previous = running(slice(KEYS, 3, 3), slice(ARGV, 9, 8))
if FINAL_STATES[previous] then return {'finished', verdict, wait, left, previous, opened} end
local b = begin(slice(KEYS, 6, 3), slice(ARGV, 17, 5))
local prepaid = 0
if ARGV[31] == '1' and b[1] == 'go' then
  -- Only a token free now: a job that would wait for one asks again before its call, as before.
  if tonumber(first_token(slice(KEYS, 1, 1), slice(ARGV, 32, 6))[1]) == 1 then prepaid = 1 end
end
return {'started', verdict, wait, left, previous, opened, prepaid, unpack(b)}
""")

# KEYS: [1-3] the store's keys, [4-6] the ledger's job keys, [7-8] circuit, audit list
# ARGV: [1] '1' to finish in the store, [2-12] FINISH_LUA's, [13-20] TRANSITION_LUA's (succeeded or
#       skipped), [21] '1' to record in the circuit, [22-30] RECORD_LUA's
# -> {the store's answer ('ok', or 'lost' / 'owned:<client>': nothing else was written), then
#     RECORD_LUA's reply when recorded}
FINISH_JOB_LUA = (SLICE_LUA + as_function("finish", FINISH_LUA) + as_function("finished", TRANSITION_LUA)
                  + as_function("record", RECORD_LUA) + """
local answer = 'ok'
if ARGV[1] == '1' then
  answer = finish(slice(KEYS, 1, 3), slice(ARGV, 2, 11))
  if answer ~= 'ok' then return {answer} end
end
finished(slice(KEYS, 4, 3), slice(ARGV, 13, 8))
if ARGV[21] ~= '1' then return {answer} end
-- The job's outcome matters more than the breaker's bookkeeping: an error there is reported, not raised.
local ok, c = pcall(record, slice(KEYS, 7, 2), slice(ARGV, 22, 9))
if not ok then return {answer, 'unread'} end
return {answer, c[1], c[2], c[3]}
""")


@dataclass(frozen=True)
class Start:
    """The start script's answer."""

    status: Literal["blocked", "refused", "finished", "started"]
    #: the circuit's verdict (None: no circuit asked, stopped before it by a block, or it could not
    #: be read: a breaker that fails must not strand the job)
    verdict: Verdict | None
    #: seconds left of the provider's 429 block (0 = none)
    blocked_for: float
    #: the ledger's state before `running` ('' = none; a final one = a redelivered copy)
    previous: str
    #: the store's answer to the claim (when started)
    begin: Begin | None = None
    #: this script opened the job (`open_job` given and the job was new)
    opened: bool = False
    #: this script took the job's first token from the provider's shared bucket (`first_token`)
    prepaid: bool = False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pad(call: Call | None, n_keys: int, n_args: int) -> Call:
    """A piece's keys and arguments, or placeholders for a piece that is not run."""
    if call is None:
        return [""] * n_keys, [""] * n_args
    script_keys, args = call
    assert len(script_keys) == n_keys and len(args) == n_args, (script_keys, args)
    return script_keys, args


class JobSteps:
    """The start and finish scripts of one Redis client; see the module docstring."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._start = redis.register_script(START_LUA)
        self._finish = redis.register_script(FINISH_JOB_LUA)

    async def start(self, *, block: Call | None, max_wait: float, allow: Call | None, running: Call,
                    begin: Call, open_job: Call | None = None, first_token: Call | None = None) -> Start:
        """One round trip: `open_job` (`Ledger.open_call`, None = the job is already open), then
        `block` (`RateLimiter.blocked_for_call`, None = no limiter), `allow`
        (`CircuitBreaker.allow_call`, None = no circuit), `running` (`Ledger.transition_call`) and
        `begin` (`SyncStore.begin_call`), in that order, each only if the one before let the job go
        (the job is opened whatever comes after); and, once the claim is the job's, `first_token`
        (`RateLimiter.first_token_call`, None = no limit) if one is free at once: the job's
        first call then makes no round trip of its own to the bucket."""
        block_keys, block_args = _pad(block, 1, 1)
        allow_keys, allow_args = _pad(allow, 1, 4)
        running_keys, running_args = _pad(running, 3, 8)
        begin_keys, begin_args = _pad(begin, 3, 5)
        open_keys, open_args = _pad(open_job, 3, 8)
        assert open_job is None or open_keys == running_keys, "a job is opened on the keys it runs on"
        token_keys, token_args = _pad(first_token, 1, 6)
        assert first_token is None or token_keys == block_keys, "the first token is taken from the bucket read"
        raw = await self._start(
            keys=[*block_keys, *allow_keys, *running_keys, *begin_keys],
            args=["1" if block else "0", int(max_wait * 1000), *block_args, "1" if allow else "0", *allow_args,
                  *running_args, *begin_args, "1" if open_job else "0", *open_args,
                  "1" if first_token else "0", *token_args],
        )
        status = _text(raw[0])
        assert status in ("blocked", "refused", "finished", "started")
        verdict = None
        if allow is not None and status != "blocked":
            if _text(raw[1]) == "unread":
                log.warning("circuit check failed for %s; going ahead", allow[0][0])
            else:
                verdict = parse_verdict(raw[1:3])
        return Start(status, verdict, int(raw[3]) / 1000, _text(raw[4]),  # type: ignore[arg-type]
                     parse_begin(raw[7:]) if status == "started" else None, opened=int(raw[5]) == 1,
                     prepaid=status == "started" and int(raw[6]) == 1)

    async def finish(self, provider: str, *, store: Call | None, ledger: Call,
                     circuit: Call | None) -> tuple[str, CircuitState | None]:
        """One round trip: `store` (`SyncStore.finish_call`; None = nothing to finish there, e.g.
        a completed key answered), `ledger` (`Ledger.transition_call`) and `circuit`
        (`CircuitBreaker.record_call`, None = no circuit). Returns the store's answer ('ok',
        'lost', 'owned:<client>'; only 'ok' wrote the rest) and the circuit's state after it."""
        store_keys, store_args = _pad(store, 3, 11)
        ledger_keys, ledger_args = _pad(ledger, 3, 8)
        circuit_keys, circuit_args = _pad(circuit, 2, 9)
        raw = await self._finish(
            keys=[*store_keys, *ledger_keys, *circuit_keys],
            args=["1" if store else "0", *store_args, *ledger_args, "1" if circuit else "0", *circuit_args],
        )
        answer = _text(raw[0])
        if len(raw) < 2:
            return answer, None
        if _text(raw[1]) == "unread":
            log.warning("circuit bookkeeping failed for %s", provider)
            return answer, None
        return answer, recorded(provider, raw[1:4])
