"""The operator's view of the ledger, shared by the monitor API, the dashboard, /metrics and the CLI.

Plain async code over redis.asyncio, no web framework: `Monitor` lists and filters jobs
(keyset pagination over the ledger's sorted-set indexes), shows one job with its history,
replays and discards, summarises per provider, and checks readiness.

Decisions recorded here (and in `worker/web/openapi.yaml`):

- **Replayable states**: a single replay accepts `dead` and `discarded` jobs (an operator may
  change their mind); a bulk replay by filter takes `dead` jobs only. Anything else is
  refused (409): a queued/running/retrying job is still owned by the workers (except a
  `running` job whose worker is dead, i.e. whose owner's heartbeat expired: it may be
  replayed, checked in the same script as the replay; the reaper also re-enqueues it), and a
  succeeded or skipped job must not be sent again (its idempotency key would answer the
  stored outcome anyway, so even a forced replay could not apply twice).
- A replay enqueues `clientsync.apply_change` with `[change, provider]`, `{"attempt": 1}`
  and marks the job `queued` in the same Lua script (`Ledger.replay`): the job and the queue
  can never disagree. The change keeps its event id, so the idempotency key is the same.
- **Emails are masked in every response** this module builds (`redact`): the change JSON,
  error messages and dead-letter payloads, for token holders and the dashboard alike. The
  unmasked change stays in Redis and is what a replay sends.
- Time filters (`since`, `until`) apply to a job's last update, which is what the indexes
  are scored by.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from worker import circuit, heartbeat, keys
from worker.ledger import COUNTERS, INTAKE, LATENCY_BUCKETS, STATES, Ledger, bucket_label
from worker.models import PROVIDER_NAMES, mask_email
from worker.parking import apply_message, task_key
from worker.responses import parse_field

#: must equal `tasks.sync.APPLY_TASK` (worker never imports tasks; a test checks they agree)
APPLY_TASK = "clientsync.apply_change"
#: states a single replay accepts; a bulk replay takes `dead` only
REPLAYABLE: tuple[str, ...] = ("dead", "discarded")
#: what a single replay asks the ledger for: `running` only passes when the job's worker is dead
_REPLAY_GUARD: tuple[str, ...] = (*REPLAYABLE, "running")
BULK_REPLAYABLE: tuple[str, ...] = ("dead",)
DISCARDABLE: tuple[str, ...] = ("dead",)
MAX_LIMIT = 500
MAX_BULK = 10_000
_BATCH = 200
_ROW_FIELDS = ("state", "provider", "event_id", "client_id", "action", "attempts", "replays", "created_at",
               "updated_at", "received_at", "next_attempt_at", "last_error", "last_error_class", "result",
               "reason", "provider_id", "finished_at")
_PROVIDER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: a source client id as `worker.models` accepts it (printable, no spaces, no slashes)
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,199}$")
#: fields of `keys.client_state` the client page shows
_CLIENT_FIELDS = ("link", "mark_v", "mark_t", "deleted", "intent", "del_intent", "unsettled", "resolution")
_GROUP_BATCH = 1000
_EMAIL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")

# Reads a key whose shape another module owns (circuit breaker, rate bucket) without
# assuming its type: absent, string, hash or anything else, in one round trip.
_PEEK = """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'hash' then return {t, redis.call('HGETALL', KEYS[1])} end
if t == 'string' then return {t, {redis.call('GET', KEYS[1])}} end
return {t, {}}
"""


class InvalidParam(ValueError):
    """A filter or option is invalid: `field` names it, the message states the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} in the ledger (unknown, or dropped by retention)")
        self.job_id = job_id


class ClientNotFound(LookupError):
    def __init__(self, client_id: str) -> None:
        super().__init__(f"no client {client_id!r}: no record at any provider and no job in the ledger")
        self.client_id = client_id


