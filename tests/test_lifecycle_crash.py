"""A worker SIGKILLed while it runs a job: its message comes back in seconds, whoever pushed it.

Real redis-server, real Celery worker processes, the sandbox over HTTP. The broker's
visibility timeout stays at its default (3,600 s): before message ownership
(worker.inflight, tasks.transport) each of these waited an hour, because the old in-flight
tracking stopped when a task started and never covered a copy it had not pushed itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import DATA, running_stack, uid
from tests.helpers import change, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.models import ClientChange
from worker.producer import SYNC_TASK, Producer, task_message

PROVIDER = "qonto"


def foreign_message(payload: dict[str, Any]) -> str:
    """A `clientsync.sync_client` message as celery-node writes it (captured format)."""
    m = json.loads((DATA / "celery-redis-messages" / "celery-node-0.5.9-producer.json").read_text())
    m["body"] = base64.b64encode(json.dumps([[payload], {}, {}]).encode()).decode()
    m["headers"].update(task=SYNC_TASK, id=str(uuid.uuid4()))
    m["properties"]["delivery_tag"] = str(uuid.uuid4())
    return json.dumps(m)


def kombu_restored_message(payload: dict[str, Any]) -> str:
    """A copy as kombu's restore writes it back (after a visibility timeout or a requeue)."""
    m = json.loads(task_message(SYNC_TASK, [payload], {}, queue="celery", task_id=str(uuid.uuid4())))
    m["headers"]["redelivered"] = True
    m["properties"]["delivery_info"]["redelivered"] = True
    return json.dumps(m)


async def enqueue(r: aioredis.Redis, how: str, payload: dict[str, Any]) -> None:
    if how == "receiver":
        result = await Producer(r, queue="celery", event_ttl=3600).enqueue(
            ClientChange.model_validate(payload), received_at=time.time())
        assert result.status == "queued"
    elif how == "foreign_lpush":
        await r.lpush("celery", foreign_message(payload))
    else:
        await r.rpush("celery", kombu_restored_message(payload))


async def wait_state(r: aioredis.Redis, job_id: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (await r.hget(keys.job(job_id), "state")) != state.encode():
        assert time.monotonic() < deadline, f"{job_id} never became {state}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["receiver", "foreign_lpush", "kombu_restore"])
async def test_a_job_whose_worker_was_killed_mid_call_comes_back_and_ends_once(
        redis_server_url: str, how: str) -> None:
    with running_stack(redis_server_url, providers=[PROVIDER], workers=1, concurrency=4,
                       # Short leases (over the call timeout + settle time) so the second run can
                       # settle the first's unclear call soon.
                       CLIENTSYNC_LEASE_SECONDS="8", CLIENTSYNC_QONTO_TIMEOUT="5", CLIENTSYNC_QONTO_SETTLE_SECONDS="1",
                       CLIENTSYNC_RETRY_BASE_SECONDS="0.2",
                       CLIENTSYNC_RETRY_CAP_SECONDS="1") as stack:
        base = f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"
        r = aioredis.from_url(stack.redis_url)
        client_id = uid("c-")
        payload = {**change(uid("e-"), client_id), "providers": [PROVIDER]}
        job_id = keys.job_id(PROVIDER, payload["event_id"])
        async with aiohttp.ClientSession() as http:
            # Every call takes 3 s: the worker is killed while it holds the message mid-call.
            await set_faults(http, base, latency_ms=3000)
            await enqueue(r, how, payload)
            await wait_state(r, job_id, "running")
            stack.kill("worker0")
            await set_faults(http, base, latency_ms=0)
            stack.start_worker("worker1", concurrency=4)
            # Far below the broker's visibility timeout (3,600 s): only the reaper can meet it.
            records = await wait_jobs(stack.redis_url, [job_id], timeout=120)
            assert records[job_id]["state"] == "succeeded", records[job_id]
            mine = [c for c in await sandbox_clients(http, base) if client_id in json.dumps(c)]
            assert len(mine) == 1, f"expected one record at the provider, got {len(mine)}"
            assert await r.zcard(keys.jobs_in_state("running")) == 0
            # Every copy is acked in the end: nothing queued, nothing held.
            deadline = time.monotonic() + 60
            while await r.llen("celery") or await r.hlen(keys.KOMBU_UNACKED):
                assert time.monotonic() < deadline, "a copy of the message stayed queued or unacked"
                await asyncio.sleep(0.1)
        await r.aclose()
