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

_OWNER = keys.record_owner("", "")[: -len(":")]  # "cs:owner:" (provider and id appended in Lua)

BEGIN_LUA = NOW_LUA + """
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
-- A write to this client ended unclearly (it may still land): nobody writes until it settles.
local unsettled = redis.call('HGET', state, 'unsettled')
if unsettled then
  local at = tonumber(string.match(unsettled, '|(%d+)$') or '')
  if at and at > now then return {'unsettled', tostring(at - now)} end
end
redis.call('SET', lock, owner, 'PX', lease)
redis.call('HSET', idem, 'status', 'running', 'fp', fp, 'owner', owner, 'lease', now + lease)
redis.call('HINCRBY', idem, 'attempts', 1)
redis.call('EXPIRE', idem, ttl)
local s = redis.call('HMGET', state, 'link', 'mark_v', 'mark_t', 'deleted', 'intent', 'del_intent', 'resolution',
                     'unsettled')
return {'go', tostring(takeover), s[1] or '', s[2] or '', s[3] or '', s[4] or '', s[5] or '', s[6] or '',
        s[7] or '', s[8] or ''}
"""

# KEYS: client state, client lock, idempotency; ARGV: owner, intent, lease_ms, now_ms ('' = Redis time),
# field ('intent' for a create, 'del_intent' for a delete)
# Renews both leases: the write that follows gets a whole lease, however long the lookup took.
# A create intent is appended to the client's list of unsettled creates (JSON array, newest
# last, at most 5): each one's sent payload is what a later lookup must recognise.
_MARK_INTENT = NOW_LUA + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[5] == 'intent' then
  local list = {}
  local old = redis.call('HGET', KEYS[1], 'intent')
  if old then
    local ok, decoded = pcall(cjson.decode, old)
    if ok and type(decoded) == 'table' then list = decoded end
  end
  table.insert(list, cjson.decode(ARGV[2]))
  while #list > 5 do table.remove(list, 1) end
  redis.call('HSET', KEYS[1], 'intent', cjson.encode(list))
