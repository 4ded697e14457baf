"""End-to-end benchmark (not a test): N signed webhooks -> queue -> workers -> sandbox provider.

Prints throughput and the p50/p99 latency from webhook receipt (the receiver's clock) to
"applied at the provider" (the ledger's succeeded time), for a configurable provider latency.

    .venv/bin/python bench/bench_e2e.py --n 2000 --latency-ms 20 --workers 2 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import signed_headers
from worker import keys
from worker.launcher import Stack


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def drive(stack: Stack, args: argparse.Namespace) -> dict[str, float]:
    base = f"http://127.0.0.1:{stack.sandbox_port}"
    secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
    run = uuid.uuid4().hex[:6]
    events = [{
        "event_id": f"b{run}-{i}", "occurred_at": datetime.now(UTC).isoformat(), "action": "upsert",
        "client": {"id": f"b{run}-c{i % args.clients}", "name": f"Bench {i % args.clients}",
                   "email": f"bench{i % args.clients}@example.com",
                   # Grow CRM needs a person's names for the account owner.
                   "contacts": [{"first_name": "Bench", "last_name": f"Owner {i % args.clients}"}]},
        "version": i,
    } for i in range(args.n)]
    async with aiohttp.ClientSession() as http:
        for name in args.providers:
            async with http.post(f"{base}/{name}/_sandbox/faults", json={"latency_ms": args.latency_ms}) as r:
                r.raise_for_status()
        sem = asyncio.Semaphore(args.senders)

        async def send(i: int, event: dict[str, object]) -> int:
            if args.rate:  # paced: the i-th webhook leaves at i / rate seconds
                await asyncio.sleep(max(0.0, started + i / args.rate - time.time()))
            body = json.dumps(event).encode()
            async with sem, http.post(f"{stack.receiver_url}/webhooks/clients", data=body,
                                      headers=signed_headers(secret, body)) as resp:
                await resp.read()
                return resp.status

        started = time.time()
        statuses = await asyncio.gather(*(send(i, e) for i, e in enumerate(events)))
        sent_in = time.time() - started
        assert set(statuses) == {202}, set(statuses)
        job_ids = [keys.job_id(p, str(e["event_id"])) for e in events for p in args.providers]
        r = aioredis.from_url(stack.redis_url, decode_responses=True)
        while True:
            async with r.pipeline(transaction=False) as pipe:
                for j in job_ids:
                    pipe.hmget(keys.job(j), "state", "received_at", "updated_at")
                rows = await pipe.execute()
            if all(row[0] in ("succeeded", "skipped", "dead") for row in rows):
                break
            await asyncio.sleep(0.5)
        await r.aclose()
    finished = max(int(row[2]) / 1000 for row in rows)
    latencies = [int(row[2]) / 1000 - float(row[1]) for row in rows]
    states = [row[0] for row in rows]
    return {
        "jobs": len(job_ids),
        "succeeded": states.count("succeeded"),
        "skipped": states.count("skipped"),
        "dead": states.count("dead"),
        "webhooks_per_s": args.n / sent_in,
        "jobs_per_s": len(job_ids) / (finished - started),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="webhooks to send")
    parser.add_argument("--clients", type=int, default=1000, help="distinct clients (n > clients = updates)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every sandbox provider call")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--concurrency", type=int, default=32, help="threads per worker")
    parser.add_argument("--senders", type=int, default=50, help="concurrent webhook senders")
    parser.add_argument("--rate", type=float, default=0, help="webhooks per second (0 = as fast as possible)")
    parser.add_argument("--providers", default="invoice_ninja", help="comma-separated")
    args = parser.parse_args()
    args.providers = args.providers.split(",")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIENTSYNC_") or k == "CLIENTSYNC_REDIS_URL"}
    env["CLIENTSYNC_LOG_LEVEL"] = "WARNING"
    with Stack(env=env) as stack:
        stack.ensure_redis()
        stack.ensure_secrets()
        stack.start_sandbox(names=args.providers)
        stack.start_receiver()
        for i in range(args.workers):
            stack.start_worker(f"bench{i}", concurrency=args.concurrency)
        time.sleep(2)  # let the workers connect before the clock starts
        result = asyncio.run(drive(stack, args))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"settings: n={args.n} clients={args.clients} latency={args.latency_ms:g} ms workers={args.workers}x"
          f"{args.concurrency} threads rate={args.rate or 'max'}/s providers={','.join(args.providers)}")
    print("| jobs | webhooks/s accepted | jobs/s applied | p50 ms | p99 ms | max ms | dead |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['jobs']:.0f} | {result['webhooks_per_s']:.0f} | {result['jobs_per_s']:.0f} | "
          f"{result['p50_ms']:.0f} | {result['p99_ms']:.0f} | {result['max_ms']:.0f} | {result['dead']:.0f} |")


if __name__ == "__main__":
    main()
