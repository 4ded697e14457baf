"""A per-provider circuit breaker in Redis, shared by every worker process on every host.

closed ──(N consecutive transient failures)──► open ──(cool-down over)──► half_open
  ▲                                              ▲                           │ one job wins the probe
  └───────────────(probe succeeds)───────────────┼───(probe fails: cool-down doubled, capped)

While open, jobs do not call the provider: the task layer parks them until `reopen_at`
without spending an attempt. When the cool-down is over, `allow` hands the probe to exactly
one caller (the Lua script decides, so two workers never both probe); everyone else waits a
little and looks again. A probe holder that vanishes loses the probe after its lease.
Any success closes the circuit; a failure while half-open reopens it for twice as long.

Two states stop a provider until something changes, whatever the time:

- `auth_failed`: a call was refused for its credentials (401/403). Jobs wait (no attempt
  spent, no call made) until the configured credentials change — each job passes a
  fingerprint of them, and a new fingerprint gets one probe — or an operator resumes.
- `paused`: an operator paused the provider; only `resume` (or `probe`) lets calls through.

Operator controls (`operate`): `pause`, `resume` (closed, counters reset) and `probe` (the
next job probes now: an open, auth-failed or paused circuit turns half-open). Each one, and
each entry into `auth_failed`, is appended to the audit list `keys.AUDIT`.

The probe lease follows the provider's call timeout (`allow(..., call_timeout=)`): a probe
holder that died is replaced within that, not after a fixed two minutes.

Each operation is one Lua script (one round trip) on Redis's own clock (`TIME`).

Hash `keys.circuit(provider)`; fields (stable: the monitor reads them):

- `state`: `closed` | `open` | `half_open` | `auth_failed` | `paused` (no hash at all = closed, never failed)
- `failures`: consecutive transient failures (reset by a success)
- `opened_at`: unix seconds the circuit last opened (kept after it closes, as history)
- `reopen_at`: unix seconds when the next probe is allowed (meaningful while open)
- `cooldown`: seconds of the current (last) open period
- `opens`: how many times it opened since the last success
- `probe`, `probe_until`: the probing job's token and the unix seconds its probe lease ends
- `auth_fp`: fingerprint of the credentials that were refused (while `auth_failed`)
- `paused_by`: who paused it (while `paused`)
- `updated_at`: unix seconds of the last change
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, SecretStr

from worker import keys
from worker.errors import TransientError
from worker.lua import NOW_LUA

log = logging.getLogger("clientsync.circuit")

Outcome = Literal["success", "failure", "neutral", "auth"]
Action = Literal["pause", "resume", "probe"]
ACTIONS: tuple[Action, ...] = ("pause", "resume", "probe")
#: a probe's lease is the provider's call timeout plus this (the probe's own bookkeeping)
PROBE_MARGIN_SECONDS = 2.0

_NOW = NOW_LUA + """
local function ms(v) return math.floor((tonumber(v) or 0) * 1000 + 0.5) end
"""

# KEYS[1] circuit; ARGV: token, lease_ms, now_ms ('' = Redis time), credentials fingerprint ('' = unknown)
# -> {verdict ('closed' | 'probe' | 'open' | 'half_open' | 'auth_failed' | 'paused'), wait_ms}
ALLOW_LUA = _NOW + """
local st = redis.call('HGET', KEYS[1], 'state')
if not st or st == 'closed' then return {'closed', 0} end
if st == 'paused' then return {'paused', 0} end
local token, lease, now = ARGV[1], tonumber(ARGV[2]), now_ms(ARGV[3])
if st == 'auth_failed' then
  -- the same credentials would be refused again; new ones get one probe (below)
  if ARGV[4] == '' or redis.call('HGET', KEYS[1], 'auth_fp') == ARGV[4] then return {'auth_failed', 0} end
end
local c = redis.call('HMGET', KEYS[1], 'reopen_at', 'probe', 'probe_until')
if st == 'open' then
  local reopen = ms(c[1])
  if now < reopen then return {'open', reopen - now} end
elseif c[2] and c[2] ~= '' and c[2] ~= token and ms(c[3]) > now then
  return {'half_open', ms(c[3]) - now}
end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe', token, 'probe_until', (now + lease) / 1000,
           'updated_at', now / 1000)
