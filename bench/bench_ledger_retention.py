"""Ledger retention benchmark (not a test): N jobs through the real ledger scripts, retention M.

Drives every job through the transitions a worker makes (queued -> running -> succeeded, with
a share retrying first and a share going dead) on a fresh embedded redis-server, trimming as
the workers do (every `--trim-every` new jobs per ledger, plus a final sweep), and prints the
ledger size, key count and Redis `used_memory` as it goes: with retention they stay flat.

    .venv/bin/python bench/bench_ledger_retention.py --jobs 100000 --retention 10000
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import keys
from worker.ledger import Attempt, Ledger
from worker.models import ClientChange
from worker.redis_server import EmbeddedRedis

PROVIDERS = ("qonto", "invoice_ninja", "grow_crm", "lsp_expert", "request_finance")


def make_change(i: int) -> ClientChange:
    return ClientChange.model_validate({
        "event_id": f"evt-{i:08d}", "occurred_at": "2024-05-01T12:00:00Z", "action": "upsert",
        "client": {"id": f"client-{i % 50_000}", "name": f"Client {i} GmbH", "email": f"person{i}@example.com",
                   "vat_number": "DE123456789", "currency": "EUR",
                   "billing_address": {"line1": "Hauptstr. 1", "city": "Berlin", "postal_code": "10115",
                                       "country": "DE"}},
    })


async def one_job(ledger: Ledger, i: int) -> None:
    change = make_change(i)
    job = await ledger.enqueued(change, PROVIDERS[i % len(PROVIDERS)], received_at=time.time())
    await ledger.running(job)
    if i % 10 == 0:  # a tenth fail once, transiently
        await ledger.retrying(job, Attempt(1, time.time(), "retrying", "server_error", 503, "Service unavailable",
                                           next_attempt_at=time.time() + 1))
        await ledger.running(job)
    if i % 50 == 0:  # one in fifty goes dead
        await ledger.dead(job, Attempt(2, time.time(), "dead", "validation", 422, "vat_number is invalid",
                                       {"vat_number": ["is invalid"]}))
    else:
        await ledger.succeeded(job, Attempt(2 if i % 10 == 0 else 1, time.time(), "succeeded", duration_ms=40.0),
                               result="created", provider_id=f"p{i}")


async def run(args: argparse.Namespace) -> None:
    with EmbeddedRedis() as server:
        client = aioredis.from_url(server.url, max_connections=args.concurrency + 4)
        # One ledger per simulated worker process, each trimming every `trim_every` of its own new jobs.
        ledgers = [Ledger(client, max_jobs=args.retention, trim_every=args.trim_every)
                   for _ in range(args.workers)]
        baseline = (await client.info("memory"))["used_memory"]
        print(f"# {args.jobs:,} jobs, retention {args.retention:,} finished jobs, {args.workers} ledgers "
              f"trimming every {args.trim_every} new jobs, concurrency {args.concurrency}")
        print(f"# python {platform.python_version()}, redis-server {(await client.info('server'))['redis_version']}, "
              f"{platform.machine()}, baseline used_memory {baseline / 1e6:.2f} MB")
        print(f"{'jobs done':>10} {'ledger jobs':>12} {'redis keys':>11} {'used_memory MB':>15} {'jobs/s':>8}")
        queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=args.concurrency * 2)
        done = 0
        peak_memory = 0
        started = time.perf_counter()

        async def worker(n: int) -> None:
            nonlocal done
            ledger = ledgers[n % len(ledgers)]
            while (i := await queue.get()) is not None:
                await one_job(ledger, i)
                done += 1

        tasks = [asyncio.create_task(worker(n)) for n in range(args.concurrency)]
        step = max(1, args.jobs // 10)
        for i in range(args.jobs):
            await queue.put(i)
            if (i + 1) % step == 0:
                memory = (await client.info("memory"))["used_memory"]
                peak_memory = max(peak_memory, memory)
                print(f"{done:>10,} {await client.zcard(keys.JOBS_BY_TIME):>12,} {await client.dbsize():>11,} "
                      f"{memory / 1e6:>15.2f} {done / (time.perf_counter() - started):>8,.0f}", flush=True)
        for _ in tasks:
            await queue.put(None)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        removed = await ledgers[0].trim_all()
        memory = (await client.info("memory"))["used_memory"]
        ledger_jobs = await client.zcard(keys.JOBS_BY_TIME)
        print(f"{done:>10,} {ledger_jobs:>12,} {await client.dbsize():>11,} {memory / 1e6:>15.2f} "
              f"{done / elapsed:>8,.0f}   (after a final trim: {removed} more dropped)")
        transitions = args.jobs * 3 + args.jobs // 10 * 2
        print(f"\nelapsed {elapsed:.1f} s: {args.jobs / elapsed:,.0f} jobs/s, ~{transitions / elapsed:,.0f} "
              f"ledger transitions/s (each one Lua round trip)")
        print(f"peak used_memory {peak_memory / 1e6:.2f} MB, final {memory / 1e6:.2f} MB for {ledger_jobs:,} jobs kept "
              f"(~{(memory - baseline) / max(1, ledger_jobs):,.0f} bytes per kept job incl. indexes and counters)")
        stats = await client.hgetall(keys.stats("qonto"))
        print(f"counters survive retention, e.g. qonto: { {k.decode(): int(v) for k, v in stats.items()} }")
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--retention", type=int, default=10_000)
    parser.add_argument("--trim-every", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4, help="ledger instances (worker processes) trimming")
    parser.add_argument("--concurrency", type=int, default=32)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