else
  redis.call('HSET', KEYS[1], ARGV[5], ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
if redis.call('HGET', KEYS[3], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[3], 'lease', now_ms(ARGV[4]) + tonumber(ARGV[3]))
end
return 1
"""

# KEYS: client lock, idempotency; ARGV: owner, lease_ms, now_ms ('' = Redis time)
_RENEW = NOW_LUA + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
if redis.call('HGET', KEYS[2], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[2], 'lease', now_ms(ARGV[3]) + tonumber(ARGV[2]))
end
return 1
"""

# KEYS: client lock, the record's owner key, client state; ARGV: owner token, client id, provider, record id
# Claim a provider record for this client before adopting it: refused if another client owns it.
# A claim is a link: once a record is known to be this client's (its exact keys, its own lost
# create, an operator's choice), that knowledge must outlive the write that follows. Should the
# adopting update end unclearly and change the record, the next run updates the linked record
# instead of looking for a payload the record no longer carries (and creating it again). The
# record found answers the client's unanswered creates, as a finish that links it would.
_CLAIM = f"local OWNER = {json.dumps(_OWNER)}\n" + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'lost' end
local client, provider, record = ARGV[2], ARGV[3], ARGV[4]
local other = redis.call('GET', KEYS[2])
if other and other ~= client then return other end
redis.call('SET', KEYS[2], client)
local old = redis.call('HGET', KEYS[3], 'link')
if old and old ~= record then
  local key = OWNER .. provider .. ':' .. old
  if redis.call('GET', key) == client then redis.call('DEL', key) end
end
redis.call('HSET', KEYS[3], 'link', record)
redis.call('HDEL', KEYS[3], 'intent', 'resolution')
return 'ok'
"""

# KEYS: idempotency, client state, client lock
# ARGV: owner, outcome, link_op ('keep'|'set'|'del'), link, mark_v, mark_t, deleted ('0'|'1'|''), ttl,
#       provider, client id, settled ('1': this run got a clear answer from a write)
FINISH_LUA = f"local OWNER = {json.dumps(_OWNER)}\n" + """
local idem, state, lock = KEYS[1], KEYS[2], KEYS[3]
local owner, op, link, provider, client = ARGV[1], ARGV[3], ARGV[4], ARGV[9], ARGV[10]
-- Both the claim and the client lock must still be ours: after a lease ran out, another run
-- may be working on this client, and our link or mark must not land over its work.
if redis.call('HGET', idem, 'owner') ~= owner or redis.call('GET', lock) ~= owner then return 'lost' end
local old = redis.call('HGET', state, 'link')
if op == 'set' then
  local holder = redis.call('GET', OWNER .. provider .. ':' .. link)
  if holder and holder ~= client then return 'owned:' .. holder end
end
redis.call('HSET', idem, 'status', 'done', 'outcome', ARGV[2])
redis.call('HDEL', idem, 'owner', 'lease')
redis.call('EXPIRE', idem, tonumber(ARGV[8]))
if (op == 'del' or (op == 'set' and old ~= link)) and old then
  local key = OWNER .. provider .. ':' .. old
  if redis.call('GET', key) == client then redis.call('DEL', key) end
end
if op == 'set' then
  redis.call('HSET', state, 'link', link)
  redis.call('SET', OWNER .. provider .. ':' .. link, client)
elseif op == 'del' then
  redis.call('HDEL', state, 'link')
end
-- Version and time marks are kept apart: an event without a version never lowers (or erases)
-- the version mark, and the time mark only moves forward.
local v, t = tonumber(ARGV[5] or ''), tonumber(ARGV[6] or '')
if v and v >= 0 then
  local cur = tonumber(redis.call('HGET', state, 'mark_v') or '')
  if not cur or v > cur then redis.call('HSET', state, 'mark_v', v) end
end
if t then
  local cur = tonumber(redis.call('HGET', state, 'mark_t') or '')
  if not cur or t > cur then redis.call('HSET', state, 'mark_t', t) end
end
if ARGV[7] ~= '' then redis.call('HSET', state, 'deleted', ARGV[7]) end
-- The intents are answered only by a link set (created, adopted) or removed (deleted); a
-- skipped change (stale, unsupported) must leave them for the retry of the write they guard.
if op ~= 'keep' then redis.call('HDEL', state, 'intent', 'del_intent', 'resolution') end
if ARGV[11] == '1' then redis.call('HDEL', state, 'unsettled') end
redis.call('DEL', lock)
return 'ok'
"""

# KEYS: idempotency, client lock, client state; ARGV: owner, settle_ms ('' = the outcome was clear),
# now_ms ('' = Redis time), token of the create intent a clear refusal answered ('' = none)
_ABORT = NOW_LUA + """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', 'failed')
  redis.call('HDEL', KEYS[1], 'owner', 'lease')
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  if ARGV[2] ~= '' then
    redis.call('HSET', KEYS[3], 'unsettled', KEYS[1] .. '|' .. (now_ms(ARGV[3]) + tonumber(ARGV[2])))
  elseif ARGV[4] ~= '' then
    -- The provider clearly refused this create: its intent is answered (nothing was made).
    local raw = redis.call('HGET', KEYS[3], 'intent')
    local ok, list = pcall(cjson.decode, raw or '')
    if ok and type(list) == 'table' then
      local kept = {}
      for _, i in ipairs(list) do
        if type(i) ~= 'table' or i.token ~= ARGV[4] then table.insert(kept, i) end
      end
      if #kept == 0 then redis.call('HDEL', KEYS[3], 'intent')
      else redis.call('HSET', KEYS[3], 'intent', cjson.encode(kept)) end
    end
  end
  redis.call('DEL', KEYS[2])
end
return 1
"""

# KEYS: client state; ARGV: resolution JSON
_RESOLVE = """
redis.call('HSET', KEYS[1], 'resolution', ARGV[1])
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
    #: a delete was about to be sent ("<event>@<unix s>"), its outcome not yet recorded
    del_intent: str | None = None
    #: an operator's answer to a needs_attention job: {"event_id", "action", "provider_id"}
    resolution: dict[str, Any] | None = None
    #: a write ended unclearly before (now settled, or this run would not have started)
    unsettled: bool = False

    @property
    def intents(self) -> list[dict[str, Any]]:
        """The creates sent whose answer was never recorded, oldest first: each
        {"event_id", "at" (unix s), "client" (the canonical client sent, as JSON text)}."""
        if not self.intent:
            return []
        try:
            decoded = json.loads(self.intent)
        except ValueError:
            return []
        return [i for i in decoded if isinstance(i, dict)] if isinstance(decoded, list) else []

    @property
    def intent_time(self) -> float | None:
        """Unix seconds the oldest pending create was recorded at."""
        times = [float(i["at"]) for i in self.intents if isinstance(i.get("at"), int | float)]
        return min(times) if times else None

    def supersedes(self, mark: tuple[int, int], *, upsert: bool) -> bool:
        """True if a change at `mark` must be skipped as stale: older, or an upsert that ties a delete."""
        order = self._compare(mark)
        return order > 0 or (order == 0 and upsert and self.deleted)

    def _compare(self, mark: tuple[int, int]) -> int:
        """1 if the applied marks are newer than `mark`, 0 on a tie, -1 if older.

        Versions decide when both the change and the applied mark have one; otherwise times do.
        The two marks are kept apart, so an unversioned change in between never erases the
        version mark (A v5, then B without a version, then C v4: C is stale)."""
        version, micros = mark
        if version >= 0 and self.mark_version is not None and self.mark_version >= 0:
            return (self.mark_version > version) - (self.mark_version < version)
        if self.mark_micros is None:
            return -1
        return (self.mark_micros > micros) - (self.mark_micros < micros)


@dataclass(frozen=True)
class Begin:
    """The answer of `SyncStore.begin`."""

    status: Literal["go", "done", "conflict", "inflight", "locked", "unsettled"]
    state: ClientState | None = None
    outcome: dict[str, Any] | None = None
    wait_seconds: float = 0.0


def _int_or_none(value: str) -> int | None:
    return int(value) if value not in ("", None) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def parse_begin(raw: Any) -> Begin:
    """`BEGIN_LUA`'s reply as a `Begin`."""
    status = _text(raw[0])
    vals = [_text(v) for v in raw[1:]]
    if status == "done":
        return Begin("done", outcome=json.loads(vals[0]) if vals and vals[0] else {})
    if status == "conflict":
        return Begin("conflict")
    if status in ("inflight", "locked", "unsettled"):
        ms = float(vals[0]) if vals and vals[0] else 0.0
        return Begin(status, wait_seconds=max(ms, 0.0) / 1000)  # type: ignore[arg-type]
    takeover, link, mark_v, mark_t, deleted, intent, del_intent, resolution, unsettled = vals
    return Begin(
        "go",
        state=ClientState(
            link=link or None,
            mark_version=_int_or_none(mark_v),
            mark_micros=_int_or_none(mark_t),
            deleted=deleted == "1",
            intent=intent or None,
            takeover=takeover == "1",
            del_intent=del_intent or None,
            resolution=json.loads(resolution) if resolution else None,
            unsettled=bool(unsettled),
        ),
    )


class SyncStore:
    """The Redis state behind exactly-once effect; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, idempotency_ttl: int, lease_seconds: float) -> None:
        self.redis = redis
        self.ttl = idempotency_ttl
        self.lease_seconds = lease_seconds
        self.lease_ms = int(lease_seconds * 1000)
        self._begin = redis.register_script(BEGIN_LUA)
        self._intent = redis.register_script(_MARK_INTENT)
        self._renew = redis.register_script(_RENEW)
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(FINISH_LUA)
        self._abort = redis.register_script(_ABORT)
        self._resolve = redis.register_script(_RESOLVE)
        self._set_link = redis.register_script(_SET_LINK)
        self._epoch = redis.register_script(_EPOCH)
        #: provider -> when clientsync first wrote there (set once in Redis, never changes)
        self._epochs: dict[str, float] = {}

    @staticmethod
    def _keys(idem_key: str, provider: str, client_id: str) -> list[str]:
        return [
            keys.idempotency(idem_key), keys.client_state(provider, client_id), keys.client_lock(provider, client_id)
        ]

    def begin_call(self, idem_key: str, provider: str, client_id: str, *, fingerprint: str, owner: str,
                   now_ms: int | None = None) -> tuple[list[str], list[Any]]:
        """`begin`'s keys and arguments (also a piece of the job's start script, `worker.steps`)."""
        return (self._keys(idem_key, provider, client_id),
                [fingerprint, owner, "" if now_ms is None else now_ms, self.lease_ms, self.ttl])

    async def begin(
        self, idem_key: str, provider: str, client_id: str, *, fingerprint: str, owner: str,
        now_ms: int | None = None,
    ) -> Begin:
        script_keys, args = self.begin_call(idem_key, provider, client_id, fingerprint=fingerprint, owner=owner,
                                            now_ms=now_ms)
        return parse_begin(await self._begin(keys=script_keys, args=args))

    async def mark_intent(
        self, idem_key: str, provider: str, client_id: str, *, owner: str, intent: str,
        now_ms: int | None = None, delete: bool = False,
    ) -> bool:
        """Record a create (or delete) about to be sent and renew our leases; False if the lock is no longer ours."""
        ok = await self._intent(
            keys=[
                keys.client_state(provider, client_id), keys.client_lock(provider, client_id),
                keys.idempotency(idem_key),
            ],
            args=[owner, intent, self.lease_ms, "" if now_ms is None else now_ms,
                  "del_intent" if delete else "intent"],
        )
        return bool(ok)

    async def renew(self, idem_key: str, provider: str, client_id: str, *, owner: str,
                    now_ms: int | None = None) -> bool:
        """Extend the client lock and the claim by a whole lease; False if either is no longer ours."""
        ok = await self._renew(
            keys=[keys.client_lock(provider, client_id), keys.idempotency(idem_key)],
            args=[owner, self.lease_ms, "" if now_ms is None else now_ms],
        )
        return bool(ok)

    async def claim_record(self, provider: str, client_id: str, provider_id: str, *, owner: str) -> str:
        """Make `provider_id` this client's, and its link, before adopting it: 'ok', 'lost' (our
        lock is gone), or the id of the client that already owns it."""
        raw = await self._claim(
            keys=[keys.client_lock(provider, client_id), keys.record_owner(provider, provider_id),
                  keys.client_state(provider, client_id)],
            args=[owner, client_id, provider, provider_id],
        )
        return _text(raw)

    async def owners(self, provider: str, provider_ids: list[str]) -> dict[str, str]:
        """The source client owning each of `provider_ids` (absent: owned by nobody). One round trip."""
        if not provider_ids:
            return {}
        values = await self.redis.mget([keys.record_owner(provider, pid) for pid in provider_ids])
        return {pid: _text(v) for pid, v in zip(provider_ids, values, strict=True) if v}

    def finish_call(
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
        settled: bool = False,
    ) -> tuple[list[str], list[Any]]:
        """`finish`'s keys and arguments (also a piece of the job's finish script, `worker.steps`)."""
        link_op = "del" if unlink else ("set" if link else "keep")
        return self._keys(idem_key, provider, client_id), [
            owner,
            json.dumps(outcome, sort_keys=True),
            link_op,
            link or "",
            "" if mark is None else str(mark[0]),
            "" if mark is None else str(mark[1]),
            "" if deleted is None else ("1" if deleted else "0"),
            self.ttl,
            provider,
            client_id,
            "1" if settled else "0",
        ]

    async def finish(self, idem_key: str, provider: str, client_id: str, *, owner: str, outcome: dict[str, Any],
                     **bookkeeping: Any) -> str:
        """Record the outcome: 'ok'; 'lost' if our claim or the client lock was lost meanwhile;
        'owned:<client>' if the record to link belongs to another client (nothing is written).
        `bookkeeping`: `link`, `unlink`, `mark`, `deleted`, `settled` (see `finish_call`)."""
        script_keys, args = self.finish_call(idem_key, provider, client_id, owner=owner, outcome=outcome,
                                             **bookkeeping)
        return _text(await self._finish(keys=script_keys, args=args))

    async def abort(self, idem_key: str, provider: str, client_id: str, *, owner: str,
                    unsettle_seconds: float | None = None, now_ms: int | None = None,
                    refused_create: str | None = None) -> None:
        """Release the claim and the lock; `unsettle_seconds` set: the write ended unclearly, and
        no write to this client may start before that many seconds have passed;
        `refused_create`: the token of the create intent the provider clearly refused (that intent
        goes; others of the same event, sent by earlier runs, stay: they may have landed)."""
        await self._abort(
            keys=[keys.idempotency(idem_key), keys.client_lock(provider, client_id),
                  keys.client_state(provider, client_id)],
            args=[owner, "" if unsettle_seconds is None else int(unsettle_seconds * 1000),
                  "" if now_ms is None else now_ms, refused_create or ""],
        )

    async def resolve(self, provider: str, client_id: str, resolution: dict[str, Any]) -> None:
        """Store an operator's answer to a needs_attention job (read by the job's next run)."""
        await self._resolve(keys=[keys.client_state(provider, client_id)],
                            args=[json.dumps(resolution, sort_keys=True)])

    async def provider_epoch(self, provider: str, now: float) -> float:
        """When clientsync first wrote to `provider` (recorded now if never): one round trip."""
        if provider not in self._epochs:
            raw = await self._epoch(keys=[keys.provider_epoch(provider)], args=[f"{now:.3f}"])
            self._epochs[provider] = float(_text(raw))
        return self._epochs[provider]

    async def link(self, provider: str, client_id: str) -> str | None:
        value = await self.redis.hget(keys.client_state(provider, client_id), "link")
        return value.decode() if isinstance(value, bytes) else value

    async def set_link(self, provider: str, client_id: str, provider_id: str) -> str:
        """Link without a job (`clientsync link`): 'ok', or the client already owning the record,
        or 'linked:<id>' when this client is already linked to another record."""
        raw = await self._set_link(keys=[keys.client_state(provider, client_id),
                                         keys.record_owner(provider, provider_id)], args=[provider_id, client_id])
        return _text(raw)


# KEYS: client state, the record's owner key; ARGV: provider id, client id
_SET_LINK = """
local cur = redis.call('HGET', KEYS[1], 'link')
if cur and cur ~= ARGV[1] then return 'linked:' .. cur end
local other = redis.call('GET', KEYS[2])
if other and other ~= ARGV[2] then return other end
redis.call('HSET', KEYS[1], 'link', ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 'ok'
"""

# KEYS: the provider's epoch; ARGV: now (unix seconds)
_EPOCH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""
