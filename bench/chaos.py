"""Chaos benchmark: does every accepted change reach the provider with its newest data, whatever dies?

Real processes: a redis-server with an AOF (`appendfsync always`), the sandbox providers, the
receiver and two or more Celery workers. While signed webhooks flow in:
- the sandbox answers some calls 5xx before applying, and some writes end unclearly (applied then
  5xx, applied then the connection dropped, hung past the client's timeout and applied later:
  `unclear_rate`), with 429 bursts carrying Retry-After every few seconds;
- a random worker is SIGKILLed every 2-3 s and started again;
- Redis is SIGKILLed once and restarted on its AOF.
Events: `--clients` clients with `--versions` versioned upserts each, some ending in a delete;
sent out of order (shuffled), some twice (redeliveries); 503s are retried like a sender would.

It then waits until nothing is queued, held, running, retrying or parked, and compares every
client at each provider with its newest accepted event. Prints: accepted, applied, lost,
duplicated, stale, dead (with reasons), stuck, drain time. Exit status 1 when anything is lost,
duplicated, stale or stuck.

Run: .venv/bin/python bench/chaos.py --clients 300 --versions 4 [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from worker import keys
from worker.launcher import Stack
from worker.redis_server import EmbeddedRedis, free_port
from worker.web.signatures import decode_secret, sign

LIVE_STATES = ("queued", "running", "retrying")


@dataclass
class Result:
    accepted: int = 0
    applied: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    dead: Counter[str] = field(default_factory=Counter)
    stuck: int = 0
    drain_seconds: float = 0.0
    worker_kills: int = 0
    redis_kills: int = 0
    sent: int = 0
    retried_posts: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.stale or self.stuck)

    def report(self) -> str:
        dead = ", ".join(f"{k}: {v}" for k, v in self.dead.most_common()) or "none"
        return "\n".join([
            f"events sent      {self.sent} ({self.retried_posts} posts retried after 503/connection errors)",
            f"accepted         {self.accepted} (2xx)",
            f"applied          {self.applied} client/provider pairs match their newest accepted event",
            f"lost             {len(self.lost)} {self.lost[:5]}",
            f"duplicated       {len(self.duplicated)} {self.duplicated[:5]}",
            f"stale            {len(self.stale)} {self.stale[:5]}",
            f"dead             {sum(self.dead.values())} ({dead})",
            f"stuck            {self.stuck}",
            f"drain time       {self.drain_seconds:.1f}s after the last event",
            f"faults           {self.worker_kills} worker SIGKILLs, {self.redis_kills} Redis SIGKILL(s)",
        ])


def make_events(clients: int, versions: int, rng: random.Random, run: str,
                providers: list[str]) -> list[dict[str, Any]]:
    """Every client's versions (some ending in a delete), shuffled, some sent twice."""
    base = datetime.now(UTC) - timedelta(hours=1)
    events = []
    for c in range(clients):
        cid = f"{run}-c{c}"
        deletes = rng.random() < 0.15
        for v in range(1, versions + 1):
            action = "delete" if deletes and v == versions else "upsert"
            events.append({
                "event_id": f"{cid}-v{v}", "version": v, "action": action,
                "occurred_at": (base + timedelta(seconds=c + v)).isoformat(), "providers": providers,
                "client": {"id": cid, "kind": "company", "name": f"Chaos {cid} v{v}",
                           "email": f"{cid}@chaos.example"},
            })
    rng.shuffle(events)  # out of order: v3 may arrive before v1
    events += rng.sample(events, len(events) // 10)  # redeliveries
    return events


def _names(found: list[str]) -> list[str]:
    out = []
    for t in found:
        rec = json.loads(t)
        when = rec.get("createdAt") or rec.get("created_at") or rec.get("createdDate") or ""
        out.append(f"{rec.get('name')} (id {rec.get('id')}, created {when})")
    return out


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.result = Result()
        self.accepted: dict[str, dict[str, Any]] = {}  # event_id -> event
        self.stop = asyncio.Event()
        self.data_dir = tempfile.mkdtemp(prefix="clientsync-chaos-")
        self.redis_port = free_port()
        self.redis: EmbeddedRedis | None = None
        self.stack: Stack | None = None
        self.redis_down = asyncio.Event()

    # --- processes -------------------------------------------------------------------------
    def start_redis(self) -> None:
        self.redis = EmbeddedRedis(port=self.redis_port, data_dir=self.data_dir, persist=True,
                                   appendfsync="always").start()

    async def kill_redis_once(self, at: float) -> None:
        await asyncio.sleep(at)
        assert self.redis is not None and self.redis.process is not None
        self.redis.process.send_signal(signal.SIGKILL)
        self.redis.process.wait()
        self.redis_down.set()
        self.result.redis_kills += 1
        await asyncio.sleep(1.5)
        await asyncio.to_thread(self.start_redis)
        self.redis_down.clear()

    async def kill_workers(self) -> None:
        assert self.stack is not None
        n = 0
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(2.0, 3.0))
            if self.stop.is_set():
                break
            name = self.rng.choice([p for p in self.stack.procs if p.startswith("worker")])
            await asyncio.to_thread(self.stack.kill, name, signal.SIGKILL)
            n += 1
            self.stack.start_worker(f"worker-r{n}", concurrency=self.args.concurrency)
            self.result.worker_kills += 1

    async def bursts(self, http: aiohttp.ClientSession) -> None:
        """A 429 burst with Retry-After at one provider every few seconds."""
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(3, 6))
            provider = self.rng.choice(self.args.providers)
            with contextlib.suppress(aiohttp.ClientError):
                await http.post(f"{self.sandbox}/{provider}/_sandbox/faults",
                                json={"throttle_next": 15, "retry_after": 1})

    # --- sending -----------------------------------------------------------------------------
    async def send(self, http: aiohttp.ClientSession, events: list[dict[str, Any]]) -> None:
        assert self.stack is not None
        key = decode_secret(self.stack.env["CLIENTSYNC_WEBHOOK_SECRET"].split(",")[0])
        url = f"{self.stack.receiver_url}/webhooks/clients"
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for e in events:
            queue.put_nowait(e)

        interval = self.args.senders / self.args.rate  # each sender's pace: `rate` events/s in all

        async def sender() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    e = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = json.dumps(e).encode()
                for _ in range(200):
                    msg_id, ts = f"msg_{e['event_id']}", int(time.time())
                    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts),
                               "webhook-signature": sign(key, msg_id, ts, body),
                               "content-type": "application/json"}
                    try:
                        async with http.post(url, data=body, headers=headers) as r:
                            await r.read()
                            status = r.status
                    except aiohttp.ClientError:
                        status = 0
                    if 200 <= status < 300:
                        self.accepted[e["event_id"]] = e
                        break
                    self.result.retried_posts += 1
                    await asyncio.sleep(0.5)
                self.result.sent += 1

        await asyncio.gather(*(sender() for _ in range(self.args.senders)))

    # --- draining and checking ---------------------------------------------------------------
    async def drain(self) -> None:
        """Until nothing is queued, held, running, retrying or parked for a few seconds in a row."""
        assert self.stack is not None
        r = aioredis.from_url(self.stack.redis_url, decode_responses=True)
        started, quiet_since = time.monotonic(), None
        try:
            while time.monotonic() - started < self.args.drain_timeout:
                try:
                    async with r.pipeline(transaction=False) as p:
                        p.llen("celery")
                        p.hlen(keys.KOMBU_UNACKED)
                        p.zcard(keys.DELAYED)
                        for s in LIVE_STATES:
                            p.zcard(keys.jobs_in_state(s))
                        counts = await p.execute()
                except (aioredis.RedisError, OSError):
                    counts = [1]
                if not any(counts):
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since >= 3:
                        break
                else:
                    quiet_since = None
                await asyncio.sleep(0.5)
            self.result.drain_seconds = time.monotonic() - started
            self.result.stuck = sum([await r.zcard(keys.jobs_in_state(s)) for s in LIVE_STATES])
            for job_id in await r.zrange(keys.jobs_in_state("dead"), 0, -1):
                why = await r.hget(keys.job(str(job_id)), "last_error_class")
                self.result.dead[str(why or "?")] += 1
        finally:
            await r.aclose()

    async def check(self, http: aiohttp.ClientSession) -> None:
        newest: dict[str, dict[str, Any]] = {}
        for e in self.accepted.values():
            cid = e["client"]["id"]
            if cid not in newest or e["version"] > newest[cid]["version"]:
                newest[cid] = e
        self.result.accepted = len(self.accepted)
        for provider in self.args.providers:
            async with http.get(f"{self.sandbox}/{provider}/_sandbox/clients") as r:
                records = (await r.json())["clients"]
            by_client: dict[str, list[str]] = {}
            for rec in records:
                if rec.get("is_deleted") is True:
                    continue  # Invoice Ninja deletes softly: the record stays, marked deleted
                text = json.dumps(rec)
                for token in text.split('"'):
                    if token.endswith("@chaos.example"):
                        by_client.setdefault(token.split("@")[0], []).append(text)
                        break
            for cid, e in newest.items():
                found = by_client.get(cid, [])
                label = f"{provider}:{cid}"
                if len(found) > 1:
                    self.result.duplicated.append(f"{label} {_names(found)}")
                elif e["action"] == "delete":
                    if found:  # resurrected, or the delete never applied
                        self.result.stale.append(f"{label} (want deleted at v{e['version']}, found {_names(found)})")
                    else:
                        self.result.applied += 1
                elif not found:
                    self.result.lost.append(label)
                elif f"Chaos {cid} v{e['version']}\"" in found[0]:
                    self.result.applied += 1
                else:
                    self.result.stale.append(f"{label} (want v{e['version']}, found {_names(found)})")

    # --- the run -----------------------------------------------------------------------------
    async def run(self) -> Result:
        a = self.args
        run = f"r{a.seed}-{int(time.time())}"
        events = make_events(a.clients, a.versions, self.rng, run, a.providers)
        self.start_redis()
        assert self.redis is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIENTSYNC_")}
        env.update({
            "CLIENTSYNC_REDIS_URL": self.redis.url,
            "CLIENTSYNC_LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
            "CLIENTSYNC_RETRY_BASE_SECONDS": "0.2", "CLIENTSYNC_RETRY_CAP_SECONDS": "2",
            "CLIENTSYNC_MAX_ATTEMPTS": "30", "CLIENTSYNC_TASK_EVENTS": "false",
            "CLIENTSYNC_CIRCUIT_FAILURE_THRESHOLD": "1000",
            "CLIENTSYNC_LEASE_SECONDS": "12",
        })
        for p in a.providers:
            env[f"CLIENTSYNC_{p.upper()}_TIMEOUT"] = "2"
            env[f"CLIENTSYNC_{p.upper()}_SETTLE_SECONDS"] = "3"
        log_dir = Path(a.log_dir) if a.log_dir else None
        self.stack = Stack(env=env, log_dir=log_dir)
        try:
            self.stack.ensure_secrets()
            self.sandbox = self.stack.start_sandbox(names=a.providers)
            self.stack.start_receiver()
            for i in range(a.workers):
                self.stack.start_worker(f"worker{i}", concurrency=a.concurrency)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                for p in a.providers:
                    async with http.post(f"{self.sandbox}/{p}/_sandbox/faults", json={
                        "error_rate": a.error_rate, "unclear_rate": a.unclear_rate, "hang_seconds": 3,
                        "seed": a.seed,
                    }) as r:
                        assert r.status == 200, await r.text()
                background = [asyncio.create_task(self.kill_workers()), asyncio.create_task(self.bursts(http))]
                if not a.no_redis_kill:
                    background.append(asyncio.create_task(self.kill_redis_once(a.redis_kill_after)))
                t0 = time.monotonic()
                await self.send(http, events)
                print(f"sent {len(events)} events in {time.monotonic() - t0:.1f}s; draining", flush=True)
                # Keep killing workers for a while after the last event, then let it settle.
                await asyncio.sleep(a.chaos_tail)
                self.stop.set()
                for t in background:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                for p in a.providers:  # the last faults end: drain with a healthy provider
                    async with http.post(f"{self.sandbox}/{p}/_sandbox/faults", json={
                        "error_rate": 0, "unclear_rate": 0, "throttle_next": 0}) as r:
                        await r.read()
                await self.drain()
                await self.check(http)
        finally:
            self.stack.stop()
            if self.redis is not None:
                self.redis.stop()
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return self.result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--versions", type=int, default=4)
    p.add_argument("--providers", type=lambda s: s.split(","), default=["qonto", "lsp_expert"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--rate", type=float, default=40.0, help="events per second, all senders together")
    p.add_argument("--error-rate", type=float, default=0.05, help="calls answered 5xx before applying")
    p.add_argument("--unclear-rate", type=float, default=0.05, help="writes applied then 5xx/dropped/late")
    p.add_argument("--redis-kill-after", type=float, default=8.0, help="seconds into the run")
    p.add_argument("--no-redis-kill", action="store_true")
    p.add_argument("--chaos-tail", type=float, default=5.0, help="worker kills go on this long after sending")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--log-dir", help="keep each process's log here")
    return p


def main() -> int:
    args = parser().parse_args()
    started = time.monotonic()
    result = asyncio.run(Chaos(args).run())
    print(result.report())
    print(f"total {time.monotonic() - started:.0f}s; seed {args.seed}; "
          f"{args.clients} clients x {args.versions} versions x {len(args.providers)} providers")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