class NotAllowed(Exception):
    """The job's state does not allow the action (replay, discard)."""

    def __init__(self, job_id: str, state: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


# --- masking ------------------------------------------------------------------------------------
def redact(value: Any) -> Any:
    """`value` with every email-looking substring masked (`jane@example.com` -> `j***@e***.com`)."""
    if isinstance(value, str):
        return _EMAIL_RE.sub(lambda m: mask_email(m.group(0)) or "", value)
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    return value


# --- filters --------------------------------------------------------------------------------------
def parse_time(field: str, value: str) -> float:
    """Unix seconds from RFC 3339 (`2024-05-01T12:00:00Z`) or a number of unix seconds."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise InvalidParam(field, "must be RFC 3339 (e.g. 2024-05-01T12:00:00Z) or unix seconds") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_limit(value: str | int | None, *, default: int, maximum: int, field: str = "limit") -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParam(field, f"must be an integer between 1 and {maximum}") from exc
    if not 1 <= n <= maximum:
        raise InvalidParam(field, f"must be an integer between 1 and {maximum}")
    return n


def iso(value: str | float | int | None, *, ms: bool = False) -> str | None:
    """RFC 3339 UTC with milliseconds from unix seconds (or ms), None for none."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value) / (1000 if ms else 1)
    except ValueError:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobFilter:
    """Which jobs: every given field must match. Times are unix seconds on the last update."""

    state: str | None = None
    provider: str | None = None
    client_id: str | None = None
    event_id: str | None = None
    error_class: str | None = None
    since: float | None = None
    until: float | None = None

    FIELDS = ("state", "provider", "client_id", "event_id", "error_class", "since", "until")

    @classmethod
    def parse(cls, params: Mapping[str, Any], *, allowed: Sequence[str] = FIELDS) -> JobFilter:
        """Build from query or body parameters (strings), naming the field on any error."""
        values: dict[str, Any] = {}
        for name in allowed:
            raw = params.get(name)
            if raw is None or raw == "":
                continue
            if not isinstance(raw, str):
                raise InvalidParam(name, "must be a string")
            text = raw
            if name == "state":
                if text not in STATES:
                    raise InvalidParam(name, f"must be one of {', '.join(STATES)}")
                values[name] = text
            elif name == "provider":
                if not _PROVIDER_RE.match(text):
                    raise InvalidParam(name, "must be a provider name (letters, digits, _ . -; at most 64)")
                values[name] = text
            elif name in ("since", "until"):
                values[name] = parse_time(name, text)
            else:
                if len(text) > 256:
                    raise InvalidParam(name, "must be at most 256 characters")
                values[name] = text
        f = cls(**values)
        if f.since is not None and f.until is not None and f.since > f.until:
            raise InvalidParam("since", "must not be after until")
        return f

    def matches(self, row: Mapping[str, str]) -> bool:
        if self.state and row.get("state") != self.state:
            return False
        if self.provider and row.get("provider") != self.provider:
            return False
        if self.client_id and row.get("client_id") != self.client_id:
            return False
        if self.event_id and row.get("event_id") != self.event_id:
            return False
        if self.error_class and row.get("last_error_class") != self.error_class:
            return False
        updated = float(row.get("updated_at") or 0) / 1000
        if self.since is not None and updated < self.since:
            return False
        return not (self.until is not None and updated > self.until)


def encode_cursor(score: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score}|{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, _, job_id = text.partition("|")
        return int(score), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidParam("cursor", "must be a next_cursor value returned by this API") from exc


@dataclass(frozen=True)
class Page:
    jobs: list[dict[str, Any]]
    next_cursor: str | None


def _live(beats: Sequence[heartbeat.Seen]) -> list[str]:
    return sorted(b.worker for b in beats if b.live)[:heartbeat.MAX_LISTED]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _row(job_id: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """The public summary of one job (emails masked)."""
    row: dict[str, Any] = redact({
        "id": job_id,
        "state": raw.get("state"),
        "provider": raw.get("provider"),
        "event_id": raw.get("event_id"),
        "client_id": raw.get("client_id"),
        "action": raw.get("action"),
        "attempts": int(raw.get("attempts") or 0),
        "replays": int(raw.get("replays") or 0),
        "created_at": iso(raw.get("created_at"), ms=True),
        "updated_at": iso(raw.get("updated_at"), ms=True),
        "received_at": iso(raw.get("received_at")),
        "finished_at": iso(raw.get("finished_at")),
        "next_attempt_at": iso(raw.get("next_attempt_at")),
        "last_error": raw.get("last_error") or None,
        "last_error_class": raw.get("last_error_class") or None,
        "result": raw.get("result") or None,
        "reason": raw.get("reason") or None,
        "provider_id": raw.get("provider_id") or None,
        "unsupported_fields": [f for f in (raw.get("unsupported") or "").split(",") if f],
    })
    return row


def _history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    out["at"] = iso(entry.get("at"))
    if entry.get("next_attempt_at") is not None:
        out["next_attempt_at"] = iso(entry.get("next_attempt_at"))
    masked: dict[str, Any] = redact(out)
    return masked


def _peeked(reply: Any) -> tuple[str, dict[str, str]]:
    kind = _text(reply[0])
    items = [_text(x) for x in reply[1]]
    if kind == "hash":
        return kind, dict(zip(items[::2], items[1::2], strict=True))
    if kind == "string":
        return kind, {"value": items[0] if items else ""}
    return kind, {}


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def circuit_view(kind: str, data: Mapping[str, str]) -> dict[str, Any]:
    """The breaker's state from `keys.circuit(provider)` (fields per `worker.circuit`); absent = closed.

    Read tolerantly: an unexpected shape shows as `unknown`, never as an error."""
    if kind == "none":
        return {"state": "closed", "known": False}
    raw = data.get("state") if kind == "hash" else data.get("value")
    state = str(raw).lower().replace("-", "_") if raw else "unknown"
    if state not in ("closed", "open", "half_open", "auth_failed", "paused"):
        state = "unknown"
    out: dict[str, Any] = {"state": state, "known": state != "unknown"}
    for name in ("failures", "opens", "cooldown"):
        value = _num(data.get(name))
        if value is not None:
            out[name] = value
    for name in ("opened_at", "reopen_at", "updated_at", "probe_until"):
        out_at = iso(_num(data.get(name)))
        if out_at:
            out[name] = out_at
    if state == "paused" and data.get("paused_by"):
        out["paused_by"] = str(data["paused_by"])
    return out


def rate_view(kind: str, data: Mapping[str, str], *, now: float | None = None) -> dict[str, Any]:
    """Headroom from `keys.rate_bucket(provider)` (fields per `worker.ratelimit`): the tokens
    available now (refilled since `tokens_at`), the bucket's real capacity (`burst`, a tenth of
    the limit), the limit, and any 429 block in force. Refill is `(limit - burst) / period`."""
    if kind != "hash":
        return {"known": False}
    now = time.time() if now is None else now
    limit, period = _num(data.get("limit")), _num(data.get("period"))
    tokens, at = _num(data.get("tokens")), _num(data.get("tokens_at"))
    burst = _num(data.get("burst"))
    if burst is None and limit:
        burst = max(1.0, float(int(limit) // 10))  # a bucket written before `burst` was stored
    blocked = _num(data.get("blocked_until")) or 0.0
    out: dict[str, Any] = {"known": True}
    if limit is not None and period:
        out["limit"] = limit
        out["period_seconds"] = period
        if burst is not None:
            out["capacity"] = burst
    if tokens is not None:
        if limit and period and burst and at is not None and now > at:
            refill = limit - burst if limit > burst else limit
            tokens = min(burst, tokens + (now - at) * refill / period)
        out["tokens"] = round(tokens, 2)
    out["blocked_until"] = iso(blocked) if blocked > now else None
    blocks = _num(data.get("blocks"))
    if blocks is not None:
        out["blocks"] = int(blocks)
    return out


def _intent_view(value: str | None) -> dict[str, Any] | None:
    """`"<event id>@<unix s>"` (see `keys.client_state`) as {event_id, at}; anything else kept raw."""
    if not value:
        return None
    event_id, sep, at = value.rpartition("@")
    seconds = _num(at) if sep else None
    if seconds is None:
        return {"event_id": value, "at": None}
    return {"event_id": event_id, "at": iso(seconds)}


def _unsettled_view(value: str | None, now: float) -> dict[str, Any] | None:
    """`"<idempotency key>|<settle at, ms>"`: the write that ended unclearly, and when it settles."""
    if not value:
        return None
    key, _, at = value.rpartition("|")
    settle_ms = _num(at)
    if settle_ms is None:
        return {"key": value, "settle_at": None, "settled": False}
    return {"key": key, "settle_at": iso(settle_ms, ms=True), "settled": settle_ms / 1000 <= now}


def client_state_view(data: Mapping[str, str], *, now: float | None = None) -> dict[str, Any]:
    """One client's record at one provider (`keys.client_state`), readable; emails masked."""
    now = time.time() if now is None else now
    version = _num(data.get("mark_v"))
    micros = _num(data.get("mark_t"))
    resolution = data.get("resolution")
    try:
        resolved = json.loads(resolution) if resolution else None
    except ValueError:
        resolved = {"raw": resolution}
    view: dict[str, Any] = redact({
        "known": bool(data),
        "link": data.get("link") or None,
        "deleted": data.get("deleted") == "1",
        # a negative mark is an unversioned change: order by time only
        "version": int(version) if version is not None and version >= 0 else None,
        "changed_at": iso(micros / 1_000_000) if micros is not None else None,
        "intent": _intent_view(data.get("intent")),
        "del_intent": _intent_view(data.get("del_intent")),
        "unsettled": _unsettled_view(data.get("unsettled"), now),
        "resolution": resolved,
    })
    return view


class Monitor:
    """Queries and operator actions over the ledger; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, queue: str, ledger: Ledger | None = None) -> None:
        self.redis = redis
        self.queue = queue
        self.ledger = ledger or Ledger(redis)
        self._peek = redis.register_script(_PEEK)

    # --- listing -----------------------------------------------------------------------------
    async def providers(self) -> list[str]:
        return sorted(_text(p) for p in await self.redis.smembers(keys.STATS_PROVIDERS))

    async def _rows(self, job_ids: Sequence[str], extra: Sequence[str] = ()) -> list[dict[str, str] | None]:
        names = (*_ROW_FIELDS, *extra)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), names)
            replies = await pipe.execute()
        out: list[dict[str, str] | None] = []
        for reply in replies:
            if reply[0] is None:  # no state: unknown job
                out.append(None)
            else:
                out.append({n: _text(v) for n, v in zip(names, reply, strict=True) if v is not None})
        return out

    def _source(self, f: JobFilter) -> str:
        if f.client_id:
            return keys.jobs_of_client(f.client_id)
        if f.provider and f.state:
            return keys.jobs_of_provider_in_state(f.provider, f.state)
        if f.state:
            return keys.jobs_in_state(f.state)
        return keys.JOBS_BY_TIME

    async def _scan(self, f: JobFilter, *, limit: int, after: tuple[int, str] | None, scan_limit: int,
                    extra: Sequence[str] = ()) -> tuple[list[tuple[str, dict[str, str]]], tuple[int, str] | None]:
        """Up to `limit` matching (id, raw fields), newest update first, and where to continue
        (None when the index is exhausted). Reads at most `scan_limit` index entries."""
        if f.event_id:
            providers = [f.provider] if f.provider else await self.providers()
            ids = [keys.job_id(p, f.event_id) for p in providers]
            rows = await self._rows(ids, extra)
            found = [(i, r) for i, r in zip(ids, rows, strict=True) if r is not None and f.matches(r)]
            found.sort(key=lambda x: (-int(x[1].get("updated_at") or 0), x[0]))
            return found[:limit], None
        source = self._source(f)
        high: str | int = "+inf" if f.until is None else int(f.until * 1000)
        low: str | int = "-inf" if f.since is None else int(f.since * 1000)
        if after is not None:
            high = after[0]
        out: list[tuple[str, dict[str, str]]] = []
        offset = scanned = 0
        pos: tuple[int, str] | None = after
        prefix = f"{f.provider}:" if f.provider else None
        batch_size = max(_BATCH, limit * 2)
        while scanned < scan_limit:
            batch: list[Any] = list(await self.redis.zrevrangebyscore(
                source, high, low, start=offset, num=batch_size, withscores=True))
            if not batch:
                return out, None
            offset += len(batch)
            scanned += len(batch)
            candidates: list[tuple[str, int]] = []
            for member, score in batch:
                job_id, s = _text(member), int(score)
                # Equal scores come in reverse byte order: those >= the cursor's id were returned.
                if after is not None and s == after[0] and job_id >= after[1]:
                    continue
                candidates.append((job_id, s))
            wanted = [(i, s) for i, s in candidates if prefix is None or i.startswith(prefix)]
            rows = await self._rows([i for i, _ in wanted], extra)
            matched = {i: r for (i, _), r in zip(wanted, rows, strict=True) if r is not None and f.matches(r)}
            for job_id, s in candidates:
                pos = (s, job_id)
                row = matched.get(job_id)
                if row is not None:
                    out.append((job_id, row))
                    if len(out) == limit:
                        return out, pos
            if len(batch) < batch_size:
                return out, None
        return out, pos

    async def list_jobs(self, f: JobFilter, *, limit: int = 50, cursor: str | None = None,
                        scan_limit: int = 20_000) -> Page:
        """One page of matching jobs, newest update first; `next_cursor` continues (None: the end)."""
        after = decode_cursor(cursor) if cursor else None
        found, pos = await self._scan(f, limit=limit, after=after, scan_limit=scan_limit)
        return Page([_row(i, r) for i, r in found], encode_cursor(*pos) if pos else None)

    async def dead_groups(self, *, provider: str | None = None, client_id: str | None = None) -> dict[str, Any]:
        """Dead jobs (of one provider and/or client if given) grouped by (error class, provider)
        with exact counts, largest group first.

        ZSCAN over the narrowest index (every job there for the whole scan is seen; duplicates are
        dropped) with one pipelined HMGET per batch; a job that left `dead` meanwhile is not counted."""
        if client_id:
            source = keys.jobs_of_client(client_id)
        elif provider:
            source = keys.jobs_of_provider_in_state(provider, "dead")
        else:
            source = keys.jobs_in_state("dead")
        seen: set[str] = set()
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        cursor: int = 0
        while True:
            cursor, batch = await self.redis.zscan(source, cursor, count=_GROUP_BATCH)
            ids = [i for i in dict.fromkeys(_text(m) for m, _ in batch) if i not in seen]
            seen.update(ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(keys.job(job_id), ["state", "provider", "last_error_class", "last_error", "updated_at"])
                replies = await pipe.execute() if ids else []
            for reply in replies:
                state, prov, error_class, error, updated = (_text(v) if v is not None else None for v in reply)
                if state != "dead" or (provider and prov != provider):
                    continue
                key = (error_class or "unknown", prov or "-")
                group = groups.setdefault(key, {"error_class": key[0], "provider": key[1], "count": 0,
                                                "latest_ms": 0, "example_error": None})
                group["count"] += 1
                if int(updated or 0) >= group["latest_ms"]:
                    group["latest_ms"] = int(updated or 0)
                    group["example_error"] = redact(error[:300]) if error else None
            if int(cursor) == 0:
                break
        out = sorted(groups.values(), key=lambda g: (-g["count"], g["error_class"], g["provider"]))
        for group in out:
            group["latest_at"] = iso(group.pop("latest_ms"), ms=True)
        return {"total": sum(g["count"] for g in out), "groups": out}

    async def client(self, client_id: str, *, limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        """One source client: its record at each provider (one pipeline) and its jobs across
        providers, newest first (emails masked)."""
        if not _CLIENT_ID_RE.match(client_id):
            raise InvalidParam("client_id", "must be a client id (letters, digits, . _ : @ + -; at most 200)")
        known = [p for p in await self.providers() if p not in PROVIDER_NAMES and p not in ("-", INTAKE)]
        names = [*PROVIDER_NAMES, *known]
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in names:
                pipe.hmget(keys.client_state(p, client_id), list(_CLIENT_FIELDS))
            replies = await pipe.execute()
        now = time.time()
        providers = {}
        for p, reply in zip(names, replies, strict=True):
            data = {f: _text(v) for f, v in zip(_CLIENT_FIELDS, reply, strict=True) if v is not None}
            providers[p] = client_state_view(data, now=now)
        page = await self.list_jobs(JobFilter(client_id=client_id), limit=limit, cursor=cursor)
        if not page.jobs and cursor is None and not any(v["known"] for v in providers.values()):
            raise ClientNotFound(client_id)
        return {"client_id": client_id, "providers": providers, "jobs": page.jobs, "next_cursor": page.next_cursor}

    async def job(self, job_id: str) -> dict[str, Any]:
        """One job with its history and its change (emails masked)."""
        job = await self.ledger.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        out = _row(job_id, job.fields)
        change = job.change
        out["change"] = redact(change) if change is not None else None
        raw = job.fields.get("raw")
        out["raw"] = redact(raw[:4096]) if raw else None
        out["note"] = job.fields.get("note") or None
        out["stage"] = job.fields.get("stage") or None
        out["replayed_at"] = iso(job.fields.get("replayed_at"))
        out["discarded_at"] = iso(job.fields.get("discarded_at"))
        out["replayable"] = job.state in REPLAYABLE and change is not None
        out["history"] = [_history_entry(a) for a in job.attempts]
        candidates = job.fields.get("candidates")
        out["candidates"] = redact(json.loads(candidates)) if candidates else None
        out["resolution"] = json.loads(job.fields["resolution"]) if job.fields.get("resolution") else None
        return out

    async def resolve(self, job_id: str, action: str, provider_id: str | None = None) -> dict[str, Any]:
        """Answer a `needs_attention` job: adopt one of its candidates, or create a new record.

        Idempotent: the same answer again reports what was done. The choice is stored where the
        job's next run reads it (the client's state at that provider), recorded on the job and in
        its history, and the job is queued again, atomically with the state change."""
        if action not in ("adopt", "create"):
            raise InvalidParam("action", "must be 'adopt' or 'create'")
        if action == "adopt" and not provider_id:
            raise InvalidParam("provider_id", "required to adopt a candidate")
        rows = await self._rows([job_id], ("change", "candidates", "resolution"))
        row = rows[0]
        if row is None:
            raise JobNotFound(job_id)
        answer = {"action": action, "provider_id": provider_id if action == "adopt" else None}
        if row.get("resolution"):
            if json.loads(row["resolution"]) == {**answer, "event_id": row.get("event_id")}:
                return {"id": job_id, "status": row.get("state"), "resolution": answer, "already": True}
            raise NotAllowed(job_id, row.get("state", ""), "job was already resolved differently")
        if row.get("state") != "needs_attention" or not row.get("change"):
            raise NotAllowed(job_id, row.get("state", ""), "only a needs_attention job can be resolved")
        ids = [str(c.get("provider_id")) for c in json.loads(row.get("candidates") or "[]")]
        if action == "adopt" and provider_id not in ids:
            raise InvalidParam("provider_id", f"must be one of the job's candidates: {', '.join(ids)}")
        resolution = {**answer, "event_id": row["event_id"]}
        text = json.dumps(resolution, sort_keys=True)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.client_state(row["provider"], row["client_id"]), "resolution", text)
        pipe.hset(keys.job(job_id), "resolution", text)
        await pipe.execute()
        task_id, message = self._message(job_id, json.loads(row["change"]), row["provider"],
                                         await task_key(self.redis))
        note = f"resolved by operator: adopt {provider_id}" if action == "adopt" else "resolved by operator: create new"
        result = (await self.ledger.replay(self.queue, [(job_id, message)], allowed=("needs_attention",),
                                           note=note))[0]
        if result != "ok":
            raise NotAllowed(job_id, result, f"job changed to {result} meanwhile; not resolved")
        return {"id": job_id, "status": "queued", "task_id": task_id, "resolution": answer}

    # --- actions -----------------------------------------------------------------------------
    def _message(self, job_id: str, change: dict[str, Any], provider: str, key: bytes) -> tuple[str, str]:
        """A marked `clientsync.apply_change` message (see `worker.parking.mark`)."""
        message = apply_message(job_id, change, provider, 1, queue=self.queue, key=key)
        return json.loads(message)["headers"]["id"], message

    async def replay(self, job_id: str, *, note: str = "replayed by operator") -> dict[str, Any]:
        """Re-enqueue one dead or discarded job (atomically with marking it queued)."""
        rows = await self._rows([job_id], ("change",))
        row = rows[0]
        if row is None:
            raise JobNotFound(job_id)
        state = row.get("state", "")
        if state not in _REPLAY_GUARD:
            raise NotAllowed(job_id, state, f"job is {state}; only {' or '.join(REPLAYABLE)} jobs "
                             "(or a running job whose worker died) can be replayed"
                             + (" (it was applied; its idempotency key would not apply it again)"
                                if state == "succeeded" else ""))
        if not row.get("change") or row.get("provider") in (None, "-"):
            raise NotAllowed(job_id, state, "an invalid message has no valid change to replay; fix the "
                                            "producer and send the change again")
        task_id, message = self._message(job_id, json.loads(row["change"]), row["provider"],
                                         await task_key(self.redis))
        result = (await self.ledger.replay(self.queue, [(job_id, message)], allowed=_REPLAY_GUARD, note=note))[0]
        if result == "running":
            raise NotAllowed(job_id, result, "job is running and its worker is alive; it cannot be replayed")
        if result != "ok":
            raise NotAllowed(job_id, result, f"job changed to {result} meanwhile; not replayed")
        return {"id": job_id, "status": "queued", "task_id": task_id}

    async def replay_matching(self, f: JobFilter, *, limit: int = 1000, dry_run: bool = False,
                              note: str = "bulk replay by operator") -> dict[str, Any]:
        """Replay every dead job matching `f` (at most `limit`), in batched Lua calls."""
        f = replace(f, state="dead")
        found, _ = await self._scan(f, limit=limit + 1, after=None, scan_limit=max(100_000, limit * 10),
                                    extra=("change",))
        more = len(found) > limit
        found = found[:limit]
        replayable = [(i, r) for i, r in found if r.get("change") and r.get("provider") not in (None, "-")]
        result: dict[str, Any] = {"matched": len(found), "replayed": 0, "not_replayable": len(found) - len(replayable),
                                  "refused": {}, "more": more, "dry_run": dry_run}
        if dry_run:
            result["jobs"] = [i for i, _ in found[:100]]
            return result
        key = await task_key(self.redis) if replayable else b""
        for start in range(0, len(replayable), _BATCH):
            chunk = replayable[start:start + _BATCH]
            pairs = [(i, self._message(i, json.loads(r["change"]), r["provider"], key)[1]) for i, r in chunk]
            outcomes = await self.ledger.replay(self.queue, pairs, allowed=BULK_REPLAYABLE, note=note)
            for (job_id, _), outcome in zip(chunk, outcomes, strict=True):
                if outcome == "ok":
                    result["replayed"] += 1
                else:
                    result["refused"][job_id] = outcome
        return result

    async def discard(self, job_id: str, *, note: str = "discarded by operator") -> dict[str, Any]:
        """Move a dead job to `discarded`: kept with its history, out of the dead list."""
        outcome = (await self.ledger.discard([job_id], allowed=DISCARDABLE, note=note))[0]
        if outcome == "missing":
            raise JobNotFound(job_id)
        if outcome != "ok":
            raise NotAllowed(job_id, outcome, f"job is {outcome}; only dead jobs can be discarded")
        return {"id": job_id, "status": "discarded"}

    # --- provider controls (worker.circuit) -----------------------------------------------------
    async def provider_action(self, provider: str, action: str, *, actor: str, note: str = "") -> dict[str, Any]:
        """Pause, resume or probe a provider now; recorded in the audit list."""
        if provider not in PROVIDER_NAMES:
            raise InvalidParam("provider", f"must be one of {', '.join(PROVIDER_NAMES)}")
        if action not in circuit.ACTIONS:
            raise InvalidParam("action", f"must be one of {', '.join(circuit.ACTIONS)}")
        return await circuit.operate(self.redis, provider, action, actor=actor, note=note)

    async def audit(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """Operator actions and automatic pauses, newest first (times as ISO 8601)."""
        entries = await circuit.audit(self.redis, limit=limit)
        for entry in entries:
            entry["at"] = iso(entry.get("at"))
        return entries

    # --- health --------------------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """Per provider: counts by state, counters, latency histogram, circuit and rate bucket;
        plus the queue depth. Two round trips whatever the number of providers."""
        providers = await self.providers()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.queue)
            for p in providers:
                for s in STATES:
                    pipe.zcard(keys.jobs_of_provider_in_state(p, s))
                pipe.hgetall(keys.stats(p))
                pipe.hgetall(keys.latency(p))
                pipe.zrange(keys.jobs_of_provider_in_state(p, "retrying"), 0, 0, withscores=True)
                await self._peek(keys=[keys.circuit(p)], client=pipe)
                await self._peek(keys=[keys.rate_bucket(p)], client=pipe)
            pipe.hgetall(keys.DEAD_LETTERS)
            pipe.hgetall(keys.PROVIDER_RESPONSES)
            replies = await pipe.execute()
        depth = int(replies[0])
        responses: dict[str, dict[str, int]] = {}
        for name, n in replies[-1].items():
            parsed = parse_field(_text(name))
            if parsed is not None:
                responses.setdefault(parsed[0], {})[parsed[1]] = int(n)
        out: dict[str, Any] = {"queue": self.queue, "queue_depth": depth, "providers": {},
                               "dead_letters": {_text(k): int(v) for k, v in replies[-2].items()},
                               "responses": responses}
        i = 1
        for p in providers:
            counts = {s: int(replies[i + n]) for n, s in enumerate(STATES)}
            i += len(STATES)
            stats_raw = {_text(k): _text(v) for k, v in replies[i].items()}
            latency_raw = {_text(k): _text(v) for k, v in replies[i + 1].items()}
            oldest = replies[i + 2]
            circuit, rate = _peeked(replies[i + 3]), _peeked(replies[i + 4])
            i += 5
            out["providers"][p] = {
                "counts": counts,
                "counters": {c: int(stats_raw.get(c, 0)) for c in COUNTERS},
                "latency": {
                    "buckets": [(b, int(latency_raw.get(bucket_label(b), 0))) for b in LATENCY_BUCKETS],
                    "inf": int(latency_raw.get("+Inf", 0)),
                    "count": int(latency_raw.get("count", 0)),
                    "sum": float(latency_raw.get("sum", 0)),
                },
                "oldest_retrying_id": _text(oldest[0][0]) if oldest else None,
                "circuit": circuit_view(*circuit),
                "rate_limit": rate_view(*rate),
            }
        return out

    async def summary(self) -> dict[str, Any]:
        """What an operator looks at first: per-provider health, queue depth, workers alive."""
        snap = await self.snapshot()
        oldest_ids = [v["oldest_retrying_id"] for v in snap["providers"].values() if v["oldest_retrying_id"]]
        oldest_rows = dict(zip(oldest_ids, await self._rows(oldest_ids), strict=True))
        providers: dict[str, Any] = {}
        for name, v in snap["providers"].items():
            row = oldest_rows.get(v["oldest_retrying_id"]) if v["oldest_retrying_id"] else None
            providers[name] = {
                "counts": v["counts"],
                "totals": v["counters"],
                "oldest_retrying": _row(v["oldest_retrying_id"], row) if row else None,
                "circuit": v["circuit"],
                "rate_limit": v["rate_limit"],
                "latency_seconds": {"count": v["latency"]["count"], "sum": round(v["latency"]["sum"], 3)},
            }
        totals = {s: sum(p["counts"][s] for p in providers.values()) for s in STATES}
        beats = await heartbeat.read(self.redis)
        return {"generated_at": iso(time.time()), "queue": snap["queue"], "queue_depth": snap["queue_depth"],
                "workers": _live(beats), "heartbeats": [b.view() for b in beats[:heartbeat.MAX_LISTED]],
                "provider_names": list(PROVIDER_NAMES), "totals": totals, "providers": providers}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Redis and the broker queue reachable, and at least one worker with a fresh heartbeat;
        when none is live, `missing` names the workers whose heartbeat went stale."""
        details: dict[str, Any] = {}
        missing: list[str] = []
        try:
            await self.redis.ping()
            details["redis"] = "ok"
            details["broker"] = {"queue": self.queue, "depth": int(await self.redis.llen(self.queue))}
            beats = await heartbeat.read(self.redis)
            details["workers"] = _live(beats)
            details["heartbeats"] = [b.view() for b in beats[:heartbeat.MAX_LISTED]]
            if not details["workers"]:
                silent = "".join(f"; {b.worker}: last heartbeat {b.age_seconds:.0f} s ago "
                                 f"(live within {b.live_within_seconds:g} s)" for b in beats[:5])
                missing.append(f"no worker is heartbeating (start `clientsync worker`){silent}")
        except (OSError, aioredis.RedisError) as exc:
            details["redis"] = f"unreachable: {type(exc).__name__}"
            missing.append("redis (state store and broker) is unreachable")
        details["missing"] = missing
        return not missing, details
