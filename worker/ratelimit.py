"""A per-provider token bucket in Redis, shared by every worker process on every host.

Each operation is one Lua script (one round trip) and reads Redis's own clock (`TIME`), so
workers on hosts whose clocks disagree still share one notion of "now".

The bucket holds at most `burst` tokens (a tenth of the limit) and refills at
`(limit - burst) / period`: in any window of `period` seconds at most `burst + (limit - burst)`
= `limit` calls start, whether the provider counts in fixed or sliding windows. (A bucket of
`limit` tokens refilled at `limit / period` would allow twice the limit in some windows.)

`acquire` takes a token for one provider call. A call that can start within `max_wait`
reserves its token and sleeps until its turn (tokens may go negative: calls booked ahead);
a longer wait takes nothing and raises `BucketEmpty`, a `RateLimitedError` whose
`retry_after` is the wait, so the task layer parks the job without spending an attempt.
`block` records a provider's own 429 `Retry-After`: no call to that provider starts before
it ends, from any worker, and the bucket restarts empty so the backlog does not burst.

`before_call` is what every provider call awaits. A provider with a limit takes a token from
the shared bucket (`acquire`, one round trip per call: the bucket is only right if every call
is counted), except the job's first call when its start script already took a token free at
once (`first_token_call`, `prepaid`): that one is counted there, not twice. A job that then makes
no call leaves its token unspent, so the bucket errs on the side of fewer calls. A provider
without one has nothing to count, only 429 blocks to honour, so it makes no round trip per call:
each job reads the block once, in its start script (`worker.steps`, `BLOCKED_FOR_LUA`), and a
job that meets a block longer than `max_wait` is parked before it starts. What a start read (or
this process's own `block`) learns is kept for the whole process (`learn_block`), so a job already
past its start stops before its next call as soon as any job of its process has started since
the block (or hit the 429 itself).

Hash `keys.rate_bucket(provider)`; fields (stable: the monitor reads them):

- `limit`, `period`: the configured limit, `limit` calls per `period` seconds (0 = no limit:
  only 429 blocks apply)
- `burst`: the bucket's capacity (calls that may start at once)
- `tokens`: tokens left at `tokens_at` (a float; negative = calls already booked ahead)
- `tokens_at`: unix seconds at which `tokens` was counted (may be in the future after a block)
- `blocked_until`: unix seconds before which no call may start (a 429's Retry-After), 0 = never
- `blocks`: how many 429 blocks were recorded (a counter)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from worker import keys
from worker.errors import RateLimitedError
from worker.lua import NOW_LUA
from worker.providers.base import ProviderConfig

log = logging.getLogger("clientsync.ratelimit")

#: published limits of hosted services whose adapter config does not declare one:
#: name -> (hosted domain, calls, per seconds). They apply when the URL is unset or on that
#: domain; a self-hosted instance has no published limit. `CLIENTSYNC_<PROVIDER>_RATE_LIMIT`
#: / `_RATE_PERIOD` override either way.
#: Invoice Ninja hosted: 500 requests per minute per IP; self-hosted: unlimited
#: (app/Providers/RouteServiceProvider.php, see shared/PROVIDERS.md).
DEFAULT_LIMITS: dict[str, tuple[str, int, float]] = {
    "invoice_ninja": ("invoicing.co", 500, 60.0),
}


# KEYS[1] bucket; ARGV: limit, period_ms, burst, refill per period, max_wait_ms, now_ms ('' = Redis time)
# -> {granted (1|0), wait_ms, blocked_until_ms}
# (also a piece of the job's start script, `worker.steps`, which takes a job's first token with
# its start when one is free at once)
ACQUIRE_LUA = NOW_LUA + """
local limit, period, burst, refill = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_wait = tonumber(ARGV[5])
local now = now_ms(ARGV[6])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'tokens_at', 'blocked_until')
local blocked = math.floor((tonumber(b[3]) or 0) * 1000 + 0.5)
local start = math.max(now, blocked)
if limit <= 0 then
  local wait = start - now
  return {wait <= max_wait and 1 or 0, wait, blocked}
