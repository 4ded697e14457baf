"""A per-provider circuit breaker in Redis, shared by every worker process on every host.

closed ──(N consecutive transient failures)──► open ──(cool-down over)──► half_open
  ▲                                              ▲                           │ one job wins the probe
  └───────────────(probe succeeds)───────────────┼───(probe fails: cool-down doubled, capped)

While open, jobs do not call the provider: the task layer parks them until `reopen_at`
without spending an attempt. When the cool-down is over, `allow` hands the probe to exactly
one caller (the Lua script decides, so two workers never both probe); everyone else waits a
little and looks again. A probe holder that vanishes loses the probe after its lease.
Any success closes the circuit; a failure while half-open reopens it for twice as long.

Each operation is one Lua script (one round trip) on Redis's own clock (`TIME`).

Hash `keys.circuit(provider)`; fields (stable: the monitor reads them):

- `state`: `closed` | `open` | `half_open` (no hash at all = closed, never failed)
- `failures`: consecutive transient failures (reset by a success)
- `opened_at`: unix seconds the circuit last opened (kept after it closes, as history)
- `reopen_at`: unix seconds when the next probe is allowed (meaningful while open)
- `cooldown`: seconds of the current (last) open period
- `opens`: how many times it opened since the last success
- `probe`, `probe_until`: the probing job's token and the unix seconds its probe lease ends
- `updated_at`: unix seconds of the last change
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from worker import keys
from worker.errors import TransientError
from worker.lua import NOW_LUA

log = logging.getLogger("clientsync.circuit")

Outcome = Literal["success", "failure", "neutral"]

_NOW = NOW_LUA + """
local function ms(v) return math.floor((tonumber(v) or 0) * 1000 + 0.5) end
"""

# KEYS[1] circuit; ARGV: token, lease_ms, now_ms ('' = Redis time)
# -> {verdict ('closed' | 'probe' | 'open' | 'half_open'), wait_ms}
_ALLOW = _NOW + """
local st = redis.call('HGET', KEYS[1], 'state')
if not st or st == 'closed' then return {'closed', 0} end
local token, lease, now = ARGV[1], tonumber(ARGV[2]), now_ms(ARGV[3])
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

# KEYS[1] circuit; ARGV: token, outcome, threshold, cooldown_ms, max_cooldown_ms, now_ms ('' = Redis time)
# -> {state, wait_ms until a probe (0 unless open), 1 if this call opened it}
_RECORD = _NOW + """
local token, outcome = ARGV[1], ARGV[2]
local threshold, base, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms(ARGV[6])
local c = redis.call('HMGET', KEYS[1], 'state', 'failures', 'cooldown', 'reopen_at', 'probe')
local st = c[1] or 'closed'
if outcome == 'success' then
  if st ~= 'closed' or (tonumber(c[2]) or 0) ~= 0 then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'opens', 0, 'updated_at', now / 1000)
    redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
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


class CircuitOpen(TransientError):
    """The provider's circuit is open (or another job is probing it): no call was made."""

    kind = "circuit_open"


@dataclass(frozen=True)
class Verdict:
    """`allow`'s answer: go (closed or probe), or wait `wait` seconds."""

    state: Literal["closed", "probe", "open", "half_open"]
    wait: float = 0.0

    @property
    def go(self) -> bool:
        return self.state in ("closed", "probe")


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
        self._allow = redis.register_script(_ALLOW)
        self._record = redis.register_script(_RECORD)

    async def allow(self, provider: str, token: str, *, now_ms: int | None = None) -> Verdict:
        """May the job holding `token` call `provider` now? One round trip."""
        verdict, wait = await self._allow(
            keys=[keys.circuit(provider)],
            args=[token, int(self.probe_lease * 1000), "" if now_ms is None else now_ms],
        )
        state = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        assert state in ("closed", "probe", "open", "half_open")
        return Verdict(state, int(wait) / 1000)  # type: ignore[arg-type]

    async def record(self, provider: str, token: str, outcome: Outcome, *,
                     now_ms: int | None = None) -> CircuitState:
        """Record one job's outcome at `provider`: a success, a transient failure, or neutral
        (no call reached the provider: releases a probe the job held)."""
        state, wait, opened = await self._record(
            keys=[keys.circuit(provider)],
            args=[token, outcome, self.threshold, int(self.cooldown * 1000), int(self.max_cooldown * 1000),
                  "" if now_ms is None else now_ms],
        )
        result = CircuitState(state.decode() if isinstance(state, bytes) else str(state), int(wait) / 1000,
                              bool(int(opened)))
        if result.opened:
            log.warning("circuit for %s opened for %.1fs", provider, result.wait)
        return result
