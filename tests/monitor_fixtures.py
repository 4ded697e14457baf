"""Helpers for the monitoring tests: ledger jobs in chosen states, a receiver app, headers. (The
`r`, `ledger` and `api` fixtures of the monitor API tests are in tests/conftest.py.)"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from worker.ledger import Attempt, Ledger
from worker.models import ClientChange
from worker.settings import Settings

TOKEN = "test-monitor-token-0123456789-abcdefghij"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: the type of pytest-aiohttp's `aiohttp_client` fixture
MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


def make_change(event_id: str, client_id: str = "c1", *, email: str | None = None, **client: Any) -> ClientChange:
    return ClientChange.model_validate({
        "event_id": event_id,
        "occurred_at": "2024-05-01T12:00:00Z",
        "action": "upsert",
        "client": {"id": client_id, "name": f"Client {client_id}",
                   "email": email or f"{client_id}.person@example.com", **client},
    })


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"monitor_token": TOKEN, "webhook_secret": SECRET, "queue": "celery"}
    values.update(overrides)
    return Settings(**values)


async def make_job(ledger: Ledger, provider: str, event_id: str, state: str, *, client_id: str = "c1",
                   email: str | None = None, error_class: str = "validation", status: int = 422,
                   message: str | None = None, received_ago: float = 1.5) -> str:
    """One job driven through real ledger transitions to `state`."""
    change = make_change(event_id, client_id, email=email)
    job_id = await ledger.enqueued(change, provider, received_at=time.time() - received_ago)
    if state == "queued":
        return job_id
    await ledger.running(job_id)
    now = time.time()
    if state == "running":
        return job_id
    if state == "retrying":
        await ledger.retrying(job_id, Attempt(1, now, "retrying", "server_error", 503, "busy, try later",
                                              next_attempt_at=now + 30))
    elif state == "succeeded":
        await ledger.succeeded(job_id, Attempt(1, now, "succeeded", duration_ms=12.0), result="created",
                               provider_id="p-1")
    elif state == "skipped":
        await ledger.skipped(job_id, Attempt(1, now, "skipped"), reason="stale", provider_id=None)
    elif state == "dead":
        await ledger.dead(job_id, Attempt(1, now, "dead", error_class, status,
                                          message or f"rejected {change.client.email}: invalid field",
                                          {"email": ["already taken by " + (change.client.email or "")]}))
    else:
        raise ValueError(state)
    return job_id


async def info_commandstats(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
