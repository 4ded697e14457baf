"""Changes in flight per worker process are not tied to threads (issue 10; tasks.pool).

A real worker, a real sandbox and real webhooks. The sandbox holds every provider call
(`hold`) and counts the calls waiting on it: with the loop pool, every change the worker
prefetched is waiting on its provider at once, while the process runs a handful of threads;
with Celery's threads pool, no more changes wait than it has threads. Then the calls are
released and every change must be applied exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.conftest import running_stack, uid
from tests.helpers import change, post_webhook, sandbox_clients, set_faults, wait_jobs
from worker import keys

P = "invoice_ninja"
#: more changes than the issue's target of 256 in flight
N = 300


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _inflight(session: aiohttp.ClientSession, base: str) -> dict[str, int]:
    async with session.get(f"{base}/_sandbox/inflight") as r:
        data: dict[str, int] = await r.json()
        return data


@pytest.mark.parametrize(("pool", "concurrency", "in_flight"), [("loop", N, N), ("threads", 8, 8)])
async def test_changes_in_flight_are_not_threads(redis_server_url: str, pool: str, concurrency: int,
                                                 in_flight: int) -> None:
    with running_stack(redis_server_url, providers=[P], pool=pool, concurrency=concurrency) as stack:
        base = stack.env[f"CLIENTSYNC_{P.upper()}_URL"]
        secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
        pid = stack.procs["worker0"].pid
        async with aiohttp.ClientSession() as session:
            await set_faults(session, base, hold=True)
            changes = [change(uid("e-loop-"), uid("c-loop-"), name=f"In Flight {i}") for i in range(N)]
            statuses = await asyncio.gather(*(post_webhook(session, stack.receiver_url, secret, c) for c in changes))
            assert set(statuses) == {202}

            now = {"now": 0}

            async def poll() -> None:
                now.update(await _inflight(session, base))

            async def waiting_calls() -> int:
                await poll()
                return now["now"]

            deadline_waits = 0
            while await waiting_calls() < in_flight:
                deadline_waits += 1
                assert deadline_waits < 1200, f"only {now['now']} provider calls in flight, expected {in_flight}"
                await asyncio.sleep(0.1)
            threads, rss = _threads(pid), _rss_mb(pid)
            print(f"{pool}: {now['now']} calls in flight, worker threads {threads}, RSS {rss:.0f} MB")
            if pool == "loop":
                # A coroutine per change, not a thread: far fewer threads than changes in flight.
                assert threads < 40, threads

            await set_faults(session, base, hold=False)
            records = await wait_jobs(stack.redis_url, [keys.job_id(P, c["event_id"]) for c in changes],
                                      timeout=300)
            assert {r["state"] for r in records.values()} == {"succeeded"}
            final = await _inflight(session, base)
            # Never more changes in flight than the pool allows (threads), and all of them with loop.
            assert final["peak"] == in_flight, final
            created = await sandbox_clients(session, base)
            stamps = sorted(c.get("number") for c in created)
            assert stamps == sorted(f"cs:{c['client']['id']}" for c in changes)  # each exactly once


async def test_a_warm_shutdown_lets_the_changes_in_flight_finish_and_acks_them(redis_server_url: str) -> None:
    n = 20
    with running_stack(redis_server_url, providers=[P], pool="loop", concurrency=n) as stack:
        base = stack.env[f"CLIENTSYNC_{P.upper()}_URL"]
        worker = stack.procs["worker0"]
        async with aiohttp.ClientSession() as session:
            await set_faults(session, base, hold=True)
            changes = [change(uid("e-stop-"), uid("c-stop-"), name=f"Stopping {i}") for i in range(n)]
            secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
            assert {await post_webhook(session, stack.receiver_url, secret, c) for c in changes} == {202}
            for _ in range(1200):
                if (await _inflight(session, base))["now"] == n:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the changes never reached the provider")
            os.killpg(worker.pid, signal.SIGTERM)  # Celery's warm shutdown, every change still waiting
            await set_faults(session, base, hold=False)
            assert await asyncio.to_thread(worker.wait, 120) == 0
            created = await sandbox_clients(session, base)
        records = await wait_jobs(stack.redis_url, [keys.job_id(P, c["event_id"]) for c in changes], timeout=5)
        assert {r["state"] for r in records.values()} == {"succeeded"}
        assert len(created) == n
        # Every message was acked before the process left: none waits to be redelivered.
        r = redis.Redis.from_url(stack.redis_url)
        try:
            assert r.hlen("unacked") == 0 and r.llen("celery") == 0 and r.hlen(keys.HOLDERS) == 0
        finally:
            r.close()


@pytest.mark.parametrize("pool", ["loop", "threads", "prefork", "solo"])
async def test_every_pool_the_settings_offer_applies_a_change(redis_server_url: str, pool: str) -> None:
    # The loop pool runs a task's coroutine body on the loop; the others run the Celery task,
    # which blocks its thread (or child process) on the same body.
    with running_stack(redis_server_url, providers=[P], pool=pool, concurrency=2) as stack:
        c = change(uid("e-pool-"), uid("c-pool-"), name=f"Pool {pool}")
        async with aiohttp.ClientSession() as session:
            assert await post_webhook(session, stack.receiver_url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"], c) == 202
            records = await wait_jobs(stack.redis_url, [keys.job_id(P, c["event_id"])], timeout=120)
            assert [r["state"] for r in records.values()] == ["succeeded"]
            created = await sandbox_clients(session, stack.env[f"CLIENTSYNC_{P.upper()}_URL"])
        assert [x.get("number") for x in created] == [f"cs:{c['client']['id']}"]
