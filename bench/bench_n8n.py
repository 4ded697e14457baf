"""n8n vs clientsync in one run (issue 10: "≥ 10x the n8n figure on webhook → Invoice Ninja at 100 ms").

Both systems get the same load from the same sender: `--n` distinct client upserts (each a new
client, the create path), signed Standard Webhooks POSTed by `--senders` concurrent aiohttp
senders as fast as the system answers. Both write to the same Invoice Ninja sandbox process (the
project's provider double) with `--latency-ms` added to every provider call. The runs alternate
(n8n, clientsync, n8n, clientsync, ... for `--rounds` rounds), the sandbox reset before each.

- n8n (`--n8n-bin`, installed by `make bench-n8n` into var/n8n): a fresh user folder (SQLite, n8n's
  default database) in a temp dir, loopback only, telemetry / version checks / templates off. The
  workflow is what a hand-built one does: a Webhook node (POST, n8n's default "Respond:
  Immediately") -> an HTTP Request node that POSTs the client to `/api/v1/clients` with the
  `X-API-TOKEN` header, mapping name, country_id and the contact (email, first and last name).
  It is imported and published with n8n's own CLI (`import:workflow`, `publish:workflow`), then
  `n8n start`. No signature check, no lookup before the create, no retry: each favours n8n.
- clientsync: the receiver (signature check, durable enqueue), one Celery worker process with the
  default pool and concurrency, Invoice Ninja its only provider, embedded Redis (unless
  CLIENTSYNC_REDIS_URL is set).

Measured from the sandbox's own records, the same way for both: a change is applied when its
client's record exists. Each record's time is that of the successful `POST /api/v1/clients` that
made it (the sandbox's call log, in the order records were stored). changes/s = distinct clients
applied / (last record - first webhook sent); sent->applied = a client's first record - the
moment the sender started that client's webhook. Duplicates = records beyond one per client
email. CPU is user+system of each system's processes (n8n and its task runner; clientsync's
receiver, worker and Redis) and of the sandbox, over the run.

    .venv/bin/python bench/bench_n8n.py --n 2000 --n8n-bin /tmp/n8n/node_modules/.bin/n8n
    make bench-n8n BENCH_ARGS="--n 2000"

Progress goes to stderr; stdout carries only the markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import (
    DEFAULT_EVENTS,
    DEFAULT_POOL,
    REPO,
    BenchFailed,
    _with_children,
    bench_stack,
    command_line,
    cpu_seconds,
    machine_line,
    make_changes,
    num,
    percentile,
    pid_cpu_seconds,
    read_jobs,
    require,
    say,
    start_clientsync_workers,
    table,
    wait_celery_ready,
)

from tests.helpers import signed_headers
from worker.launcher import Stack, wait_http
from worker.redis_server import free_port
from worker.settings import default_concurrency

PROVIDER = "invoice_ninja"
CREATE_PATH = f"/{PROVIDER}/api/v1/clients"
WORKFLOW_ID = "clientsyncBench01"
WEBHOOK_PATH = "clientsync-bench"
DEFAULT_N8N_BIN = "var/n8n/node_modules/.bin/n8n"
#: the country every client gets (the sandbox's strict reading requires country_id on a create;
#: clientsync sends the company's, which the sandbox answers as 840)
COUNTRY_ID = 840
SYSTEMS = ("n8n", "clientsync")
POLL_QUERY = "per_page=1"


# --- n8n ---------------------------------------------------------------------------------------------
def n8n_env(home: Path, port: int, broker_port: int) -> dict[str, str]:
    """n8n's environment: loopback only, nothing that calls home, a fresh user folder."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLIENTSYNC_", "N8N_", "DB_", "EXECUTIONS_", "QUEUE_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update({
        "N8N_USER_FOLDER": str(home),
        "N8N_PORT": str(port),
        "N8N_LISTEN_ADDRESS": "127.0.0.1",
        "N8N_HOST": "127.0.0.1",
        "N8N_PROTOCOL": "http",
        "WEBHOOK_URL": f"http://127.0.0.1:{port}/",
        "N8N_SECURE_COOKIE": "false",  # plain http on loopback
        "N8N_RUNNERS_BROKER_LISTEN_ADDRESS": "127.0.0.1",  # the task runners' broker (n8n 2.x)
        "N8N_RUNNERS_BROKER_PORT": str(broker_port),
        "N8N_PYTHON_ENABLED": "false",  # no Python runner venv here; the workflow has no Code node
        "N8N_DIAGNOSTICS_ENABLED": "false",
        "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
        "N8N_VERSION_NOTIFICATIONS_WHATS_NEW_ENABLED": "false",
        "N8N_TEMPLATES_ENABLED": "false",
        "N8N_PERSONALIZATION_ENABLED": "false",
        "N8N_DYNAMIC_BANNERS_ENABLED": "false",
        "N8N_HIRING_BANNER_ENABLED": "false",
        "N8N_AI_ENABLED": "false",
        "N8N_COMMUNITY_PACKAGES_ENABLED": "false",
        "N8N_LICENSE_AUTO_RENEW_ENABLED": "false",
        "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "true",
        "DO_NOT_TRACK": "1",
        "SCARF_ANALYTICS": "false",
    })
    return env


