"""Exactly-once state in Redis: idempotency keys, client links, order marks, intents, locks.

Each operation is one Lua script, so each is atomic and one round trip:

- `begin`: claim the job's idempotency key (Stripe semantics: a completed key returns its
  stored outcome, a different payload is a conflict, a live claim by another worker is
  in flight) and take the per-(provider, client) lock, then return the client's state.
- `mark_intent`: record that a create is about to be sent (only while holding the lock).
- `finish`: store the outcome, update link/mark/tombstone, release the lock.
- `abort`: release the claim and the lock after a failure, so a retry or replay can run.

A claim and a lock are leases: a worker that dies holding them loses them when the lease
runs out, and the next attempt takes over (seeing `takeover=True`). Both are measured on
Redis's clock (`TIME`), so workers whose clocks disagree still agree on who holds what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from worker import keys
from worker.lua import NOW_LUA

_BEGIN = NOW_LUA + """
local idem, state, lock = KEYS[1], KEYS[2], KEYS[3]
local fp, owner, now, lease, ttl = ARGV[1], ARGV[2], now_ms(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cur = redis.call('HMGET', idem, 'status', 'fp', 'owner', 'lease', 'outcome')
local takeover = 0
if cur[1] then
  if cur[2] ~= fp then return {'conflict', cur[2]} end
  if cur[1] == 'done' then return {'done', cur[5]} end
  if cur[1] == 'running' and cur[3] ~= owner then
    if tonumber(cur[4]) > now then return {'inflight', tostring(tonumber(cur[4]) - now)} end
    takeover = 1
  end
end
local holder = redis.call('GET', lock)
if holder and holder ~= owner then
  return {'locked', tostring(redis.call('PTTL', lock))}
end
redis.call('SET', lock, owner, 'PX', lease)
redis.call('HSET', idem, 'status', 'running', 'fp', fp, 'owner', owner, 'lease', now + lease)
redis.call('HINCRBY', idem, 'attempts', 1)
redis.call('EXPIRE', idem, ttl)
local s = redis.call('HMGET', state, 'link', 'mark_v', 'mark_t', 'deleted', 'intent')
return {'go', tostring(takeover), s[1] or '', s[2] or '', s[3] or '', s[4] or '', s[5] or ''}
"""

# KEYS: client state, client lock, idempotency; ARGV: owner, intent, lease_ms, now_ms ('' = Redis time)
# Renews both leases: the create that follows gets a whole lease, however long `find` took.
_MARK_INTENT = NOW_LUA + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'intent', ARGV[2])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
if redis.call('HGET', KEYS[3], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[3], 'lease', now_ms(ARGV[4]) + tonumber(ARGV[3]))
end
return 1
"""

# ARGV: owner, outcome, link_op ('keep'|'set'|'del'), link, mark_v, mark_t, deleted ('0'|'1'|''), ttl
_FINISH = """
local idem, state, lock = KEYS[1], KEYS[2], KEYS[3]
local owner = ARGV[1]
-- Both the claim and the client lock must still be ours: after a lease ran out, another run
-- may be working on this client, and our link or mark must not land over its work.
if redis.call('HGET', idem, 'owner') ~= owner or redis.call('GET', lock) ~= owner then return 0 end
redis.call('HSET', idem, 'status', 'done', 'outcome', ARGV[2])
redis.call('HDEL', idem, 'owner', 'lease')
redis.call('EXPIRE', idem, tonumber(ARGV[8]))
if ARGV[3] == 'set' then redis.call('HSET', state, 'link', ARGV[4])
elseif ARGV[3] == 'del' then redis.call('HDEL', state, 'link') end
if ARGV[5] ~= '' or ARGV[6] ~= '' then
  redis.call('HSET', state, 'mark_v', ARGV[5], 'mark_t', ARGV[6])
end
if ARGV[7] ~= '' then redis.call('HSET', state, 'deleted', ARGV[7]) end
-- The intent is answered only by a link set (created, adopted) or removed (deleted); a
-- skipped change (stale, unsupported) must leave it for the retry of the create it guards.
if ARGV[3] ~= 'keep' then redis.call('HDEL', state, 'intent') end
redis.call('DEL', lock)
return 1
"""

_ABORT = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', 'failed')
  redis.call('HDEL', KEYS[1], 'owner', 'lease')
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


@dataclass(frozen=True)
class ClientState:
    """What clientsync knows of one client at one provider."""

    link: str | None
    mark_version: int | None
    mark_micros: int | None
    deleted: bool
    intent: str | None
    #: a previous holder's claim expired: it may have crashed mid-call
    takeover: bool = False

    def supersedes(self, mark: tuple[int, int], *, upsert: bool) -> bool:
        """True if a change at `mark` must be skipped as stale: older, or an upsert that ties a delete."""
        order = self._compare(mark)
        return order > 0 or (order == 0 and upsert and self.deleted)

    def _compare(self, mark: tuple[int, int]) -> int:
        """1 if the applied mark is newer than `mark`, 0 on a tie, -1 if older (version wins when both have one)."""
        version, micros = mark
        if self.mark_micros is None:
            return -1
        if version >= 0 and self.mark_version is not None and self.mark_version >= 0:
            return (self.mark_version > version) - (self.mark_version < version)
        return (self.mark_micros > micros) - (self.mark_micros < micros)


@dataclass(frozen=True)
class Begin:
    """The answer of `SyncStore.begin`."""

    status: Literal["go", "done", "conflict", "inflight", "locked"]
    state: ClientState | None = None
    outcome: dict[str, Any] | None = None
    wait_seconds: float = 0.0


def _int_or_none(value: str) -> int | None:
    return int(value) if value not in ("", None) else None


class SyncStore:
    """The Redis state behind exactly-once effect; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, idempotency_ttl: int, lease_seconds: float) -> None:
        self.redis = redis
        self.ttl = idempotency_ttl
        self.lease_ms = int(lease_seconds * 1000)
        self._begin = redis.register_script(_BEGIN)
        self._intent = redis.register_script(_MARK_INTENT)
        self._finish = redis.register_script(_FINISH)
        self._abort = redis.register_script(_ABORT)

    @staticmethod
    def _keys(idem_key: str, provider: str, client_id: str) -> list[str]:
        return [
            keys.idempotency(idem_key), keys.client_state(provider, client_id), keys.client_lock(provider, client_id)
        ]

    async def begin(
        self, idem_key: str, provider: str, client_id: str, *, fingerprint: str, owner: str,
        now_ms: int | None = None,
    ) -> Begin:
        raw = await self._begin(
            keys=self._keys(idem_key, provider, client_id),
            args=[fingerprint, owner, "" if now_ms is None else now_ms, self.lease_ms, self.ttl],
        )
        status = raw[0].decode() if isinstance(raw[0], bytes) else raw[0]
        vals = [v.decode() if isinstance(v, bytes) else (v or "") for v in raw[1:]]
        if status == "done":
            return Begin("done", outcome=json.loads(vals[0]) if vals and vals[0] else {})
        if status == "conflict":
            return Begin("conflict")
        if status in ("inflight", "locked"):
            ms = float(vals[0]) if vals and vals[0] else 0.0
            return Begin(status, wait_seconds=max(ms, 0.0) / 1000)  # type: ignore[arg-type]
        takeover, link, mark_v, mark_t, deleted, intent = vals
        return Begin(
            "go",
            state=ClientState(
                link=link or None,
                mark_version=_int_or_none(mark_v),
                mark_micros=_int_or_none(mark_t),
                deleted=deleted == "1",
                intent=intent or None,
                takeover=takeover == "1",
            ),
        )

    async def mark_intent(
        self, idem_key: str, provider: str, client_id: str, *, owner: str, intent: str,
        now_ms: int | None = None,
    ) -> bool:
        """Record a create about to be sent and renew our leases; False if the lock is no longer ours."""
        ok = await self._intent(
            keys=[
                keys.client_state(provider, client_id), keys.client_lock(provider, client_id),
                keys.idempotency(idem_key),
            ],
            args=[owner, intent, self.lease_ms, "" if now_ms is None else now_ms],
        )
        return bool(ok)

    async def finish(
        self,
        idem_key: str,
        provider: str,
        client_id: str,
        *,
        owner: str,
        outcome: dict[str, Any],
        link: str | None = None,
        unlink: bool = False,
        mark: tuple[int, int] | None = None,
        deleted: bool | None = None,
    ) -> bool:
        """Record the outcome; False if our claim or the client lock was lost meanwhile."""
        link_op = "del" if unlink else ("set" if link else "keep")
        ok = await self._finish(
            keys=self._keys(idem_key, provider, client_id),
            args=[
                owner,
                json.dumps(outcome, sort_keys=True),
                link_op,
                link or "",
                "" if mark is None else str(mark[0]),
                "" if mark is None else str(mark[1]),
                "" if deleted is None else ("1" if deleted else "0"),
                self.ttl,
            ],
        )
        return bool(ok)

    async def abort(self, idem_key: str, provider: str, client_id: str, *, owner: str) -> None:
        await self._abort(
            keys=[keys.idempotency(idem_key), keys.client_lock(provider, client_id)], args=[owner]
        )

    async def link(self, provider: str, client_id: str) -> str | None:
        value = await self.redis.hget(keys.client_state(provider, client_id), "link")
        return value.decode() if isinstance(value, bytes) else value
