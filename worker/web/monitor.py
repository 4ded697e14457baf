"""The monitor JSON API (`/monitor/...`, bearer token), `/metrics`, `/readyz` and the OpenAPI file.

Thin handlers over `worker.monitor.Monitor`: parse and validate parameters (a 400 names the
field and the rule), call one method, answer JSON. The API is documented in
`worker/web/openapi.yaml`, served at `GET /monitor/openapi.yaml`.

Auth: `Authorization: Bearer <CLIENTSYNC_MONITOR_TOKEN>`, or the dashboard's session cookie
(set by the login form; HttpOnly, SameSite=Strict, a random session id kept in Redis for
`SESSION_SECONDS` and deleted at sign-out, never the token itself). Repeated wrong tokens from
one address lock it out for a growing time (429 + Retry-After). Cookie-authenticated writes must also carry the
`X-Clientsync-Request` header, which a cross-site form cannot send. Without a configured
token the monitor answers 503 and stays closed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.exceptions
from aiohttp import web

from worker import keys, safejson
from worker.metrics import CONTENT_TYPE, ReceiverMetrics, render, webhook_middleware
from worker.monitor import (
    MAX_BULK,
    MAX_LIMIT,
    ClientNotFound,
    InvalidParam,
    JobFilter,
    JobNotFound,
    Monitor,
    NotAllowed,
    parse_limit,
)
from worker.web import keys as appmod
from worker.web.middlewares import json_error

log = logging.getLogger("clientsync.web.monitor")

OPENAPI = Path(__file__).with_name("openapi.yaml")
COOKIE = "cs_monitor"
SESSION_SECONDS = 12 * 3600
CSRF_HEADER = "X-Clientsync-Request"
NO_STORE = {"Cache-Control": "no-store"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- auth -------------------------------------------------------------------------------------------
class AuthFailure(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def configured_token(request: web.Request) -> str | None:
    secret = request.app[appmod.SETTINGS].monitor_token
    value = secret.get_secret_value() if secret is not None else ""
    return value or None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def token_matches(given: str, token: str) -> bool:
    """Constant time, and equal-length inputs so the token's length does not leak either."""
    return hmac.compare_digest(_digest(given), _digest(token))


# Sessions live in Redis (`keys.dashboard_session`, TTL `SESSION_SECONDS`): the cookie holds only a
# random session id, signing out deletes the session, and a changed token ends every session
# (each stores a digest of the token it was opened with).
async def open_session(request: web.Request, token: str) -> str:
    """A new dashboard session for `token`; returns the cookie value (a random id, never the token)."""
    session_id = secrets.token_urlsafe(32)
    await request.app[appmod.REDIS].set(keys.dashboard_session(session_id), _digest(token).hex(),
                                        ex=SESSION_SECONDS)
    return session_id


async def session_valid(request: web.Request, value: str, token: str) -> bool:
    if not value or len(value) > 100:
        return False
    stored = await request.app[appmod.REDIS].get(keys.dashboard_session(value))
    if stored is None:
        return False
    held = stored.encode() if isinstance(stored, str) else bytes(stored)
    return hmac.compare_digest(held, _digest(token).hex().encode())


async def close_session(request: web.Request) -> None:
    """Sign out: the session is gone on the server, whatever the browser keeps."""
    value = request.cookies.get(COOKIE)
    if value and len(value) <= 100:
        await request.app[appmod.REDIS].delete(keys.dashboard_session(value))


# Wrong tokens from one client address are counted (`keys.auth_failures`); past
# `FREE_FAILURES` each further one locks that address out for twice as long as the last, up
# to `MAX_LOCKOUT_SECONDS`: 429 + Retry-After, whatever token it sends meanwhile.
FREE_FAILURES = 5
MAX_LOCKOUT_SECONDS = 300
# KEYS: the address's counter; ARGV: now (s), free failures, max lockout, window -> lockout seconds (0: none)
_FAILED = """
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
local over = n - tonumber(ARGV[2])
if over <= 0 then return 0 end
local wait = math.min(2 ^ (over - 1), tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'until', tonumber(ARGV[1]) + wait)
return wait
"""


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