def workflow(create_url: str, token: str) -> dict[str, Any]:
    """Webhook (POST, respond immediately: the node's default) -> HTTP Request POST create-client."""
    body = ("={{ { name: $json.body.client.name, country_id: " + str(COUNTRY_ID) + ", contacts: [{ "
            "email: $json.body.client.email, first_name: $json.body.client.contacts[0].first_name, "
            "last_name: $json.body.client.contacts[0].last_name }] } }}")
    return {
        "id": WORKFLOW_ID,
        "name": "Webhook to Invoice Ninja (clientsync bench)",
        "active": False,
        "settings": {"executionOrder": "v1"},
        "connections": {"Webhook": {"main": [[{"node": "Create client", "type": "main", "index": 0}]]}},
        "nodes": [
            {"id": "9b0c5f3e-0000-4000-8000-000000000001", "name": "Webhook", "type": "n8n-nodes-base.webhook",
             "typeVersion": 2, "position": [0, 0], "webhookId": "9b0c5f3e-0000-4000-8000-0000000000aa",
             "parameters": {"httpMethod": "POST", "path": WEBHOOK_PATH, "options": {}}},
            {"id": "9b0c5f3e-0000-4000-8000-000000000002", "name": "Create client",
             "type": "n8n-nodes-base.httpRequest", "typeVersion": 4.2, "position": [240, 0],
             "parameters": {
                 "method": "POST", "url": create_url,
                 "sendHeaders": True,
                 "headerParameters": {"parameters": [{"name": "X-API-TOKEN", "value": token}]},
                 "sendBody": True, "specifyBody": "json", "jsonBody": body, "options": {}}},
        ],
    }