return {'probe', 0}
"""

# KEYS[1] circuit, KEYS[2] audit list; ARGV: token, outcome, threshold, cooldown_ms, max_cooldown_ms,
# now_ms ('' = Redis time), credentials fingerprint, audit entry (JSON, for an auth failure), audit max
# -> {state, wait_ms until a probe (0 unless open), 1 if this call opened it}
RECORD_LUA = _NOW + """
local token, outcome = ARGV[1], ARGV[2]
local threshold, base, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms(ARGV[6])
local c = redis.call('HMGET', KEYS[1], 'state', 'failures', 'cooldown', 'reopen_at', 'probe', 'auth_fp')
local st = c[1] or 'closed'
-- only an operator ends a pause: outcomes of jobs that were already running change nothing
if st == 'paused' then return {'paused', 0, 0} end
if outcome == 'auth' then
  if st == 'auth_failed' and c[6] == ARGV[7] then return {'auth_failed', 0, 0} end
  redis.call('HSET', KEYS[1], 'state', 'auth_failed', 'auth_fp', ARGV[7], 'failures', 0,
             'opened_at', now / 1000, 'updated_at', now / 1000)
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until', 'reopen_at')
  local entry = cjson.decode(ARGV[8])
  entry['at'] = now / 1000
  redis.call('LPUSH', KEYS[2], cjson.encode(entry))
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[9]) - 1)
  return {'auth_failed', 0, 1}
end
if outcome == 'success' then
  if st ~= 'closed' or (tonumber(c[2]) or 0) ~= 0 then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'opens', 0, 'updated_at', now / 1000)
    redis.call('HDEL', KEYS[1], 'probe', 'probe_until', 'auth_fp')
  end
  return {'closed', 0, 0}
end
if outcome == 'neutral' then
  -- a probe that never reached the provider hands the probe to the next job
  if st == 'half_open' and c[5] == token then redis.call('HDEL', KEYS[1], 'probe', 'probe_until') end
  if st == 'open' then return {'open', math.max(0, ms(c[4]) - now), 0} end
  return {st, 0, 0}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local cooldown
if st == 'half_open' then
  cooldown = math.min(cap, math.max(base, ms(c[3]) * 2))
elseif st == 'closed' and failures >= threshold then
  cooldown = base
end
if cooldown then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now / 1000, 'reopen_at', (now + cooldown) / 1000,
             'cooldown', cooldown / 1000, 'updated_at', now / 1000)
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
  return {'open', cooldown, 1}
end
if st == 'open' then return {'open', math.max(0, ms(c[4]) - now), 0} end
redis.call('HSET', KEYS[1], 'state', st, 'updated_at', now / 1000)
return {st, 0, 0}
"""

# KEYS[1] circuit, KEYS[2] audit list; ARGV: action, audit entry (JSON), audit max
# -> {state before, state after}
_OPERATE = _NOW + """
local now = now_ms('')
local before = redis.call('HGET', KEYS[1], 'state') or 'closed'
local after = before
local action = ARGV[1]
if action == 'pause' then
  after = 'paused'
  redis.call('HSET', KEYS[1], 'state', 'paused', 'paused_by', cjson.decode(ARGV[2])['actor'] or '',
             'updated_at', now / 1000)
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
elseif action == 'resume' then
  after = 'closed'
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'opens', 0, 'updated_at', now / 1000)
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until', 'auth_fp', 'paused_by', 'reopen_at')
elseif before ~= 'closed' then
  -- probe now: the next job (whichever worker) takes the probe at once
  after = 'half_open'
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'reopen_at', now / 1000, 'updated_at', now / 1000)
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until', 'paused_by')
end
local entry = cjson.decode(ARGV[2])
entry['at'] = now / 1000
entry['before'] = before
entry['after'] = after
redis.call('LPUSH', KEYS[2], cjson.encode(entry))
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
return {before, after}
"""


class CircuitOpen(TransientError):
    """The provider's circuit is open (or another job is probing it): no call was made."""

    kind = "circuit_open"


@dataclass(frozen=True)
class Verdict:
    """`allow`'s answer: go (closed or probe), or wait `wait` seconds."""

    state: Literal["closed", "probe", "open", "half_open", "auth_failed", "paused"]
    wait: float = 0.0

    @property
    def go(self) -> bool:
        return self.state in ("closed", "probe")

    @property
    def held(self) -> bool:
        """Stopped until credentials change or an operator acts (no end time)."""
        return self.state in ("auth_failed", "paused")


@dataclass(frozen=True)
class CircuitState:
    """`record`'s answer: the state after it, and seconds until a probe if open."""

    state: str
    wait: float = 0.0
    opened: bool = False  # this record opened (or reopened) the circuit