async def _failures(request: web.Request) -> tuple[float, bool]:
    """(seconds this address must wait before its next token is even looked at, any failures counted)."""
    n, until = await request.app[appmod.REDIS].hmget(keys.auth_failures(_client(request)), ["n", "until"])
    return (max(0.0, float(until) - time.time()) if until is not None else 0.0), n is not None


async def locked_out(request: web.Request) -> float:
    return (await _failures(request))[0]


async def token_failed(request: web.Request) -> None:
    wait = await request.app[appmod.REDIS].eval(
        _FAILED, 1, keys.auth_failures(_client(request)), time.time(), FREE_FAILURES, MAX_LOCKOUT_SECONDS,
        keys.AUTH_FAILURE_WINDOW_SECONDS)
    if float(wait) > 0:
        log.warning("monitor: repeated wrong tokens from %s; locked out for %ss", _client(request), wait)


async def token_succeeded(request: web.Request) -> None:
    await request.app[appmod.REDIS].delete(keys.auth_failures(_client(request)))


def retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait)))}


async def authenticate(request: web.Request) -> str:
    """'bearer' or 'cookie'; raises AuthFailure (503 when no token is configured, 429 while locked
    out after repeated wrong tokens, else 401/403)."""
    token = configured_token(request)
    if token is None:
        raise AuthFailure(503, "the monitor is disabled: set CLIENTSYNC_MONITOR_TOKEN to enable it")
    header = request.headers.get("Authorization", "")
    if header:
        wait, failed_before = await _failures(request)
        if wait:
            raise AuthFailure(429, "too many wrong tokens from this address; retry later", retry_after(wait))
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and token_matches(given.strip(), token):
            if failed_before:
                await token_succeeded(request)
            return "bearer"
        await token_failed(request)
        raise AuthFailure(401, "invalid bearer token")
    cookie = request.cookies.get(COOKIE)
    if cookie and await session_valid(request, cookie, token):
        if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
            raise AuthFailure(403, f"a cookie-authenticated write needs the {CSRF_HEADER}: 1 header")
        return "cookie"
    raise AuthFailure(401, "missing credentials: send Authorization: Bearer <CLIENTSYNC_MONITOR_TOKEN>")