class N8n:
    """One n8n instance: a fresh user folder, the workflow imported and published, `n8n start`."""

    def __init__(self, stack: Stack, binary: Path, home: Path) -> None:
        self.stack, self.binary, self.home = stack, binary, home
        self.port = free_port()
        self.env = n8n_env(home, self.port, free_port())
        self.version = ""

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook/{WEBHOOK_PATH}"

    def cli(self, *argv: str, expect: str) -> str:
        proc = subprocess.run([str(self.binary), *argv], env=self.env, cwd=self.home, capture_output=True,
                              text=True, timeout=600, check=False)
        out = proc.stdout + proc.stderr
        require(proc.returncode == 0 and expect in out and "GOT ERROR" not in out,
                f"`n8n {' '.join(argv)}` failed (exit {proc.returncode}):\n{out[-3000:]}")
        return out

    def setup(self, create_url: str, token: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.version = self.cli("--version", expect=".").strip().splitlines()[-1]
        path = self.home / "workflow.json"
        path.write_text(json.dumps(workflow(create_url, token), indent=1))
        say(f"n8n {self.version}: importing the workflow (first run creates the database)")
        self.cli("import:workflow", f"--input={path}", expect="Successfully imported 1 workflow")
        self.cli("publish:workflow", f"--id={WORKFLOW_ID}", expect=f"Publishing workflow with ID: {WORKFLOW_ID}")

    def start(self) -> None:
        saved = self.stack.env
        self.stack.env = self.env
        try:
            proc = self.stack._spawn("n8n", [str(self.binary), "start"])
        finally:
            self.stack.env = saved
        wait_http(f"http://127.0.0.1:{self.port}/healthz/readiness", timeout=180, proc=proc)
        # Ready comes before the published workflows are activated: the production webhook is
        # registered once a GET on it is refused as the wrong method (a POST would run the workflow).
        deadline = time.monotonic() + 180
        while True:
            require(proc.poll() is None, f"n8n exited ({proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.webhook_url, timeout=5):  # noqa: S310 - loopback
                    pass
            except urllib.error.HTTPError as exc:
                if "make a POST request" in exc.read().decode(errors="replace"):
                    break
            except OSError:
                pass
            require(time.monotonic() < deadline, f"n8n's webhook {self.webhook_url} not registered:\n{self.log_tail()}")
            time.sleep(0.2)
        say(f"n8n ready on 127.0.0.1:{self.port}, webhook {self.webhook_url}")

    def log_tail(self, lines: int = 40) -> str:
        path = self.stack.log_dir / "n8n.log" if self.stack.log_dir else None
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class EgressWatch(threading.Thread):
    """Samples the TCP sockets of a process tree: any whose remote end is not loopback is kept."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(name="egress-watch", daemon=True)
        self.pid, self.interval = pid, interval
        self.seen: set[str] = set()
        self.samples = 0
        self._stop_event = threading.Event()

    @staticmethod
    def _remote(hex_addr: str) -> tuple[str, int]:
        addr, port = hex_addr.split(":")
        raw = bytes.fromhex(addr)
        if len(raw) == 4:
            host = socket.inet_ntop(socket.AF_INET, raw[::-1])
        else:  # /proc/net/tcp6: four little-endian 32-bit words
            host = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        return host, int(port, 16)

    def sample(self) -> None:
        inodes: set[str] = set()
        for pid in _with_children(self.pid):
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = os.readlink(fd)
                        if target.startswith("socket:["):
                            inodes.add(target[8:-1])
        for table_name in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{self.pid}/net/{table_name}").read_text().splitlines()[1:]:
                    cols = line.split()
                    if cols[9] not in inodes or cols[2].endswith(":0000"):
                        continue
                    host, port = self._remote(cols[2])
                    if not (host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")):
                        self.seen.add(f"{host}:{port}")
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def finish(self) -> None:
        self._stop_event.set()
        self.join()


# --- the sandbox ------------------------------------------------------------------------------------
class Sandbox:
    def __init__(self, stack: Stack) -> None:
        self.root = f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"
        self.create_url = f"{self.root}/api/v1/clients"
        self.token = stack.env["CLIENTSYNC_INVOICE_NINJA_TOKEN"]

    async def control(self, http: aiohttp.ClientSession, path: str, payload: object | None = None) -> Any:
        url = f"{self.root}/_sandbox/{path}"
        request = http.post(url, json=payload) if payload is not None else http.get(url)
        async with request as resp:
            resp.raise_for_status()
            return await resp.json()

    async def count(self, http: aiohttp.ClientSession) -> int:
        """Clients stored (through the provider API: one call, pays the latency like any other)."""
        async with http.get(f"{self.create_url}?{POLL_QUERY}", headers={"X-API-TOKEN": self.token}) as r:
            r.raise_for_status()
            return int((await r.json())["meta"]["pagination"]["total"])


# --- one measured run ---------------------------------------------------------------------------------
@dataclass
class Run:
    system: str
    round: int
    n: int
    statuses: Counter[int]
    seconds: float  # first webhook sent -> last record stored
    answered_seconds: float  # first webhook sent -> last webhook answered
    applied: int  # distinct clients with a record
    records: int
    calls: Counter[str]
    latencies: list[float]  # sent -> applied, seconds, per client
    cpu: float  # the system's processes, seconds
    sandbox_cpu: float
    notes: list[str] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.applied / self.seconds if self.seconds > 0 else float("nan")

    @property
    def duplicates(self) -> int:
        return self.records - self.applied


async def send_all(url: str, secret: str, changes: list[dict[str, Any]], senders: int, rate: float,
                   sent_at: dict[str, float]) -> tuple[Counter[int], float]:
    """POST each change once (signed, the same bytes for both systems), the i-th at i / rate seconds
    (rate 0: as fast as `senders` allow); record each start time."""
    sem = asyncio.Semaphore(senders)
    statuses: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(limit=senders)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def send(i: int, change: dict[str, Any]) -> None:
            body = json.dumps(change).encode()
            headers = signed_headers(secret, body)
            if rate:
                await asyncio.sleep(max(0.0, begin + i / rate - time.time()))
            async with sem:
                sent_at[change["client"]["email"]] = time.time()
                try:
                    async with http.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except aiohttp.ClientError:
                    statuses[0] += 1

        begin = time.time()
        await asyncio.gather(*(send(i, c) for i, c in enumerate(changes)))
    return statuses, time.time()


async def drive(sandbox: Sandbox, url: str, secret: str, changes: list[dict[str, Any]], args: argparse.Namespace,
                on_poll: Any = None) -> tuple[Counter[int], float, float, dict[str, float]]:
    """Send, and poll the sandbox until every change has a record, or nothing has moved for --settle s."""
    sent_at: dict[str, float] = {}
    n = len(changes)
    async with aiohttp.ClientSession() as http:
        started = time.time()
        sender = asyncio.create_task(send_all(url, secret, changes, args.senders, args.rate, sent_at))
        last, moved = -1, time.monotonic()
        deadline = time.monotonic() + args.timeout
        while True:
            await asyncio.sleep(args.poll_s)
            count = await sandbox.count(http)
            inflight = (await sandbox.control(http, "inflight"))["now"]
            if count != last:
                last, moved = count, time.monotonic()
            if on_poll is not None:
                on_poll()
            if sender.done() and inflight == 0 and (
                    count >= n or time.monotonic() - moved > args.settle):
                break
            require(time.monotonic() < deadline, f"not applied after {args.timeout:g}s: {count} of {n}")
        statuses, answered = await sender
    return statuses, started, answered, sent_at


def measure(system: str, rnd: int, stack: Stack, n8n: N8n, sandbox: Sandbox, workers: list[str],
            args: argparse.Namespace, n: int) -> Run:
    tag = f"{'n8n' if system == 'n8n' else 'cs'}{rnd}{uuid.uuid4().hex[:4]}"
    changes = make_changes(tag, n)
    secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
    url = n8n.webhook_url if system == "n8n" else f"{stack.receiver_url}/webhooks/clients"
    mine = ["n8n"] if system == "n8n" else ["receiver", *workers]

    async def reset() -> None:
        async with aiohttp.ClientSession() as http:
            await sandbox.control(http, "reset", {})
            await sandbox.control(http, "faults", {"latency_ms": args.latency_ms})

    def check_alive() -> None:
        for name in mine:
            proc = stack.procs.get(name)
            log = n8n.log_tail() if name == "n8n" else ""
            require(proc is not None and proc.poll() is None, f"{name} exited during the run\n{log}")

    asyncio.run(reset())
    cpu0, sandbox0, redis0 = cpu_seconds(stack, mine), cpu_seconds(stack, ["sandbox"]), redis_cpu(stack)
    statuses, started, answered, sent_at = asyncio.run(drive(sandbox, url, secret, changes, args, check_alive))
    cpu = cpu_seconds(stack, mine) - cpu0 + (redis_cpu(stack) - redis0 if system == "clientsync" else 0.0)
    sandbox_cpu = cpu_seconds(stack, ["sandbox"]) - sandbox0

    async def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as http:
            return (await sandbox.control(http, "clients"))["clients"], (await sandbox.control(http, "calls"))["calls"]

    records, calls = asyncio.run(read())
    creates = [c for c in calls if c["method"] == "POST" and c["path"] == CREATE_PATH and 200 <= c["status"] < 300]
    notes = []
    # the bench's own polls (`?per_page=1`) are not the system's calls
    mine_calls = [c for c in calls if c["path"] != f"{CREATE_PATH}?{POLL_QUERY}"]
    route_counts = Counter(f"{c['method']} {route_of(c['path'])} {c['status']}" for c in mine_calls)
    first_applied: dict[str, float] = {}
    if len(creates) == len(records):
        for record, call in zip(records, creates, strict=True):
            email = (record.get("contacts") or [{}])[0].get("email", "").casefold()
            first_applied.setdefault(email, call["at"])
    else:
        notes.append(f"{len(creates)} creates for {len(records)} records: no per-record times")
    emails = [str((r.get("contacts") or [{}])[0].get("email", "")).casefold() for r in records]
    wanted = {c["client"]["email"].casefold() for c in changes}
    applied = len(set(emails) & wanted)
    last = max((c["at"] for c in creates), default=started)
    latencies = [first_applied[e] - sent_at[e] for e in sent_at if e.casefold() in first_applied]
    if system == "clientsync":
        import redis

        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        try:
            rows = read_jobs(r, changes, [PROVIDER])
        finally:
            r.close()
        ledger = [u - v for u, v in zip(rows.updated, rows.received, strict=True)]
        notes.append(f"ledger: {dict(rows.states)}" + (
            f", receipt→succeeded p50 {num(statistics.median(ledger) * 1000)} ms, "
            f"p99 {num(percentile(ledger, 99) * 1000)} ms" if ledger else ""))
    return Run(system, rnd, n, statuses, last - started, answered - started, applied, len(records), route_counts,
               latencies, cpu, sandbox_cpu, notes)


def route_of(path_qs: str) -> str:
    """`/invoice_ninja/api/v1/clients/Abc?number=x&per_page=5` -> `/api/v1/clients/{id}?number,per_page`."""
    path, _, query = path_qs.partition("?")
    path = re.sub(r"/clients/(?!bulk\b)[^/]+", "/clients/{id}", path.removeprefix(f"/{PROVIDER}"))
    names = sorted({part.split("=", 1)[0] for part in query.split("&") if part})
    return path + (f"?{','.join(names)}" if names else "")


def redis_cpu(stack: Stack) -> float:
    proc = stack.redis.process if stack.redis is not None else None
    return pid_cpu_seconds(proc.pid) if proc is not None else 0.0


# --- the report --------------------------------------------------------------------------------------
def ms(values: list[float], p: float) -> str:
    return num(percentile(values, p) * 1000) if values else "n/a"


def report(args: argparse.Namespace, runs: list[Run], n8n: N8n, machine: str, egress: EgressWatch) -> list[str]:
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    out = [
        f"### n8n {n8n.version} vs clientsync: webhook → Invoice Ninja sandbox at {args.latency_ms:g} ms, same run",
        "",
        "```",
        command_line(),
        machine,
        "```",
        "",
        f"Each run: {args.n:,} distinct client creates (signed webhooks, the same bytes to both), "
        f"{args.senders} concurrent senders, "
        f"{f'paced at {args.rate:g} webhooks/s' if args.rate else 'as fast as answered'}, "
        "the sandbox reset before the run; order "
        f"{', '.join(r.system for r in runs)}.",
        f"n8n {n8n.version} on Node {node}: Webhook (POST, respond immediately) → HTTP Request (POST "
        "/api/v1/clients, X-API-TOKEN); SQLite, executions saved as by default; no signature check, no lookup, "
        "no retry.",
        f"clientsync: receiver + 1 worker process, {args.pool} pool x {args.concurrency}, task events "
        f"{'on' if DEFAULT_EVENTS else 'off'}, Invoice Ninja only, embedded Redis.",
        "",
    ]
    rows = []
    for r in runs:
        calls = sum(r.calls.values())
        rows.append([
            r.round, r.system, f"{r.applied:,} / {r.n:,}", num(r.per_s, 1), num(r.n / r.answered_seconds),
            ms(r.latencies, 50), ms(r.latencies, 99), r.duplicates,
            ", ".join(f"{k} x {v}" for k, v in sorted(r.statuses.items())),
            num(calls / r.n, 2), num(r.cpu * 1000 / r.n, 2), num(r.sandbox_cpu * 1000 / r.n, 2),
        ])
    out.append(table(["round", "system", "applied", "changes/s applied", "webhooks answered/s",
                      "sent→applied p50 ms", "p99 ms", "duplicates", "webhook answers",
                      "provider calls per change", "system CPU ms per change", "sandbox CPU ms per change"], rows))
    out.append("")
    ratios = []
    ratio_rows = []
    for rnd in sorted({r.round for r in runs}):
        pair = {r.system: r for r in runs if r.round == rnd}
        if set(pair) == set(SYSTEMS):
            ratio = pair["clientsync"].per_s / pair["n8n"].per_s
            ratios.append(ratio)
            ratio_rows.append([rnd, num(pair["n8n"].per_s, 1), num(pair["clientsync"].per_s, 1), f"**{ratio:.1f}x**"])
    out.append(table(["round", "n8n changes/s", "clientsync changes/s", "clientsync / n8n"], ratio_rows))
    if ratios:
        out += ["", f"clientsync / n8n, per round: {', '.join(f'{x:.1f}x' for x in ratios)}"
                    + (f" (median {statistics.median(ratios):.1f}x)" if len(ratios) > 1 else "")]
    if args.rate:
        out += ["", f"Paced at {args.rate:g} webhooks/s: a system that keeps up applies at the offered rate, so "
                    "the ratio says nothing here; compare sent→applied latency and CPU per change."]
    out += ["", "Notes:"]
    for r in runs:
        routes = ", ".join(f"{k} x {v}" for k, v in sorted(r.calls.items()))
        out.append(f"- round {r.round} {r.system}: {r.records:,} records; provider calls: {routes}"
                   + "".join(f"; {note}" for note in r.notes))
    out.append(f"- n8n's sockets sampled {egress.samples} times: "
               + (f"non-loopback peers seen: {', '.join(sorted(egress.seen))}" if egress.seen
                  else "no non-loopback peer seen"))
    return out


# --- main ---------------------------------------------------------------------------------------------
def warm_up(stack: Stack, n8n: N8n, sandbox: Sandbox, workers: list[str], args: argparse.Namespace) -> None:
    """A few changes through each system before the clock (n8n's first executions, the worker's imports)."""
    for system in SYSTEMS:
        run = measure(system, 0, stack, n8n, sandbox, workers, args, args.warmup)
        require(run.applied == args.warmup, f"warm-up: {system} applied {run.applied} of {args.warmup}; "
                                            f"answers {dict(run.statuses)}, calls {dict(run.calls)}"
                + (f"\n{n8n.log_tail()}" if system == "n8n" else ""))
        say(f"warm-up {system}: {run.applied} applied")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="distinct client creates per run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (n8n, clientsync)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="added to every sandbox provider call")
    parser.add_argument("--senders", type=int, default=64, help="concurrent webhook senders (both systems)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="webhooks per second, both systems (0 = as fast as the senders get answers); "
                             "pace below n8n's rate to compare sent->applied latency")
    parser.add_argument("--first", choices=SYSTEMS, default="n8n", help="which system runs first in each round")
    parser.add_argument("--warmup", type=int, default=50, help="changes through each system before the rounds")
    parser.add_argument("--n8n-bin", default=DEFAULT_N8N_BIN, help="the n8n executable (make bench-n8n installs it)")
    parser.add_argument("--settle", type=float, default=20.0,
                        help="stop a run once the sender is done and no record has appeared for this long (s)")
    parser.add_argument("--poll-s", type=float, default=0.25, help="how often the bench counts the sandbox's clients")
    parser.add_argument("--timeout", type=float, default=1800.0, help="longest run, seconds")
    args = parser.parse_args(argv)
    args.pool = DEFAULT_POOL
    args.concurrency = default_concurrency(DEFAULT_POOL)
    binary = Path(args.n8n_bin)
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.exists():
        print(f"bench_n8n: no n8n at {binary}: `make bench-n8n` installs it into var/n8n, or pass --n8n-bin",
              file=sys.stderr)
        return 1
    machine = machine_line()
    stack_args = argparse.Namespace(task_events="on" if DEFAULT_EVENTS else "off", concurrency=args.concurrency,
                                    worker_pool=args.pool, rate_limits="documented")
    order = list(SYSTEMS) if args.first == "n8n" else list(reversed(SYSTEMS))
    home = Path(tempfile.mkdtemp(prefix="bench-n8n-home-"))
    try:
        with bench_stack(stack_args, [PROVIDER], receiver=True, prefix="n8n") as (stack, _meter, _r):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            workers = start_clientsync_workers(stack, "n8n", 1, args.concurrency)
            sandbox = Sandbox(stack)
            n8n = N8n(stack, binary, home)
            n8n.setup(sandbox.create_url, sandbox.token)
            n8n.start()
            egress = EgressWatch(stack.procs["n8n"].pid)
            egress.start()
            wait_celery_ready(stack, workers[0])
            warm_up(stack, n8n, sandbox, workers, args)
            runs = []
            for rnd in range(1, args.rounds + 1):
                for system in order:
                    say(f"round {rnd}: {system}, {args.n} changes")
                    run = measure(system, rnd, stack, n8n, sandbox, workers, args, args.n)
                    say(f"round {rnd}: {system} {run.applied} applied, {run.per_s:.1f} changes/s, "
                        f"{run.duplicates} duplicates")
                    runs.append(run)
            egress.finish()
            lines = report(args, runs, n8n, machine, egress)
    except BenchFailed as exc:
        print(f"bench_n8n: FAILED, no figures: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