class CircuitBreaker:
    """Shared per-provider circuits; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, threshold: int, cooldown: float, max_cooldown: float,
                 probe_lease: float) -> None:
        self.redis = redis
        self.threshold = threshold
        self.cooldown = cooldown
        self.max_cooldown = max(max_cooldown, cooldown)
        self.probe_lease = probe_lease
        self._allow = redis.register_script(ALLOW_LUA)
        self._record = redis.register_script(RECORD_LUA)

    def lease_for(self, call_timeout: float | None) -> float:
        """The probe lease: the provider's call timeout plus a margin, capped by the configured lease."""
        if call_timeout is None:
            return self.probe_lease
        return min(self.probe_lease, call_timeout + PROBE_MARGIN_SECONDS)

    def allow_call(self, provider: str, token: str, *, now_ms: int | None = None, call_timeout: float | None = None,
                   fingerprint: str = "") -> tuple[list[str], list[Any]]:
        """`allow`'s keys and arguments (also a piece of the job's start script, `worker.steps`)."""
        return ([keys.circuit(provider)],
                [token, int(self.lease_for(call_timeout) * 1000), "" if now_ms is None else now_ms, fingerprint])

    async def allow(self, provider: str, token: str, *, now_ms: int | None = None,
                    call_timeout: float | None = None, fingerprint: str = "") -> Verdict:
        """May the job holding `token` call `provider` now? One round trip.

        `fingerprint` identifies the credentials the job would use (see `credentials_fingerprint`).
        """
        script_keys, args = self.allow_call(provider, token, now_ms=now_ms, call_timeout=call_timeout,
                                            fingerprint=fingerprint)
        return parse_verdict(await self._allow(keys=script_keys, args=args))

    def record_call(self, provider: str, token: str, outcome: Outcome, *, now_ms: int | None = None,
                    fingerprint: str = "") -> tuple[list[str], list[Any]]:
        """`record`'s keys and arguments (also a piece of the job's finish script, `worker.steps`)."""
        entry = json.dumps({"provider": provider, "action": "auth_failed", "actor": "worker",
                            "note": "the provider refused the credentials (401/403); jobs wait"})
        return ([keys.circuit(provider), keys.AUDIT],
                [token, outcome, self.threshold, int(self.cooldown * 1000), int(self.max_cooldown * 1000),
                 "" if now_ms is None else now_ms, fingerprint, entry, keys.AUDIT_MAX])

    async def record(self, provider: str, token: str, outcome: Outcome, *,
                     now_ms: int | None = None, fingerprint: str = "") -> CircuitState:
        """Record one job's outcome at `provider`: a success, a transient failure, an auth
        failure (with the refused credentials' fingerprint), or neutral (no call reached the
        provider: releases a probe the job held)."""
        script_keys, args = self.record_call(provider, token, outcome, now_ms=now_ms, fingerprint=fingerprint)
        return recorded(provider, await self._record(keys=script_keys, args=args))


def parse_verdict(raw: Any) -> Verdict:
    """`ALLOW_LUA`'s reply as a `Verdict`."""
    verdict, wait = raw
    state = _text(verdict)
    assert state in ("closed", "probe", "open", "half_open", "auth_failed", "paused")
    return Verdict(state, int(wait) / 1000)  # type: ignore[arg-type]


def recorded(provider: str, raw: Any) -> CircuitState:
    """`RECORD_LUA`'s reply as a `CircuitState` (an opening is logged)."""
    state, wait, opened = raw
    result = CircuitState(_text(state), int(wait) / 1000, bool(int(opened)))
    if result.opened and result.state == "auth_failed":
        log.error("circuit for %s: credentials refused; its jobs wait until they change or an operator "
                  "resumes", provider)
    elif result.opened:
        log.warning("circuit for %s opened for %.1fs", provider, result.wait)
    return result


def credentials_fingerprint(config: BaseModel) -> str:
    """A short digest of a provider's URL and secrets: changes when an operator fixes them."""
    digest = hashlib.sha256()
    for name in sorted(type(config).model_fields):
        value = getattr(config, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif name != "url":
            continue
        digest.update(f"{name}={value}\x1f".encode())
    return digest.hexdigest()[:16]


async def operate(redis: aioredis.Redis, provider: str, action: Action, *, actor: str = "operator",
                  note: str = "") -> dict[str, Any]:
    """Pause, resume or probe `provider` now; recorded in `keys.AUDIT`. One round trip."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    entry = json.dumps({"provider": provider, "action": action, "actor": actor, "note": note})
    before, after = await redis.eval(_OPERATE, 2, keys.circuit(provider), keys.AUDIT, action, entry, keys.AUDIT_MAX)
    log.warning("operator %s: %s %s (%s -> %s)", actor, action, provider, _text(before), _text(after))
    return {"provider": provider, "action": action, "before": _text(before), "after": _text(after)}


async def audit(redis: aioredis.Redis, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest operator actions and automatic pauses, newest first."""
    out: list[dict[str, Any]] = []
    for raw in await redis.lrange(keys.AUDIT, 0, limit - 1):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, Mapping):
            out.append(dict(entry))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

