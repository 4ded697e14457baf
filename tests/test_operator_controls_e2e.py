"""End to end, real processes: wrong credentials hold a provider (no attempt spent, nothing dies)
until they are fixed; an operator pauses, resumes and probes a provider through the API and the
CLI, each recorded; a probe holder SIGKILLed mid-call is replaced after the call timeout."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import clean_env, running_stack
from tests.helpers import enqueue_changes, sandbox_calls, set_faults, wait_jobs, workers_ready
from worker import keys
from worker.circuit import PROBE_MARGIN_SECONDS
from worker.launcher import Stack
from worker.providers import adapter_class
from worker.redis_server import EmbeddedRedis

Q = "qonto"
FAST = {"CLIENTSYNC_PARK_POLL_SECONDS": "0.1", "CLIENTSYNC_CIRCUIT_RECHECK_SECONDS": "0.3"}


async def wait_until(check: Any, what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with EmbeddedRedis() as server, running_stack(server.url, providers=[Q], workers=1, concurrency=4,
                                                  **FAST) as s:
        yield s


def restart_worker(stack: Stack, **env: str) -> None:
    stack.kill("worker0")
    stack.env.update(env)
    stack.start_worker("worker0", concurrency=4)


async def held(redis: aioredis.Redis, job_ids: list[str], reason: str) -> list[dict[str, str]] | None:
    records = [await redis.hgetall(keys.job(j)) for j in job_ids]
    ok = all(r.get("state") == "retrying" and r.get("last_error_class") == reason for r in records)
    return records if ok else None


async def test_wrong_credentials_hold_every_job_without_spending_attempts_until_they_are_fixed(
        stack: Stack, redis: aioredis.Redis, http: aiohttp.ClientSession) -> None:
    base = f"http://127.0.0.1:{stack.sandbox_port}/{Q}"
    good = stack.env["CLIENTSYNC_QONTO_SECRET_KEY"]
    restart_worker(stack, CLIENTSYNC_QONTO_SECRET_KEY="wrong-key")
    job_ids = await enqueue_changes(redis, 4, Q)
    first = await wait_until(lambda: held(redis, job_ids, "auth_failed"), "every job held by auth_failed")
    assert (await redis.hget(keys.circuit(Q), "state")) == "auth_failed"
    refused = [c for c in await sandbox_calls(http, base) if c["status"] == 401]
    # The jobs already running when the first 401 came back, each with the lookups it sent together
    # (Qonto has no exact key: its first reads are its non-unique searches, `search_any`).
    assert 1 <= len(refused) <= len(job_ids) * len(adapter_class(Q).identity.similar)

    # Each held job comes back, looks, and waits again: no call, no attempt spent, nothing dead.
    async def rechecked() -> bool:
        now = [await redis.hget(keys.job(j), "next_attempt_at") for j in job_ids]
        return all(float(n or 0) > float(r["next_attempt_at"]) for n, r in zip(now, first, strict=True))

    await wait_until(rechecked, "every held job to re-check")
    assert [c for c in await sandbox_calls(http, base) if c["status"] == 401] == refused
    for job_id in job_ids:
        record = await redis.hgetall(keys.job(job_id))
        assert record["state"] == "retrying" and int(record.get("attempts", "0")) <= 1, record

    # The operator fixes the credentials: the new ones are probed and every job is applied.
    restart_worker(stack, CLIENTSYNC_QONTO_SECRET_KEY=good)
    records = await wait_jobs(stack.redis_url, job_ids, timeout=120)
    assert {r["state"] for r in records.values()} == {"succeeded"}
    assert (await redis.hget(keys.circuit(Q), "state")) == "closed"
    audit = [a for a in await _audit(http, stack) if a["action"] == "auth_failed"]
    assert audit and audit[0]["provider"] == Q and audit[0]["actor"] == "worker"


async def test_an_operator_pauses_resumes_and_probes_through_the_api_and_the_cli_each_recorded(
        stack: Stack, redis: aioredis.Redis, http: aiohttp.ClientSession) -> None:
    base = f"http://127.0.0.1:{stack.sandbox_port}/{Q}"
    paused = await _control(http, stack, "pause", note="provider maintenance")
    assert paused["after"] == "paused"
    calls_before = len(await sandbox_calls(http, base))
    job_ids = await enqueue_changes(redis, 3, Q)
    await wait_until(lambda: held(redis, job_ids, "paused"), "every job held by the pause")
    assert len(await sandbox_calls(http, base)) == calls_before

    cli = subprocess.run([sys.executable, "-m", "worker", "provider", "probe", Q, "--note", "try it"],
                         env=clean_env(CLIENTSYNC_REDIS_URL=stack.redis_url), capture_output=True, text=True,
                         timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == f"{Q}: probe (paused -> half_open)"
    records = await wait_jobs(stack.redis_url, job_ids, timeout=120)
    assert {r["state"] for r in records.values()} == {"succeeded"}

    await _control(http, stack, "pause")
    assert (await _control(http, stack, "resume"))["after"] == "closed"
    entries = [(a["action"], a["actor"], a.get("note")) for a in await _audit(http, stack)][:4]
    assert entries == [("resume", "api", ""), ("pause", "api", ""), ("probe", "cli", "try it"),
                       ("pause", "api", "provider maintenance")]

    async with http.post(f"{stack.receiver_url}/monitor/providers/quonto/pause", headers=_auth(stack)) as resp:
        assert resp.status == 400
        assert "qonto" in (await resp.json())["error"]


def _auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.env['CLIENTSYNC_MONITOR_TOKEN']}"}


async def _control(http: aiohttp.ClientSession, stack: Stack, action: str, note: str = "") -> dict[str, Any]:
    url = f"{stack.receiver_url}/monitor/providers/{Q}/{action}"
    async with http.post(url, json={"note": note} if note else None, headers=_auth(stack)) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def _audit(http: aiohttp.ClientSession, stack: Stack) -> list[dict[str, Any]]:
    async with http.get(f"{stack.receiver_url}/monitor/audit", headers=_auth(stack)) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return list(data["entries"])


async def test_a_probe_holder_killed_mid_call_is_replaced_once_the_call_timeout_is_over(
        http: aiohttp.ClientSession) -> None:
    timeout = 8.0
    with EmbeddedRedis() as server, running_stack(server.url, providers=[Q], workers=1, concurrency=4,
                                                  CLIENTSYNC_QONTO_TIMEOUT=str(timeout), **FAST) as stack:
        redis = aioredis.from_url(stack.redis_url, decode_responses=True)
        try:
            await workers_ready(redis, 1)
            base = f"http://127.0.0.1:{stack.sandbox_port}/{Q}"
            await set_faults(http, base, hang_next=1, hang_seconds=600)
            # an open circuit whose cool-down is over: the next job takes the probe
            now = time.time()
            await redis.hset(keys.circuit(Q), mapping={"state": "open", "opened_at": now - 60, "reopen_at": now - 1,
                                                       "cooldown": 30, "failures": 5, "opens": 1})
            [hung] = await enqueue_changes(redis, 1, Q)
            circuit = await wait_until(lambda: _probe_held(redis), "a worker to take the probe")
            stack.kill("worker0")  # SIGKILL, mid-call: the probe is never handed back
            # The lease follows the call timeout, not the 120 s default probe lease.
            lease = float(circuit["probe_until"]) - float(circuit["updated_at"])
            assert lease == pytest.approx(timeout + PROBE_MARGIN_SECONDS, abs=0.01)

            stack.start_worker("worker1", concurrency=4)
            [later] = await enqueue_changes(redis, 1, Q)
            records = await wait_jobs(stack.redis_url, [later], timeout=120)
            assert records[later]["state"] == "succeeded"
            assert (await redis.hget(keys.circuit(Q), "state")) == "closed"
            assert hung != later
        finally:
            await redis.aclose()


async def _probe_held(redis: aioredis.Redis) -> dict[str, str] | None:
    circuit = await redis.hgetall(keys.circuit(Q))
    return circuit if circuit.get("state") == "half_open" and circuit.get("probe") else None