end
local rate = refill / period
local tokens = tonumber(b[1]) or burst
local ts = b[2] and math.floor(tonumber(b[2]) * 1000 + 0.5) or now
if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate); ts = now end
local ready = start
if math.min(burst, tokens + math.max(0, start - ts) * rate) < 1 then
  ready = math.max(start, ts + (1 - tokens) / rate)
end
local wait = math.ceil(ready - now)
local granted = 0
if wait <= max_wait then tokens = tokens - 1; granted = 1 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'tokens_at', ts / 1000, 'limit', limit, 'period', period / 1000,
           'burst', burst)
return {granted, wait, blocked}
"""

#: tokens a job's start script already took, by provider (set around the job's run by
#: `worker.jobs.run_job`): `before_call` spends them before it asks the bucket again
prepaid: ContextVar[dict[str, int] | None] = ContextVar("prepaid", default=None)

# KEYS[1] bucket; ARGV: block_ms, now_ms ('' = Redis time) -> blocked_until_ms
_BLOCK = NOW_LUA + """
local now = now_ms(ARGV[2])
local untl = now + tonumber(ARGV[1])
local cur = math.floor((tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0) * 1000 + 0.5)
if untl > cur then
  redis.call('HSET', KEYS[1], 'blocked_until', untl / 1000, 'tokens', 0, 'tokens_at', untl / 1000)
  redis.call('HINCRBY', KEYS[1], 'blocks', 1)
  return untl