def answers(handler: Handler) -> Handler:
    """Every refusal of the monitor as the API documents it, in one place, so the handlers only
    raise: a bad parameter 400 (naming the field and the rule), an unknown job or client 404, an
    action the job's state does not allow 409, and Redis unreachable a 503 the caller can retry,
    not a 500. The ids in the answer come from the exception: the ones the handler asked about."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidParam as exc:
            return json_error(400, f"invalid parameter {exc.field}: {exc.rule}", field=exc.field, rule=exc.rule)
        except JobNotFound as exc:
            return json_error(404, str(exc), id=exc.job_id)
        except ClientNotFound as exc:
            return json_error(404, str(exc), client_id=exc.client_id)
        except NotAllowed as exc:
            return json_error(409, str(exc), id=exc.job_id, state=exc.state)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("monitor: redis unavailable on %s: %s", request.path, type(exc).__name__)
            return json_error(503, "the ledger (Redis) is unreachable; retry later", headers={"Retry-After": "5"})

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def protected(handler: Handler) -> Handler:
    @answers
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            await authenticate(request)
        except AuthFailure as exc:
            headers = dict(exc.headers)
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="clientsync monitor"'
            return json_error(exc.status, str(exc), headers=headers or None)
        return await handler(request)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


# --- helpers ----------------------------------------------------------------------------------------
def _monitor(request: web.Request) -> Monitor:
    return request.app[appmod.MONITOR]


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers=NO_STORE)


def _check_known(params: Any, allowed: set[str], where: str) -> None:
    for name in params:
        if name not in allowed:
            raise InvalidParam(name, f"unknown {where}; known: {', '.join(sorted(allowed))}")


async def _json_body(request: web.Request, *, required: bool) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise InvalidParam("body", "must be a JSON object")
        return {}
    try:
        data = safejson.loads(raw)
    except safejson.JsonError as exc:
        rule = (f"is nested deeper than {safejson.MAX_DEPTH} levels (the limit)" if "deeper" in str(exc)
                else "is not valid JSON")
        raise InvalidParam("body", rule) from exc
    if not isinstance(data, dict):
        raise InvalidParam("body", "must be a JSON object")
    return data


def _note(body: dict[str, Any], default: str) -> str:
    note = body.get("note", default)
    if not isinstance(note, str) or len(note) > 200:
        raise InvalidParam("note", "must be a string of at most 200 characters")
    return note or default


# --- handlers ---------------------------------------------------------------------------------------
@protected
async def summary(request: web.Request) -> web.Response:
    """`GET /monitor/summary`: per-provider health."""
    return _ok(await _monitor(request).summary())


@protected
async def list_jobs(request: web.Request) -> web.Response:
    """`GET /monitor/jobs`: filter and page through jobs, newest update first."""
    q = request.query
    _check_known(q.keys(), {*JobFilter.FIELDS, "limit", "cursor"}, "query parameter")
    f = JobFilter.parse(q)
    limit = parse_limit(q.get("limit"), default=50, maximum=MAX_LIMIT)
    page = await _monitor(request).list_jobs(f, limit=limit, cursor=q.get("cursor") or None)
    return _ok({"jobs": page.jobs, "next_cursor": page.next_cursor, "limit": limit})


@protected
async def get_job(request: web.Request) -> web.Response:
    """`GET /monitor/jobs/{id}`: one job with its attempt history."""
    return _ok(await _monitor(request).job(request.match_info["id"]))


@protected
async def dead_groups(request: web.Request) -> web.Response:
    """`GET /monitor/dead-groups`: dead jobs (of a provider, of a client) by error class and provider, exact counts."""
    _check_known(request.query.keys(), {"provider", "client_id"}, "query parameter")
    f = JobFilter.parse(request.query, allowed=("provider", "client_id"))
    return _ok(await _monitor(request).dead_groups(provider=f.provider, client_id=f.client_id))


@protected
async def get_client(request: web.Request) -> web.Response:
    """`GET /monitor/clients/{client_id}`: the client's record at each provider and its jobs."""
    q = request.query
    _check_known(q.keys(), {"limit", "cursor"}, "query parameter")
    limit = parse_limit(q.get("limit"), default=100, maximum=MAX_LIMIT)
    return _ok(await _monitor(request).client(request.match_info["client_id"], limit=limit,
                                              cursor=q.get("cursor") or None))


@protected
async def replay_job(request: web.Request) -> web.Response:
    """`POST /monitor/jobs/{id}/replay`: 202, the job is queued again."""
    return await _job_action(request, "replay", status=202)


@protected
async def discard_job(request: web.Request) -> web.Response:
    """`POST /monitor/jobs/{id}/discard`."""
    return await _job_action(request, "discard", status=200)


@protected
async def resolve_job(request: web.Request) -> web.Response:
    """`POST /monitor/jobs/{id}/resolve` `{"action": "adopt", "provider_id": "..."}` or `{"action": "create"}`:
    answer a needs_attention job (idempotent); 202, the job is queued again."""
    job_id = request.match_info["id"]
    body = await _json_body(request, required=True)
    _check_known(body, {"action", "provider_id"}, "field")
    action, provider_id = body.get("action"), body.get("provider_id")
    if not isinstance(action, str):
        raise InvalidParam("action", "must be 'adopt' or 'create'")
    if provider_id is not None and not isinstance(provider_id, str):
        raise InvalidParam("provider_id", "must be a string")
    result = await _monitor(request).resolve(job_id, action, provider_id)
    log.info("operator resolved job %s: %s", job_id, result.get("resolution"))
    return _ok(result, status=200 if result.get("already") else 202)


