"""Thin handlers: read bytes, verify, parse, claim+enqueue, answer."""

from __future__ import annotations

import logging
import time

import orjson
import redis.exceptions
from aiohttp import web
from pydantic import ValidationError

from worker import safejson
from worker.ledger import Attempt
from worker.models import ClientChange, change_json_schema
from worker.web import keys as appmod
from worker.web.middlewares import json_error
from worker.web.signatures import SignatureError, verify

log = logging.getLogger("clientsync.web")


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Each invalid field with its path and the rule it broke."""
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False)
    ]


async def receive_client_webhook(request: web.Request) -> web.Response:
    """`POST /webhooks/clients`: a Standard Webhooks-signed `ClientChange`."""
    received_at = time.time()
    settings = request.app[appmod.SETTINGS]
    body = await request.read()  # raises 413 past client_max_size
    secrets: list[bytes] = request.app[appmod.WEBHOOK_KEYS]
    try:
        verify(request.headers, body, secrets, tolerance=settings.webhook_tolerance_seconds)
    except SignatureError as exc:
        return json_error(401, f"invalid signature: {exc}")
    if not is_json(request.content_type):
        return json_error(415, f"Content-Type must be application/json, not {request.content_type[:80]!r}")
    try:
        # One pass from the bytes with pydantic's own parser (its nesting limit keeps deep bodies
        # from recursing). A body it refuses takes the receiver's earlier path, which names the
        # problem precisely and still accepts what that path accepted (a lone surrogate escape).
        change = ClientChange.model_validate_json(body)
    except ValidationError:
        parsed = parse_change(body)
        if isinstance(parsed, web.Response):
            return parsed
        change = parsed
    try:
        result = await request.app[appmod.PRODUCER].enqueue(change, received_at=received_at)
    except (redis.exceptions.RedisError, OSError) as exc:
        # The claim and the push are one script: nothing was claimed, so the sender's retry works.
        log.error("enqueue failed for event %s: %s", change.event_id, exc)
        return json_error(503, "queue unavailable, retry later", headers={"Retry-After": "5"})
    if result.status == "conflict":
        return await _conflict(request, change)
    if result.status == "duplicate":
        return _answer({"event_id": change.event_id, "status": "duplicate"}, status=200)
    log.info("queued event %s for client %s", change.event_id, change.client.id)
    return _answer({"event_id": change.event_id, "status": "queued", "task_id": result.task_id}, status=202)


def _answer(data: dict[str, str | None], *, status: int) -> web.Response:
    """`web.json_response`'s answer, written by orjson (about half its time per webhook)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", charset="utf-8")


def parse_change(body: bytes) -> ClientChange | web.Response:
    """The body as a `ClientChange` via the standard library's parser, or the 400/422 saying why not."""
    try:
        data = safejson.loads(body)
    except safejson.JsonError as exc:
        if "deeper" in str(exc):
            return json_error(400, f"body is nested deeper than {safejson.MAX_DEPTH} levels (the limit)",
                              limit=safejson.MAX_DEPTH)
        return json_error(400, "body is not valid JSON")
    if not isinstance(data, dict):
        return json_error(400, "body must be a JSON object (a ClientChange)")
    try:
        return ClientChange.model_validate(data)
    except ValidationError as exc:
        return json_error(422, "invalid ClientChange", errors=field_errors(exc))


def is_json(content_type: str) -> bool:
    """`application/json`, or a `+json` type (e.g. `application/cloudevents+json`)."""
    return content_type == "application/json" or (content_type.startswith("application/")
                                                  and content_type.endswith("+json"))


async def _conflict(request: web.Request, change: ClientChange) -> web.Response:
    """The event id was already received with another payload: 409, recorded as a dead letter."""
    message = (f"event {change.event_id} was already received with a different payload; "
               "a new change needs a new event_id")
    ledger = request.app[appmod.MONITOR].ledger
    try:
        await ledger.dead_letter(
            f"conflict:{change.event_id}:{change.fingerprint()[:12]}", raw=change.model_dump_json(),
            attempt=Attempt(1, time.time(), "dead", "event_conflict", 409, message),
            reason="event_conflict", stage="webhook",
        )
    except (redis.exceptions.RedisError, OSError) as exc:
        log.error("could not record the conflict of event %s: %s", change.event_id, exc)
        return json_error(503, "queue unavailable, retry later", headers={"Retry-After": "5"})
    log.warning("event %s received again with a different payload: 409", change.event_id)
    return json_error(409, message, event_id=change.event_id)


async def root(request: web.Request) -> web.Response:
    """`GET /`: the operator's way in is the dashboard."""
    raise web.HTTPFound("/dashboard")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def schema(request: web.Request) -> web.Response:
    return web.json_response(change_json_schema())
