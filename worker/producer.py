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
from worker.models import ClientChange

SYNC_TASK = "clientsync.sync_client"

_CLAIM_AND_PUSH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  redis.call('LPUSH', KEYS[2], ARGV[3])
  return 1
end
return 0
"""


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
            "argsrepr": f"<{len(args)} args>",
            "kwargsrepr": "{}",
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
    status: Literal["queued", "duplicate"]
    task_id: str | None


class Producer:
    """Claims event ids and enqueues changes; one round trip per change."""

    def __init__(self, redis: aioredis.Redis, *, queue: str, event_ttl: int) -> None:
        self.redis = redis
        self.queue = queue
        self.event_ttl = event_ttl
        self._claim_and_push = redis.register_script(_CLAIM_AND_PUSH)

    async def enqueue(self, change: ClientChange, *, received_at: float) -> Enqueued:
        """Queue `change` unless its event id was seen; raises redis errors to the caller."""
        task_id = str(uuid.uuid4())
        payload = change.model_dump(mode="json")
        message = task_message(SYNC_TASK, [payload], {"received_at": received_at}, queue=self.queue,
                               task_id=task_id)
        pushed = await self._claim_and_push(
            keys=[keys.event(change.event_id), self.queue], args=[task_id, self.event_ttl, message]
        )
        return Enqueued("queued", task_id) if pushed else Enqueued("duplicate", None)