async def _job_action(request: web.Request, action: str, *, status: int) -> web.Response:
    job_id = request.match_info["id"]
    monitor = _monitor(request)
    act = monitor.replay if action == "replay" else monitor.discard
    body = await _json_body(request, required=False)
    _check_known(body, {"note"}, "field")
    result = await act(job_id, note=_note(body, f"{action}ed by operator"))
    log.info("operator %sed job %s", action, job_id)
    return _ok(result, status=status)


_BULK_FILTER = ("provider", "error_class", "client_id", "since", "until")


@protected
async def replay_bulk(request: web.Request) -> web.Response:
    """`POST /monitor/replay`: replay every dead job matching a filter."""
    body = await _json_body(request, required=True)
    _check_known(body, {*_BULK_FILTER, "limit", "dry_run", "note"}, "field")
    f = JobFilter.parse(body, allowed=_BULK_FILTER)
    limit = parse_limit(body.get("limit"), default=1000, maximum=MAX_BULK)
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidParam("dry_run", "must be true or false")
    result = await _monitor(request).replay_matching(f, limit=limit, dry_run=dry_run,
                                                     note=_note(body, "bulk replay by operator"))
    if not dry_run:
        log.info("operator bulk-replayed %d dead jobs", result["replayed"])
    return _ok(result, status=200 if dry_run else 202)


@protected
async def provider_action(request: web.Request) -> web.Response:
    """`POST /monitor/providers/{provider}/{action}`: pause, resume or probe now; recorded."""
    provider, action = request.match_info["provider"], request.match_info["action"]
    body = await _json_body(request, required=False)
    _check_known(body, {"note"}, "field")
    # the dashboard says so in a header; anything else with the token is the API
    actor = "dashboard" if request.headers.get(CSRF_HEADER) else "api"
    result = await _monitor(request).provider_action(provider, action, actor=actor, note=_note(body, ""))
    return _ok(result)


@protected
async def audit(request: web.Request) -> web.Response:
    """`GET /monitor/audit`: operator actions and automatic pauses, newest first."""
    _check_known(request.query.keys(), {"limit"}, "query parameter")
    limit = parse_limit(request.query.get("limit"), default=100, maximum=1000)
    return _ok({"entries": await _monitor(request).audit(limit=limit)})


async def openapi(request: web.Request) -> web.Response:
    """`GET /monitor/openapi.yaml` (public: it documents the API, it holds no data)."""
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")


@answers
async def metrics(request: web.Request) -> web.StreamResponse:
    """`GET /metrics`: Prometheus text format; no token, no emails, no secrets."""
    snapshot = await _monitor(request).snapshot()
    body = render(snapshot, request.app[appmod.METRICS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    """`GET /readyz`: Redis and the broker reachable and a worker with a fresh heartbeat (`worker.heartbeat`),
    else 503 naming what is not (and any worker whose heartbeat went stale)."""
    ready, details = await _monitor(request).readiness()
    return web.json_response({"status": "ready" if ready else "not ready", **details},
                             status=200 if ready else 503, headers=NO_STORE)


# --- wiring -----------------------------------------------------------------------------------------
def setup(app: web.Application) -> None:
    """The Monitor (built on the app's Redis client) and the receiver's own counters; the routes
    to these handlers are in `worker.web.routes`."""
    app[appmod.METRICS] = ReceiverMetrics()
    app.middlewares.insert(0, webhook_middleware(app[appmod.METRICS]))

    async def monitor_ctx(app: web.Application) -> AsyncIterator[None]:
        app[appmod.MONITOR] = Monitor(app[appmod.REDIS], queue=app[appmod.SETTINGS].queue)
        yield

    app.cleanup_ctx.append(monitor_ctx)
