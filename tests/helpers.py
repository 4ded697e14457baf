"""Helpers for end-to-end tests: signed webhooks, ledger polling, sandbox inspection."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from worker import heartbeat, keys
from worker.web.signatures import decode_secret, sign

FINAL = {"succeeded", "skipped", "dead"}
#: the three unclear endings of a write, as sandbox fault counters (worker.sandbox.base.Faults):
#: a 5xx after applying it, the connection dropped after applying it, applied after the caller gave up
ENDINGS = ["fail_after_commit_next", "drop_after_commit_next", "apply_late_next"]


def change(
    event_id: str,
    client_id: str,
    *,
    action: str = "upsert",
    name: str | None = None,
    email: str | None = None,
    at: datetime | None = None,
    version: int | None = None,
    **client: Any,
) -> dict[str, Any]:
    """A ClientChange JSON object."""
    body: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": (at or datetime.now(UTC)).isoformat(),
        "action": action,
        "client": {"id": client_id, "name": name or f"Client {client_id}",
                   "email": email or f"{client_id}@example.com", **client},
    }
    if version is not None:
        body["version"] = version
    return body


def minutes_ago(n: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=n)


def signed_headers(secret: str, body: bytes, msg_id: str | None = None, ts: int | None = None) -> dict[str, str]:
    msg_id = msg_id or f"msg_{time.time_ns()}"
    ts = ts if ts is not None else int(time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(decode_secret(secret), msg_id, ts, body),
        "content-type": "application/json",
    }


async def post_webhook(session: aiohttp.ClientSession, url: str, secret: str, payload: dict[str, Any]) -> int:
    body = json.dumps(payload).encode()
    async with session.post(f"{url}/webhooks/clients", data=body, headers=signed_headers(secret, body)) as r:
        await r.read()
        return r.status


async def wait_jobs(redis_url: str, job_ids: Iterable[str], *, timeout: float = 60.0,
                    states: set[str] = FINAL) -> dict[str, dict[str, str]]:
    """Poll the ledger until every job is in one of `states`; return their records."""
    ids = list(job_ids)
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            async with client.pipeline(transaction=False) as pipe:
                for j in ids:
                    pipe.hgetall(keys.job(j))
                records = dict(zip(ids, await pipe.execute(), strict=True))
            pending = [j for j, r in records.items() if r.get("state") not in states]
            if not pending:
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(pending)} jobs not final after {timeout}s, e.g. "
                                     f"{pending[0]}: {records[pending[0]]}")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def wait_for(check: Callable[[], bool], what: str, *, timeout: float = 20.0) -> None:
    """Wait (generous deadline) for a condition, e.g. a late write to land."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def sandbox_clients(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}/_sandbox/clients") as r:
        data: dict[str, Any] = await r.json()
        return list(data["clients"])


async def sandbox_calls(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}/_sandbox/calls") as r:
        data: dict[str, Any] = await r.json()
        return list(data["calls"])


async def set_faults(session: aiohttp.ClientSession, base: str, **faults: Any) -> None:
    async with session.post(f"{base}/_sandbox/faults", json=faults) as r:
        assert r.status == 200, await r.text()


async def workers_ready(redis: aioredis.Redis, n: int, timeout: float = 30) -> None:
    """Wait for `n` worker runtimes' live heartbeats (each runs the mover of parked retries); a
    killed worker's stale heartbeat does not count."""
    deadline = time.monotonic() + timeout
    while len([b for b in await heartbeat.read(redis) if b.live]) < n:
        assert time.monotonic() < deadline, "workers did not start"
        await asyncio.sleep(0.1)


async def enqueue_changes(redis: aioredis.Redis, n: int, provider: str) -> list[str]:
    """Queue `n` new clients' upserts for `provider` as the receiver would; their job ids."""
    from tests.conftest import uid
    from worker.models import ClientChange
    from worker.producer import Producer

    producer = Producer(redis, queue="celery", event_ttl=3600)
    job_ids = []
    for _ in range(n):
        c = ClientChange.model_validate({**change(uid("e-"), uid("c-")), "providers": [provider]})
        assert (await producer.enqueue(c, received_at=time.time())).status == "queued"
        job_ids.append(keys.job_id(provider, c.event_id))
    return job_ids


def job_context(redis: aioredis.Redis, adapters: dict[str, Any], limiter: Any, *, lease_seconds: float,
                circuit_threshold: int, **extra: Any) -> Any:
    """A `JobContext` as the worker runtime builds one, over these adapters (sandbox tests)."""
    import random

    from worker.circuit import CircuitBreaker
    from worker.jobs import JobContext, RetryPolicy
    from worker.ledger import Ledger
    from worker.parking import Parking
    from worker.store import SyncStore

    return JobContext(
        store=SyncStore(redis, idempotency_ttl=3600, lease_seconds=lease_seconds),
        ledger=Ledger(redis),
        adapters=adapters,
        policies={n: RetryPolicy(max_attempts=3, base=0.5, cap=2) for n in adapters},
        disabled={},
        owner="test",
        lock_wait=0.5,
        rng=random.Random(1),
        parking=Parking(redis, queue="celery"),
        limiter=limiter,
        circuit=CircuitBreaker(redis, threshold=circuit_threshold, cooldown=30, max_cooldown=60, probe_lease=30),
        **extra,
    )
