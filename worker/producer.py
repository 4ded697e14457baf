"""Enqueue `clientsync.sync_client` jobs without blocking: Celery protocol v2 over redis.asyncio.

The receiver claims the event id and pushes the Celery message in one Lua script, so the
claim and the enqueue succeed or fail together: a 2xx always means "durably queued", and
a failure leaves no claim behind to swallow the sender's retry. The message is exactly
what `celery.send_task` would write to the Redis list (see
shared/external/celery-redis-messages/ and Celery's docs/internals/protocol.rst).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from worker import keys
from worker.inflight import TRACK_LUA
from worker.lua import NOW_LUA
from worker.models import ClientChange, mask_emails

SYNC_TASK = "clientsync.sync_client"

# The claim holds "<task id> <payload fingerprint>": a second send of the event id with the
# same payload is a duplicate (0), with another payload a conflict (2). A claim written before
# fingerprints were kept (no space) cannot tell: a duplicate.
# KEYS: event claim, queue; ARGV: task id, TTL, message, fingerprint -> 1 queued, 0 duplicate, 2 conflict
_CLAIM_AND_PUSH = NOW_LUA + TRACK_LUA + """
if redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[4], 'NX', 'EX', tonumber(ARGV[2])) then
  redis.call('LPUSH', KEYS[2], ARGV[3])
  track(ARGV[3], now_ms(''))
  return 1
end
local held = redis.call('GET', KEYS[1])
local space = held and string.find(held, ' ', 1, true)
if space and string.sub(held, space + 1) ~= ARGV[4] then return 2 end
return 0
"""


def _readable(value: Any, limit: int = 1000) -> str:
    text = mask_emails(json.dumps(value, ensure_ascii=False, default=str))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def task_message(task: str, args: list[Any], kwargs: dict[str, Any], *, queue: str, task_id: str) -> str:
    """A Celery message protocol v2 envelope as kombu's Redis transport stores it."""
    body = json.dumps([args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            # what Flower and `celery inspect` show: readable, with emails masked, bounded
            "argsrepr": _readable(args),
            "kwargsrepr": _readable(kwargs),
            "origin": f"{os.getpid()}@{socket.gethostname()}",
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    })


@dataclass(frozen=True)
class Enqueued:
    #: conflict: the event id was already received with another payload (nothing queued)
    status: Literal["queued", "duplicate", "conflict"]
    task_id: str | None


class Producer:
    """Claims event ids and enqueues changes; one round trip per change."""

    def __init__(self, redis: aioredis.Redis, *, queue: str, event_ttl: int) -> None:
        self.redis = redis
        self.queue = queue
        self.event_ttl = event_ttl
        self._claim_and_push = redis.register_script(_CLAIM_AND_PUSH)

    async def enqueue(self, change: ClientChange, *, received_at: float) -> Enqueued:
        """Queue `change` unless its event id was seen (then: a duplicate, or a conflict if the
        payload differs); raises redis errors to the caller."""
        task_id = str(uuid.uuid4())
        payload = change.model_dump(mode="json")
        message = task_message(SYNC_TASK, [payload], {"received_at": received_at}, queue=self.queue,
                               task_id=task_id)
        pushed = int(await self._claim_and_push(
            keys=[keys.event(change.event_id), self.queue],
            args=[task_id, self.event_ttl, message, change.fingerprint()],
        ))
        if pushed == 1:
            return Enqueued("queued", task_id)
        return Enqueued("conflict" if pushed == 2 else "duplicate", None)
