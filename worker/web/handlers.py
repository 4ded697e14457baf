"""Thin handlers: read bytes, verify, parse, claim+enqueue, answer."""

from __future__ import annotations

import json
import logging
import time

import redis.exceptions
from aiohttp import web
from pydantic import ValidationError

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
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return json_error(400, "body is not valid JSON")
    if not isinstance(data, dict):
        return json_error(400, "body must be a JSON object (a ClientChange)")
    try:
        change = ClientChange.model_validate(data)
    except ValidationError as exc:
        return json_error(422, "invalid ClientChange", errors=field_errors(exc))
    try:
        result = await request.app[appmod.PRODUCER].enqueue(change, received_at=received_at)
    except (redis.exceptions.RedisError, OSError) as exc:
        # The claim and the push are one script: nothing was claimed, so the sender's retry works.
        log.error("enqueue failed for event %s: %s", change.event_id, exc)
        return json_error(503, "queue unavailable, retry later", headers={"Retry-After": "5"})
    if result.status == "duplicate":
        return web.json_response({"event_id": change.event_id, "status": "duplicate"}, status=200)
    log.info("queued event %s for client %s", change.event_id, change.client.id)
    return web.json_response({"event_id": change.event_id, "status": "queued", "task_id": result.task_id},
                             status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def schema(request: web.Request) -> web.Response:
    return web.json_response(change_json_schema())
