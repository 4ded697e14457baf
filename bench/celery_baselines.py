"""Bench-only Celery app: the baselines `bench_throughput.py` compares clientsync against.

Not part of clientsync; nothing imports it but the Celery workers `bench_throughput.py` starts:

    celery -A celery_baselines worker --pool threads --concurrency 16 ...   (PYTHONPATH=bench/)

- `bench.noop`: does nothing. Its drain rate is the ceiling of stock Celery on this Redis, pool
  and concurrency: what any Celery task costs before it does any work.
- `bench.naive_sync`: the naive way to sync a change: a new aiohttp session (and event loop) for
  the provider call, one POST of the client to the Invoice Ninja sandbox, no idempotency key, no
  lookup, no Redis state. Raises on a non-2xx answer (Celery then logs the failure and acks).

The Celery settings mirror clientsync's (`tasks/app.py`): JSON only, results ignored, late acks,
requeue on a lost worker, prefetch 1, the same visibility timeout. Task events follow
`BENCH_TASK_EVENTS` (the bench sets it as it sets clientsync's `CLIENTSYNC_TASK_EVENTS`). The
broker transport is kombu's stock Redis transport (BRPOP), not clientsync's (BLMOVE + deliver
script): the difference is part of what the comparison measures.

Environment: BENCH_BROKER_URL (required), BENCH_TASK_EVENTS (1/0), BENCH_NAIVE_URL and
BENCH_NAIVE_TOKEN (Invoice Ninja sandbox base URL and token; naive task only).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
from celery import Celery

EVENTS = os.environ.get("BENCH_TASK_EVENTS", "1") == "1"

app = Celery("bench_baselines", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": 3600},
    broker_connection_retry_on_startup=True,
    worker_send_task_events=EVENTS,
    task_send_sent_event=EVENTS,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(*args: Any, **kwargs: Any) -> None:
    """Nothing: the cost of a Celery task on its own."""


def naive_body(change: dict[str, Any]) -> dict[str, Any]:
    """The client as Invoice Ninja's POST /api/v1/clients wants it (contacts and country_id required)."""
    client = change["client"]
    contacts = client.get("contacts") or [{}]
    return {
        "name": client["name"],
        "contacts": [{"first_name": contacts[0].get("first_name"), "last_name": contacts[0].get("last_name"),
                      "email": client.get("email")}],
        "country_id": 840,
    }


@app.task(name="bench.naive_sync")
def naive_sync(change: dict[str, Any]) -> int:
    """POST the client with a fresh session (a fresh event loop too): no pooling, no state."""
    url = os.environ["BENCH_NAIVE_URL"].rstrip("/") + "/api/v1/clients"
    headers = {"X-API-TOKEN": os.environ["BENCH_NAIVE_TOKEN"]}

    async def post() -> int:
        async with aiohttp.ClientSession() as session, \
                session.post(url, json=naive_body(change), headers=headers) as resp:
            await resp.read()
            return resp.status

    status = asyncio.run(post())
    if not 200 <= status < 300:
        raise RuntimeError(f"Invoice Ninja sandbox answered {status}")
    return status
