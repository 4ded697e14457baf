"""Poison-proof intake: every raw queue entry is checked before kombu and Celery parse it.

Celery trusts the queue. Measured on Celery/kombu 5.7: an entry that is not JSON, or a JSON
list, raises in kombu's `Channel._brpop_read` (`loads(...)` of the entry; the message is lost);
a body that is not base64 raises in kombu's `virtual.Message.__init__` (lost); a body that is
a 2- or 5-element list or a non-numeric `timelimit` header raises in Celery's strategy after
kombu recorded the message as unacked, so every restarted worker pops it again and dies again.
Celery's own handlers for the cases it does catch (`on_unknown_task`, `on_invalid_task`,
`on_decode_error`) log the whole body, emails included, and keep no record.

So the worker's broker transport (`tasks.transport.Channel`) sends every entry it takes off the
list through `Gate.admit` first. An entry that fails any rule of `check` is never handed to
kombu or Celery: it is already off the list (and out of the process's inbox), it
becomes a dead letter in the ledger (provider `intake`, the reason and the stage, the raw entry
truncated to `RAW_KEPT` characters with emails masked), counted by reason in
`keys.DEAD_LETTERS` (`clientsync_dead_letters_total` at /metrics), and logged in one masked line.
What passes is exactly what Celery's protocol v2 needs, so Celery's parsing cannot fail on it;
should it fail anyway, `tasks.transport.Channel._deliver_guarded` acks the message and dead-letters it
(stage `celery`) instead of letting the exception kill the consumer.

Internal tasks: a `clientsync.apply_change` must carry a valid authenticity mark
(`worker.parking.mark`), name a known provider and an existing ledger job; otherwise it is a
dead letter (`forged`, `unknown_provider`, `unknown_job`), never a job.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery.app.task import Context

from worker import keys, safejson
from worker.ledger import DEAD_LETTER_LUA, Attempt, dead_letter_fields, now_ms
from worker.models import PROVIDER_NAMES, mask_emails
from worker.parking import APPLY_TASK, TASK_KEY_LUA, mark_matches, new_task_key
from worker.producer import SYNC_TASK

log = logging.getLogger("clientsync.intake")

#: the tasks a clientsync queue carries; any other name is a dead letter
KNOWN_TASKS = frozenset({SYNC_TASK, APPLY_TASK})
#: an entry larger than this is refused unread (the receiver's own messages are under 300 KB)
MAX_ENTRY_BYTES = 1024 * 1024
#: characters of the raw entry kept in a dead letter
RAW_KEPT = 4096
#: the transport option (`broker_transport_options`) that carries the gate's settings
OPTION = "clientsync_intake"

#: every reason a message can be refused for (the label values of `clientsync_dead_letters_total`)
REASONS: tuple[str, ...] = (
    "too_large", "bad_encoding", "not_json", "bad_envelope", "content_type", "bad_properties", "bad_header",
    "unknown_task", "expired", "bad_body", "bad_arguments", "unknown_provider", "forged", "unknown_job",
    "celery_error", "invalid_message",
)

_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
#: attributes of Celery's task request: a header with one of these names would overwrite them
_CONTEXT_NAMES = frozenset(n for n in dir(Context) if not n.startswith("__"))


class Refused(Exception):
    """The entry breaks a rule: `reason` (a fixed label), `stage` (where), and a readable detail."""

    def __init__(self, reason: str, stage: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.stage = stage
        self.detail = detail


@dataclass(frozen=True)
class Admitted:
    """An entry that passed `check`: the parsed envelope and its decoded arguments."""

    message: dict[str, Any]
    task: str
    args: list[Any]
    kwargs: dict[str, Any]


# --- the rules ------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _moment(v: Any) -> datetime:
    if not isinstance(v, str) or len(v) > 64:
        raise ValueError("must be an ISO 8601 string")
    moment = datetime.fromisoformat(v)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _opt(check: Any) -> Any:
    return lambda v: v is None or check(v)


def _iso_ok(v: Any) -> bool:
    try:
        _moment(v)
    except ValueError:
        return False
    return True


_HEADERS: dict[str, tuple[Any, str]] = {
    "lang": (_opt(lambda v: isinstance(v, str)), "a string"),
    "shadow": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "eta": (_opt(_iso_ok), "an ISO 8601 time or null"),
    "expires": (_opt(_iso_ok), "an ISO 8601 time or null"),
    "group": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "group_index": (_opt(_is_int), "an integer or null"),
    "retries": (_opt(lambda v: _is_int(v) and v >= 0), "a non-negative integer"),
    "timelimit": (_opt(lambda v: isinstance(v, list) and len(v) == 2
                       and all(x is None or (_is_number(x) and x > 0) for x in v)),
                  "a list of two positive numbers or nulls"),
    "root_id": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "parent_id": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "argsrepr": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "kwargsrepr": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "origin": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "ignore_result": (_opt(lambda v: isinstance(v, bool)), "true, false or null"),
    "replaced_task_nesting": (_opt(lambda v: _is_int(v) and v >= 0), "a non-negative integer"),
    "stamped_headers": (_opt(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
                        "a list of strings or null"),
    "stamps": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "clientsync_job": (lambda v: isinstance(v, str), "a string"),
    "clientsync_mark": (lambda v: isinstance(v, str), "a string"),
}


def _envelope(entry: bytes) -> dict[str, Any]:
    if len(entry) > MAX_ENTRY_BYTES:
        raise Refused("too_large", "transport", f"entry of {len(entry)} bytes exceeds {MAX_ENTRY_BYTES}")
    if not entry.strip():
        raise Refused("not_json", "transport", "empty entry")
    try:
        text = entry.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused("bad_encoding", "transport", f"entry is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        message = safejson.loads(text)
    except safejson.JsonError as exc:
        raise Refused("not_json", "transport", f"entry is not a JSON object: {exc}") from exc
    if not isinstance(message, dict):
        raise Refused("bad_envelope", "transport", f"entry is a JSON {type(message).__name__}, not an object")
    return message


def _check_headers(headers: Any) -> tuple[str, str]:
    if not isinstance(headers, dict):
        raise Refused("bad_header", "envelope", "headers must be an object (Celery protocol v2)")
    task, task_id = headers.get("task"), headers.get("id")
    if not isinstance(task, str) or not task:
        raise Refused("bad_header", "envelope", "header task must be a non-empty string")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 255:
        raise Refused("bad_header", "envelope", "header id must be a non-empty string of at most 255 characters")
    for name, value in headers.items():
        rule = _HEADERS.get(name)
        if rule is not None:
            if not rule[0](value):
                raise Refused("bad_header", "envelope", f"header {name} must be {rule[1]}")
        elif name in _CONTEXT_NAMES and name not in ("task", "id"):
            raise Refused("bad_header", "envelope", f"header {name} would overwrite Celery's task request")
    if task not in KNOWN_TASKS:
        raise Refused("unknown_task", "envelope",
                      f"unknown task {task[:100]!r}; known: {', '.join(sorted(KNOWN_TASKS))}")
    expires = headers.get("expires")
    if expires is not None and _moment(expires).timestamp() < time.time():
        raise Refused("expired", "envelope", f"the message expired at {expires}")
    return task, task_id


def _check_properties(props: Any) -> None:
    if not isinstance(props, dict):
        raise Refused("bad_properties", "envelope", "properties must be an object")
    tag = props.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise Refused("bad_properties", "envelope", "properties.delivery_tag must be a non-empty string")
    if props.get("body_encoding") != "base64":
        raise Refused("bad_properties", "envelope", "properties.body_encoding must be 'base64'")
    info = props.get("delivery_info")
    if not isinstance(info, dict) or not isinstance(info.get("exchange", ""), str) \
            or not isinstance(info.get("routing_key", ""), str):
        raise Refused("bad_properties", "envelope",
                      "properties.delivery_info must be an object with string exchange and routing_key")
    priority = props.get("priority")
    if priority is not None and not (_is_int(priority) and 0 <= priority <= 255):
        raise Refused("bad_properties", "envelope", "properties.priority must be an integer 0-255")
    for name in ("correlation_id", "reply_to"):
        if props.get(name) is not None and not isinstance(props[name], str):
            raise Refused("bad_properties", "envelope", f"properties.{name} must be a string")
    if props.get("delivery_mode") is not None and not _is_int(props["delivery_mode"]):
        raise Refused("bad_properties", "envelope", "properties.delivery_mode must be an integer")


def _body(message: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    body = message.get("body")
    if not isinstance(body, str) or not body:
        raise Refused("bad_body", "body", "body must be a non-empty base64 string")
    try:
        raw = base64.b64decode(body)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise Refused("bad_body", "body", "body is not base64 of UTF-8 text") from exc
    try:
        payload = safejson.loads(text)
    except safejson.JsonError as exc:
        raise Refused("bad_body", "body", f"body is not JSON: {exc}") from exc
    if not (isinstance(payload, list) and len(payload) == 3):
        shape = f"a {len(payload)}-element list" if isinstance(payload, list) else f"a JSON {type(payload).__name__}"
        raise Refused("bad_body", "body", f"body must be [args, kwargs, embed] (protocol v2), not {shape}")
    args, kwargs, embed = payload
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise Refused("bad_body", "body", "body must be [args (a list), kwargs (an object), embed]")
    if not isinstance(embed, dict) or set(embed) - _EMBED_KEYS or any(v is not None for v in embed.values()):
        raise Refused("bad_body", "body", "embed must be an object whose callbacks, errbacks, chain and chord "
                                          "are null (clientsync tasks take no callbacks)")
    return args, kwargs


def check(entry: bytes) -> Admitted:
    """The entry as Celery protocol v2 clientsync can run, or `Refused` naming the rule it broke.

    Everything that does not need Redis: apply_change's mark and job are checked by `Gate`.
    """
    message = _envelope(entry)
    for name in ("headers", "properties"):
        if name not in message:
            raise Refused("bad_envelope", "envelope", f"the envelope has no {name}")
    if message.get("content-type") != "application/json":
        raise Refused("content_type", "envelope",
                      f"content-type must be application/json, not {str(message.get('content-type'))[:60]!r}")
    encoding = message.get("content-encoding")
    if not isinstance(encoding, str) or encoding.lower() not in ("utf-8", "utf8"):
        raise Refused("bad_envelope", "envelope", "content-encoding must be utf-8")
    task, _ = _check_headers(message["headers"])
    _check_properties(message["properties"])
    args, kwargs = _body(message)
    if task == SYNC_TASK:
        if "received_at" in kwargs and not _is_number(kwargs["received_at"]):
            raise Refused("bad_arguments", "task", "kwargs.received_at must be a number (unix seconds)")
    else:
        if not (len(args) == 2 and isinstance(args[0], dict) and isinstance(args[1], str)):
            raise Refused("bad_arguments", "task", f"{APPLY_TASK} takes (change object, provider name)")
        if set(kwargs) - {"attempt"} or not (_is_int(kwargs.get("attempt", 1)) and kwargs.get("attempt", 1) >= 1):
            raise Refused("bad_arguments", "task", f"{APPLY_TASK} takes one keyword, attempt (an integer >= 1)")
        if args[1] not in PROVIDER_NAMES:
            raise Refused("unknown_provider", "task", f"unknown provider {args[1][:50]!r}")
    return Admitted(message, task, args, kwargs)


def readable(entry: bytes) -> str:
    """The entry for a dead letter: the body decoded where possible, emails masked, truncated."""
    text = entry[:MAX_ENTRY_BYTES].decode("utf-8", "replace")
    try:
        message = safejson.loads(text)
        if isinstance(message, dict) and isinstance(message.get("body"), str):
            message = {**message, "body": base64.b64decode(message["body"]).decode("utf-8")}
            text = json.dumps(message, ensure_ascii=False)
    except (safejson.JsonError, binascii.Error, ValueError):
        pass
    # Mask a little past the cut, so an address straddling it is masked whole, then cut.
    return mask_emails(text[:RAW_KEPT + 512])[:RAW_KEPT]


# --- the gate: checks with Redis, and dead letters ------------------------------------------------
class Gate:
    """Admit or dead-letter raw entries, with its own (synchronous) Redis client."""

    def __init__(self, redis_url: str, *, max_jobs: int) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
        self.max_jobs = max_jobs
        self._dead_letter = self.redis.register_script(DEAD_LETTER_LUA)
        self._task_key = self.redis.register_script(TASK_KEY_LUA)
        self._key: bytes | None = None

    def admit(self, entry: bytes | str, queue: str) -> dict[str, Any] | None:
        """The parsed message to deliver, or None when the entry became a dead letter."""
        data = entry.encode("utf-8", "surrogateescape") if isinstance(entry, str) else bytes(entry)
        try:
            admitted = check(data)
            if admitted.task == APPLY_TASK:
                self._check_internal(admitted)
        except Refused as exc:
            self.dead_letter(data, exc.reason, exc.stage, exc.detail, queue=queue)
            return None
        return admitted.message

    def _check_internal(self, admitted: Admitted) -> None:
        change, provider = admitted.args
        headers = admitted.message["headers"]
        job_id = headers.get("clientsync_job")
        event_id = change.get("event_id")
        if self._key is None:
            value = self._task_key(keys=[keys.TASK_KEY], args=[new_task_key()])
            self._key = value if isinstance(value, bytes) else str(value).encode()
        if not (isinstance(job_id, str) and isinstance(event_id, str) and job_id == keys.job_id(provider, event_id)
                and mark_matches(self._key, headers.get("clientsync_mark"), job_id, change, provider,
                                 admitted.kwargs.get("attempt", 1))):
            raise Refused("forged", "task", f"{APPLY_TASK} without a valid clientsync mark (only clientsync "
                                            "creates internal tasks)")
        if not self.redis.exists(keys.job(job_id)):
            raise Refused("unknown_job", "task", f"{APPLY_TASK} for job {job_id[:120]!r}, which is not in the ledger")

    def dead_letter(self, entry: bytes, reason: str, stage: str, detail: str, *, queue: str) -> str:
        """Record the entry as a dead letter (one round trip); returns its ledger id."""
        job_id = f"intake:{uuid.uuid4().hex}"
        detail = mask_emails(detail)
        task_id = _task_id(entry)
        message = f"{stage}: {detail}"
        attempt = Attempt(1, time.time(), "dead", reason, None, message)
        fields = dead_letter_fields(readable(entry), attempt, reason=reason, stage=stage, task_id=task_id)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                self._dead_letter(keys=[keys.DEAD_LETTERS], args=[job_id, now_ms(), json.dumps(fields),
                                                                  attempt.to_json(), self.max_jobs, reason],
                                  client=pipe)
                pipe.execute()
        except redis.RedisError as exc:
            # The entry is already off the list; without Redis the log line is all that is left.
            log.error("could not record dead letter %s (%s) from %s: %s; entry: %s", job_id, reason, queue, exc,
                      readable(entry)[:500])
            return job_id
        log.warning("dead-lettered a message from %s as %s: %s (%s, task id %s)", queue, job_id, message, reason,
                    mask_emails(task_id or "-"))
        return job_id


def _task_id(entry: bytes) -> str | None:
    try:
        message = json.loads(entry)
        headers = message.get("headers") if isinstance(message, dict) else None
        value = headers.get("id") if isinstance(headers, dict) else None
    except (ValueError, RecursionError):
        return None
    return value[:255] if isinstance(value, str) else None