end
return cur
"""

# KEYS[1] bucket; ARGV: now_ms ('' = Redis time) -> ms left of a block (0 = none)
BLOCKED_FOR_LUA = NOW_LUA + """
local now = now_ms(ARGV[1])
local b = math.floor((tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0) * 1000 + 0.5)
return math.max(0, b - now)
"""


class BucketEmpty(RateLimitedError):
    """Our shared bucket (or a provider's 429 block) has no call for this job soon: no call was made."""

    kind = "rate_limited"
    sent = False


@dataclass(frozen=True)
class Limit:
    """`calls` per `period` seconds; `calls=None` = no limit (429 blocks still apply)."""

    calls: int | None
    period: float

    @property
    def burst(self) -> int:
        """Calls that may start at once: a tenth of the limit (at least one)."""
        return max(1, (self.calls or 0) // 10)

    @property
    def refill(self) -> int:
        """Tokens added per period, so that no window of `period` holds more than `calls`."""
        calls = self.calls or 0
        return calls - self.burst if calls > self.burst else calls


def limit_for(name: str, config: ProviderConfig) -> Limit:
    """The provider's limit: its env/config where set, else `DEFAULT_LIMITS`, field by field."""
    hosted = DEFAULT_LIMITS.get(name)
    host = urlsplit(config.url).hostname or "" if config.url else None
    if hosted and host is not None and host != hosted[0] and not host.endswith("." + hosted[0]):
        hosted = None  # self-hosted: no published limit
    calls = config.rate_limit if config.rate_limit is not None else (hosted[1] if hosted else None)
    period = hosted[2] if hosted and "rate_period" not in config.model_fields_set else config.rate_period
    return Limit(calls, period)


@dataclass(frozen=True)
class Grant:
    granted: bool
    wait: float  # seconds until this call may start (0 = now)
    blocked_until_ms: int


class RateLimiter:
    """Shared per-provider token buckets; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, limits: Mapping[str, Limit], *, max_wait: float) -> None:
        self.redis = redis
        self.limits = dict(limits)
        self.max_wait = max_wait
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._block = redis.register_script(_BLOCK)
        self._blocked_for = redis.register_script(BLOCKED_FOR_LUA)
        #: provider -> `time.monotonic()` at which the latest 429 block this process knows of ends
        self._known_blocks: dict[str, float] = {}

    def has_limit(self, provider: str) -> bool:
        """Whether calls to `provider` are counted in a shared bucket (else only 429 blocks apply)."""
        return bool(self.limits.get(provider, Limit(None, 1.0)).calls)

    async def before_call(self, provider: str) -> None:
        """Before each call: a token from the shared bucket where `provider` has a limit (one the
        job's start script took, `prepaid`, first, unless this process knows of a 429 block since:
        then the bucket is asked, which waits it out); else wait out (or, if it is far off, raise
        `BucketEmpty` for) a 429 block this process knows of."""
        if self.has_limit(provider):
            held = prepaid.get()
            if held and held.get(provider, 0) > 0 and self._known_blocks.get(provider, 0.0) <= time.monotonic():
                held[provider] -= 1
                return
            await self.acquire(provider)
            return
        waited = 0.0
        while (left := self._known_blocks.get(provider, 0.0) - time.monotonic()) > 0:
            if waited + left > self.max_wait:
                raise BucketEmpty(f"{provider} asked to wait {left:.1f}s (429)", provider=provider, retry_after=left)
            await asyncio.sleep(left)
            waited += left

    def learn_block(self, provider: str, seconds: float) -> None:
        """A 429 block of `seconds` from now (read from Redis, or recorded here): this process's
        jobs honour it before their next call to `provider`."""
        if seconds > 0:
            until = time.monotonic() + seconds
            if until > self._known_blocks.get(provider, 0.0):
                self._known_blocks[provider] = until

    def acquire_call(self, provider: str, *, max_wait: float, now_ms: int | None = None
                     ) -> tuple[list[str], list[Any]]:
        """`ACQUIRE_LUA`'s keys and arguments: a token if the call can start within `max_wait`."""
        limit = self.limits.get(provider, Limit(None, 1.0))
        return [keys.rate_bucket(provider)], [limit.calls or 0, int(limit.period * 1000), limit.burst, limit.refill,
                                              int(max_wait * 1000), "" if now_ms is None else now_ms]

    def first_token_call(self, provider: str) -> tuple[list[str], list[Any]] | None:
        """A token free at once (no wait), as a piece of the job's start script; None where
        `provider` has no limit (nothing to count)."""
        return self.acquire_call(provider, max_wait=0) if self.has_limit(provider) else None

    def blocked_for_call(self, provider: str, *, now_ms: int | None = None) -> tuple[list[str], list[Any]]:
        """`blocked_for`'s keys and arguments (also a piece of the job's start script, `worker.steps`)."""
        return [keys.rate_bucket(provider)], ["" if now_ms is None else now_ms]

    async def try_acquire(self, provider: str, *, max_wait: float | None = None,
                          now_ms: int | None = None) -> Grant:
        """One round trip: reserve a token if the call can start within `max_wait`."""
        script_keys, args = self.acquire_call(provider, max_wait=self.max_wait if max_wait is None else max_wait,
                                              now_ms=now_ms)
        granted, wait, blocked = await self._acquire(keys=script_keys, args=args)
        return Grant(bool(int(granted)), int(wait) / 1000, int(blocked))

    async def acquire(self, provider: str) -> None:
        """Wait for this provider's next call slot, or raise `BucketEmpty` if it is far off."""
        grant = await self.try_acquire(provider)
        if not grant.granted:
            raise BucketEmpty(f"rate limit: next call slot at {provider} in {grant.wait:.1f}s",
                              provider=provider, retry_after=grant.wait)
        waited = 0.0
        if grant.wait > 0:
            await asyncio.sleep(grant.wait)
            waited = grant.wait
        # Another job's 429 may have blocked the provider while this one slept for its slot.
        while waited > 0:
            left = await self.blocked_for(provider)
            if left <= 0:
                return
            if waited + left > self.max_wait:
                raise BucketEmpty(f"{provider} asked to wait {left:.1f}s (429)", provider=provider,
                                  retry_after=left)
            await asyncio.sleep(left)
            waited += left

    async def block(self, provider: str, seconds: float, *, now_ms: int | None = None) -> int:
        """No call to `provider` starts for `seconds` (a 429's Retry-After); returns the end (ms)."""
        until = await self._block(keys=[keys.rate_bucket(provider)],
                                  args=[max(0, math.ceil(seconds * 1000)), "" if now_ms is None else now_ms])
        if now_ms is None:  # (a pinned clock is a test's Redis-side check, not this process's)
            self.learn_block(provider, seconds)
        log.info("rate limit: %s blocked for %.1fs by its 429", provider, seconds)
        return int(until)

    async def blocked_for(self, provider: str, *, now_ms: int | None = None) -> float:
        """Seconds left of a 429 block on `provider` (0 = none)."""
        left = await self._blocked_for(keys=[keys.rate_bucket(provider)],
                                       args=["" if now_ms is None else now_ms])
        return int(left) / 1000
