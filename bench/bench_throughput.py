"""Throughput (project issue 10): clientsync measured side by side with baselines, as ratios.

Each subcommand starts what it needs as real processes (`worker.launcher.Stack`: Redis, the
sandbox providers, the receiver, Celery workers), checks every outcome before it prints a rate
(exit status 1 otherwise), and prints markdown tables ready for docs/benchmarks.md with the exact
command and a machine line.

  ingest         the receiver's ingest rate vs a bare aiohttp handler (read the JSON, answer 202),
                 both driven by wrk with distinct pre-signed webhooks; checks every 202 was queued
  e2e            a stock-Celery no-op task's drain rate vs clientsync (one worker, five providers)
                 at each --latency-ms: jobs/s, changes/s, receipt->applied p50/p99 and p99
                 overhead, Redis round trips / commands / bytes per job, peak worker RSS, ratios
  naive          a naive Celery task (a new aiohttp session per call, one POST, no idempotency, no
                 Redis state) vs clientsync, both on Invoice Ninja alone at --naive-latency-ms
  redis-ceiling  zero provider latency, Invoice Ninja alone then all five, --workers processes:
                 Redis CPU, commands and bytes per change, and the capacity model they give
  all            the four in sequence

Check that it works (small sizes, a busy machine is fine):

    .venv/bin/python bench/bench_throughput.py ingest --duration 3
    .venv/bin/python bench/bench_throughput.py e2e --n 100 --latency-ms 20 --noop-n 500
    .venv/bin/python bench/bench_throughput.py naive --n 100
    .venv/bin/python bench/bench_throughput.py redis-ceiling --n 200

Figures for docs/benchmarks.md (a quiet machine, nothing else running): `make bench-throughput`.
`ingest` needs wrk (Debian: `apt-get install -y wrk`). Set CLIENTSYNC_REDIS_URL to measure an
external Redis (a dedicated, empty one: the bench reads its global counters); unset, an embedded
redis-server is started.

How each figure is computed is written in docs/benchmarks.md ("Throughput (issue 10)").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import redis

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

from tests.helpers import signed_headers  # noqa: E402
from worker import keys  # noqa: E402
from worker.launcher import PY, Stack, wait_http  # noqa: E402
from worker.models import PROVIDER_NAMES  # noqa: E402
from worker.producer import SYNC_TASK, task_message  # noqa: E402
from worker.providers import adapter_class  # noqa: E402
from worker.redis_server import free_port  # noqa: E402
from worker.settings import Settings, default_concurrency  # noqa: E402

ALL_PROVIDERS = list(PROVIDER_NAMES)
QUEUE: str = Settings.model_fields["queue"].default
DEFAULT_POOL: str = Settings.model_fields["worker_pool"].default
DEFAULT_EVENTS: bool = Settings.model_fields["task_events"].default
#: ledger counters (`keys.stats`) bumped when a job reaches a final state
FINAL_COUNTERS = ("applied", "dead", "skipped", "needs_attention")
NOOP_QUEUE = "bench_noop"
NAIVE_QUEUE = "bench_naive"
NOOP_TASK = "bench.noop"
NAIVE_TASK = "bench.naive_sync"
#: where the stock kombu transport (the baselines) keeps delivered, unacked messages
UNACKED = keys.KOMBU_UNACKED
WRK_INSTALL = "wrk is not installed: apt-get install -y wrk (Debian/Ubuntu package `wrk`)"


class BenchFailed(Exception):
    """An outcome check failed: no rate is printed, the exit status is 1."""


def require(ok: bool, what: str) -> None:
    if not ok:
        raise BenchFailed(what)


# --- output -----------------------------------------------------------------------------------
def machine_line(redis_version: str = "") -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (f"machine: {platform.machine()}, {cpu or 'unknown CPU'}, {os.cpu_count()} cores, Linux "
            f"{platform.release()}, Python {platform.python_version()}"
            + (f", Redis {redis_version}" if redis_version else "")
            + f"; load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


def command_line() -> str:
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO)
    return "command: " + shlex.join([python, script, *sys.argv[1:]])


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: float, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def say(text: str) -> None:
    """Progress, on stderr: stdout carries only the report."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# --- Redis: a counted connection and INFO snapshots ------------------------------------------------
class RespError(Exception):
    pass


class Resp:
    """A minimal RESP2 client on one socket that counts the bytes it sends and receives.

    The bench's own traffic must be subtracted from Redis's global counters exactly, so the
    one connection that runs inside a measured window is this one, not redis-py's.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=30)
        self.file = self.sock.makefile("rb")
        self.sent = 0
        self.received = 0
        if parts.password:
            user = [unquote(parts.username)] if parts.username else []
            self.call("AUTH", *user, unquote(parts.password))
        db = int((parts.path or "/0").lstrip("/") or 0)
        if db:
            self.call("SELECT", db)

    @staticmethod
    def encode(args: Sequence[object]) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)

    def call(self, *args: object) -> Any:
        payload = self.encode(args)
        self.sock.sendall(payload)
        self.sent += len(payload)
        return self._read()

    def pipeline(self, commands: Sequence[Sequence[object]]) -> list[Any]:
        payload = b"".join(self.encode(c) for c in commands)
        self.sock.sendall(payload)
        self.sent += len(payload)
        return [self._read() for _ in commands]

    def _read(self) -> Any:
        line = self.file.readline()
        self.received += len(line)
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.file.read(size + 2)
            self.received += size + 2
            return data[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        raise RespError(f"unexpected reply {line[:40]!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def parse_info(text: str) -> dict[str, Any]:
    info: dict[str, Any] = {}
    calls: dict[str, int] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        if key.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in value.split(","))
            calls[key.removeprefix("cmdstat_")] = int(fields["calls"])
        else:
            info[key] = value
    info["calls"] = calls
    return info


@dataclass
class Snapshot:
    at: float
    calls: dict[str, int]
    reads: int
    cpu: float
    net_in: int
    net_out: int
    own_cmds: Counter[str]
    own_reads: int
    own_in: int
    own_out: int


@dataclass
class Usage:
    """Redis work between two snapshots, the bench's own commands and bytes taken out."""

    seconds: float
    commands: Counter[str]
    reads: int
    cpu: float
    net_in: int
    net_out: int

    @property
    def total_commands(self) -> int:
        return sum(self.commands.values())

    @property
    def scripts(self) -> int:
        return self.commands["evalsha"] + self.commands["eval"]


class Meter:
    """The bench's one Redis connection inside measured windows; every command it sends is counted.

    Counting rules (what Redis's counters see of a command the bench sends): `INFO commandstats`
    counts a command after it ran, `total_reads_processed` and `total_net_input_bytes` when its
    request is read, `total_net_output_bytes` when its reply is written. `snapshot` copies the
    bench's own counters at the matching points, so `usage(a, b)` removes exactly the bench's
    commands, reads and bytes between two snapshots (its polls and the snapshot INFO itself).
    """

    # The polls: one EVALSHA each (one request, one read event, an integer reply); the commands
    # they run inside are known and subtracted by name.
    FINAL_SUM = """
local n = 0
for _, k in ipairs(KEYS) do
  for _, v in ipairs(redis.call('HMGET', k, 'applied', 'dead', 'skipped', 'needs_attention')) do
    n = n + (tonumber(v) or 0)
  end
end
return n
"""
    BACKLOG = "return redis.call('LLEN', KEYS[1]) + redis.call('HLEN', KEYS[2])"

    def __init__(self, url: str) -> None:
        self.conn = Resp(url)
        self.cmds: Counter[str] = Counter()
        self.reads = 0
        self.bytes_in = 0  # what Redis read from the bench
        self.bytes_out = 0  # what Redis wrote to the bench
        self.call("PING")
        self.final_sha = self.call("SCRIPT", "LOAD", self.FINAL_SUM).decode()
        self.backlog_sha = self.call("SCRIPT", "LOAD", self.BACKLOG).decode()
        self.polls = 0

    def call(self, *args: object, inner: dict[str, int] | None = None) -> Any:
        sent, received = self.conn.sent, self.conn.received
        try:
            return self.conn.call(*args)
        finally:
            self.cmds[str(args[0]).lower()] += 1
            for name, n in (inner or {}).items():
                self.cmds[name] += n
            self.reads += 1
            self.bytes_in += self.conn.sent - sent
            self.bytes_out += self.conn.received - received

    def snapshot(self) -> Snapshot:
        own_cmds, own_out = Counter(self.cmds), self.bytes_out
        info = parse_info(self.call("INFO", "all").decode())
        return Snapshot(
            at=time.time(), calls=info["calls"], reads=int(info["total_reads_processed"]),
            cpu=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            net_in=int(info["total_net_input_bytes"]), net_out=int(info["total_net_output_bytes"]),
            own_cmds=own_cmds, own_reads=self.reads, own_in=self.bytes_in, own_out=own_out,
        )

    @staticmethod
    def usage(a: Snapshot, b: Snapshot) -> Usage:
        commands: Counter[str] = Counter()
        for name in set(a.calls) | set(b.calls):
            n = b.calls.get(name, 0) - a.calls.get(name, 0) - (b.own_cmds[name] - a.own_cmds[name])
            if n:
                commands[name] = n
        return Usage(
            seconds=b.at - a.at, commands=commands, reads=(b.reads - a.reads) - (b.own_reads - a.own_reads),
            cpu=b.cpu - a.cpu, net_in=(b.net_in - a.net_in) - (b.own_in - a.own_in),
            net_out=(b.net_out - a.net_out) - (b.own_out - a.own_out),
        )

    def final_count(self, providers: Sequence[str]) -> int:
        self.polls += 1
        return int(self.call("EVALSHA", self.final_sha, len(providers), *(keys.stats(p) for p in providers),
                             inner={"hmget": len(providers)}))

    def backlog(self, queue: str) -> int:
        self.polls += 1
        return int(self.call("EVALSHA", self.backlog_sha, 2, queue, UNACKED, inner={"llen": 1, "hlen": 1}))

    def stage(self, key: str, messages: Sequence[bytes], chunk: int = 500) -> None:
        """Put messages on a list nobody consumes (outside any measured window)."""
        self.call("DEL", key)
        for i in range(0, len(messages), chunk):
            part = messages[i:i + chunk]
            self.call("LPUSH", key, *part)

    def release(self, staging: str, queue: str) -> float:
        """Hand the whole staged batch to the waiting workers in one command; returns the time."""
        at = time.time()
        require(self.call("RENAMENX", staging, queue) == 1, f"queue {queue} was not empty at release")
        return at

    def info(self) -> dict[str, Any]:
        return parse_info(self.call("INFO", "all").decode())

    def close(self) -> None:
        self.conn.close()


# --- processes ----------------------------------------------------------------------------------
def bench_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIENTSYNC_") or k == "CLIENTSYNC_REDIS_URL"}
    env["CLIENTSYNC_LOG_LEVEL"] = "WARNING"
    env["CLIENTSYNC_TASK_EVENTS"] = "true" if args.task_events == "on" else "false"
    env["CLIENTSYNC_WORKER_CONCURRENCY"] = str(args.concurrency)
    env["CLIENTSYNC_WORKER_POOL"] = args.worker_pool
    env.update(lifted_limits() if args.rate_limits == "lifted" else {})
    return env


def documented_limits() -> dict[str, tuple[int, float]]:
    """Providers whose adapter applies a published rate limit by default: name -> (calls, seconds)."""
    out = {}
    for name in ALL_PROVIDERS:
        fields = adapter_class(name).settings_class.model_fields
        calls = fields["rate_limit"].default
        if calls is not None:
            out[name] = (int(calls), float(fields["rate_period"].default))
    return out


def lifted_limits() -> dict[str, str]:
    """The environment that lifts those limits (the sandbox enforces none): what clientsync's own
    path costs, not what a provider's quota allows."""
    return {f"CLIENTSYNC_{name.upper()}_RATE_LIMIT": "1000000" for name in documented_limits()}


def limits_line(args: argparse.Namespace) -> str:
    limits = ", ".join(f"{name} {calls:,} calls / {period:g} s"
                       for name, (calls, period) in documented_limits().items())
    if args.rate_limits == "lifted":
        return f"Rate limits: lifted (`--rate-limits lifted`: the documented ones, {limits}, set to 1,000,000)."
    return (f"Rate limits: as documented ({limits}; the shared bucket keeps a tenth of the limit as burst, so "
            "at most 90% of it in steady state).")


def spawn(stack: Stack, name: str, argv: list[str], extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    saved = stack.env
    stack.env = {**saved, **(extra or {})}
    try:
        return stack._spawn(name, argv)
    finally:
        stack.env = saved


def stop(stack: Stack, names: Iterable[str]) -> None:
    for name in names:
        if name in stack.procs:
            stack.kill(name, signal.SIGTERM)


def worker_log_tail(stack: Stack, name: str, lines: int = 30) -> str:
    if stack.log_dir is None:
        return ""
    path = stack.log_dir / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def alive(stack: Stack, names: Sequence[str]) -> None:
    for name in names:
        proc = stack.procs.get(name)
        require(proc is not None and proc.poll() is None,
                f"worker {name} exited ({proc.returncode if proc else 'never started'}):\n"
                f"{worker_log_tail(stack, name)}")


def log_problems(stack: Stack, names: Sequence[str]) -> list[str]:
    """ERROR/CRITICAL/Traceback lines in the workers' logs (they run at WARNING)."""
    found = []
    for name in names:
        if stack.log_dir is None:
            continue
        path = stack.log_dir / f"{name}.log"
        if path.exists():
            found += [f"{name}: {line}" for line in path.read_text(errors="replace").splitlines()
                      if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
    return found


@contextlib.contextmanager
def bench_stack(args: argparse.Namespace, providers: Sequence[str] | None, *, receiver: bool,
                prefix: str) -> Iterator[tuple[Stack, Meter, redis.Redis]]:
    """A fresh Stack (Redis unless CLIENTSYNC_REDIS_URL is set, the sandbox, the receiver), its meter
    and a redis-py client for reads outside measured windows. Children's logs are kept on failure."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    ok = False
    try:
        with Stack(env=bench_env(args), log_dir=tmp / "logs") as stack:
            stack.ensure_redis()
            stack.ensure_secrets()
            if providers:
                stack.start_sandbox(names=list(providers))
            if receiver:
                stack.start_receiver()
            meter = Meter(stack.redis_url)
            r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
            try:
                yield stack, meter, r
            finally:
                meter.close()
                r.close()
        ok = True
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"the processes' logs are kept in {tmp / 'logs'}")


def start_clientsync_workers(stack: Stack, tag: str, count: int, concurrency: int) -> list[str]:
    names = [f"cs-{tag}-{i}" for i in range(count)]
    for name in names:
        stack.start_worker(name, concurrency=concurrency)
    return names


def start_baseline_worker(stack: Stack, name: str, queue: str, args: argparse.Namespace,
                          extra: dict[str, str] | None = None) -> list[str]:
    argv = [PY, "-m", "celery", "-A", "celery_baselines", "worker", "--loglevel", "WARNING", "--pool", "threads",
            "--concurrency", str(args.concurrency), "--without-gossip", "--without-mingle", "-Q", queue,
            "--hostname", f"{name}-{os.getpid()}@%h"]
    if args.task_events == "on":
        argv.append("--task-events")
    pythonpath = os.pathsep.join(p for p in (str(BENCH), stack.env.get("PYTHONPATH", "")) if p)
    spawn(stack, name, argv, {"PYTHONPATH": pythonpath, "BENCH_BROKER_URL": stack.redis_url,
                              "BENCH_TASK_EVENTS": "1" if args.task_events == "on" else "0", **(extra or {})})
    return [name]


def celery_control(url: str) -> Any:
    from celery import Celery

    return Celery("bench_control", broker=url)


def wait_celery_ready(stack: Stack, name: str, timeout: float = 60) -> None:
    app = celery_control(stack.redis_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive(stack, [name])
            replies = app.control.ping(timeout=1.0) or []
            if any(host.startswith(f"{name}-") for reply in replies for host in reply):
                return
        raise BenchFailed(f"{name} did not answer a ping within {timeout:g}s")
    finally:
        app.close()


def celery_totals(stack: Stack, name: str) -> Counter[str]:
    """Tasks the worker ran, by name (Celery's own count: `inspect stats`, field `total`)."""
    app = celery_control(stack.redis_url)
    try:
        stats = app.control.inspect(timeout=3.0).stats() or {}
    finally:
        app.close()
    mine = [v for host, v in stats.items() if host.startswith(f"{name}-")]
    require(len(mine) == 1, f"no `inspect stats` answer from {name}")
    return Counter(mine[0].get("total", {}))


# --- peak RSS -------------------------------------------------------------------------------------
def _status_kb(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _with_children(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def pid_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds one process has used so far (0 once it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def cpu_seconds(stack: Stack, names: Iterable[str]) -> float:
    """user + system CPU seconds the named processes (and their children) have used so far."""
    total = 0.0
    for name in names:
        proc = stack.procs.get(name)
        for pid in _with_children(proc.pid) if proc is not None else []:
            total += pid_cpu_seconds(pid)
    return total


class RssSampler(threading.Thread):
    """Samples VmRSS of the worker processes (and any children) every `interval` seconds."""

    def __init__(self, stack: Stack, names: Sequence[str], interval: float = 0.1) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.stack, self.names, self.interval = stack, list(names), interval
        self.peak_kb = 0
        self._stop_event = threading.Event()

    def pids(self) -> list[int]:
        return [p for n in self.names if n in self.stack.procs for p in _with_children(self.stack.procs[n].pid)]

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kb = max(self.peak_kb, sum(_status_kb(p, "VmRSS") for p in self.pids()))
            self._stop_event.wait(self.interval)

    def finish(self) -> tuple[float, float]:
        """(peak sampled VmRSS, sum of the kernel's VmHWM peaks), MB; call before stopping the workers."""
        hwm = sum(_status_kb(p, "VmHWM") for p in self.pids())
        self._stop_event.set()
        self.join()
        return self.peak_kb / 1024, hwm / 1024


# --- sandbox --------------------------------------------------------------------------------------
def sandbox_request(stack: Stack, provider: str, path: str, payload: object | None = None) -> Any:
    url = f"http://127.0.0.1:{stack.sandbox_port}/{provider}/_sandbox/{path}"
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback sandbox
        return json.loads(resp.read())


def route(provider: str, call: dict[str, Any]) -> str:
    """`GET /v2/clients/{id}` for a logged call: no provider prefix, no query, ids folded."""
    path = call["path"].split("?")[0].removeprefix(f"/{provider}")
    parts = ["{id}" if re.search(r"\d", part) and len(part) >= 6 else part for part in path.split("/")]
    return f"{call['method']} {'/'.join(parts)}"


def set_latency(stack: Stack, providers: Sequence[str], latency_ms: float) -> None:
    for p in providers:
        sandbox_request(stack, p, "faults", {"latency_ms": latency_ms})


def sandbox_calls(stack: Stack, providers: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    return {p: sandbox_request(stack, p, "calls")["calls"] for p in providers}


# --- changes, messages and the ledger ----------------------------------------------------------------
def make_changes(tag: str, n: int) -> list[dict[str, Any]]:
    """n changes, each a new client (the create path), every event id new."""
    now = datetime.now(UTC).isoformat()
    return [{
        "event_id": f"{tag}-{i}", "occurred_at": now, "action": "upsert",
        "client": {"id": f"{tag}-c{i}", "name": f"Bench {tag} {i}", "email": f"{tag}-{i}@example.com",
                   # Grow CRM needs a person's names for the account owner.
                   "contacts": [{"first_name": "Bench", "last_name": f"Owner {i}"}]},
    } for i in range(n)]


def make_updates(tag: str, created: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """An update of each of these (now linked) clients: the update path, every event id new."""
    now = datetime.now(UTC).isoformat()
    return [{**c, "event_id": f"{tag}-{i}", "occurred_at": now,
             "client": {**c["client"], "name": f"{c['client']['name']} (updated)"}} for i, c in enumerate(created)]


def sync_messages(changes: Sequence[dict[str, Any]]) -> list[bytes]:
    """The Celery messages the receiver would push for these changes (worker.producer.task_message)."""
    now = time.time()
    return [task_message(SYNC_TASK, [c], {"received_at": now}, queue=QUEUE, task_id=str(uuid.uuid4()))
            for c in changes]


def stats_of(r: redis.Redis, providers: Sequence[str]) -> dict[str, Counter[str]]:
    out = {}
    for p in providers:
        raw = r.hgetall(keys.stats(p))
        out[p] = Counter({k: int(v) for k, v in raw.items()})
    return out


def wait_final(meter: Meter, stack: Stack, workers: Sequence[str], providers: Sequence[str], target: int,
               timeout: float, poll: float) -> None:
    deadline = time.monotonic() + timeout
    while meter.final_count(providers) < target:
        alive(stack, workers)
        require(time.monotonic() < deadline, f"jobs not final after {timeout:g}s")
        time.sleep(poll)


@dataclass
class JobRows:
    states: Counter[str]
    received: list[float]  # unix s (the receiver's clock, or the staging time)
    updated: list[float]  # unix s: the final transition (applied at the provider)
    providers: list[str]


def read_jobs(r: redis.Redis, changes: Sequence[dict[str, Any]], providers: Sequence[str]) -> JobRows:
    ids = [(p, keys.job_id(p, str(c["event_id"]))) for c in changes for p in providers]
    rows: list[Any] = []
    for i in range(0, len(ids), 2000):
        pipe = r.pipeline(transaction=False)
        for _, j in ids[i:i + 2000]:
            pipe.hmget(keys.job(j), "state", "received_at", "updated_at")
        rows += pipe.execute()
    states = Counter(row[0] or "missing" for row in rows)
    done = [(p, row) for (p, _), row in zip(ids, rows, strict=True) if row[0] == "succeeded"]
    return JobRows(states, [float(row[1]) for _, row in done], [int(row[2]) / 1000 for _, row in done],
                   [p for p, _ in done])


def check_all_succeeded(rows: JobRows, expected: int, stats_before: dict[str, Counter[str]],
                        stats_after: dict[str, Counter[str]], per_provider: int) -> int:
    """Every job succeeded, none dead; the ledger's counters agree. Returns the retries seen."""
    require(rows.states == Counter({"succeeded": expected}),
            f"not every job succeeded: {dict(rows.states)} (expected {expected} succeeded)")
    retried = 0
    for p, after in stats_after.items():
        d = after - stats_before[p]
        require(d["applied"] == per_provider and d["dead"] == 0,
                f"{p}: ledger counters applied +{d['applied']} dead +{d['dead']} (expected +{per_provider}, +0)")
        retried += d["retried"]
    return retried


# --- webhooks through the receiver ------------------------------------------------------------------
async def post_webhooks(url: str, secret: str, changes: Sequence[dict[str, Any]], rate: float,
                        senders: int = 50) -> list[int]:
    """POST signed webhooks, the i-th at i / rate seconds (rate 0: as fast as `senders` allow)."""
    sem = asyncio.Semaphore(senders)
    async with aiohttp.ClientSession() as http:

        async def send(i: int, change: dict[str, Any]) -> int:
            if rate:
                await asyncio.sleep(max(0.0, started + i / rate - time.time()))
            body = json.dumps(change).encode()
            async with sem, http.post(f"{url}/webhooks/clients", data=body,
                                      headers=signed_headers(secret, body)) as resp:
                await resp.read()
                return resp.status

        started = time.time()
        return list(await asyncio.gather(*(send(i, c) for i, c in enumerate(changes))))


# --- the measured clientsync drain --------------------------------------------------------------------
@dataclass
class Drain:
    changes: int
    jobs: int
    seconds: float
    usage: Usage
    retried: int
    calls: dict[str, int] = field(default_factory=dict)  # provider calls during the drain
    routes: dict[str, Counter[str]] = field(default_factory=dict)  # the same, by route
    worker_cpu: float = 0.0  # CPU seconds of the worker processes during the drain
    sandbox_cpu: float = 0.0  # CPU seconds of the sandbox (the simulated providers) during the drain

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    @property
    def changes_per_s(self) -> float:
        return self.changes / self.seconds


def clientsync_drain(stack: Stack, meter: Meter, r: redis.Redis, workers: Sequence[str], providers: Sequence[str],
                     n: int, tag: str, args: argparse.Namespace,
                     changes: Sequence[dict[str, Any]] | None = None) -> Drain:
    """Stage n changes, hand them to the warm, idle workers at once, time them to the last applied job.

    Rate = jobs / (last job's succeeded time in the ledger - the release). Redis usage covers the
    release to the poll that saw the last job final (the workers' side of the path only: the
    receiver's part is measured by `receiver_cost`).
    """
    changes = list(changes) if changes is not None else make_changes(tag, n)
    staging = f"bench:staging:{tag}"
    meter.stage(staging, sync_messages(changes))
    stats_before = stats_of(r, providers)
    calls_before = {p: len(c) for p, c in sandbox_calls(stack, providers).items()}
    base = meter.final_count(providers)
    cpu_before = cpu_seconds(stack, workers), cpu_seconds(stack, ["sandbox"])
    before = meter.snapshot()
    released = meter.release(staging, QUEUE)
    wait_final(meter, stack, workers, providers, base + n * len(providers), args.timeout, args.poll_ms / 1000)
    after = meter.snapshot()
    cpu_after = cpu_seconds(stack, workers), cpu_seconds(stack, ["sandbox"])
    rows = read_jobs(r, changes, providers)
    retried = check_all_succeeded(rows, n * len(providers), stats_before, stats_of(r, providers), n)
    new_calls = {p: c[calls_before[p]:] for p, c in sandbox_calls(stack, providers).items()}
    for p, calls in new_calls.items():
        require(all(200 <= c["status"] < 300 for c in calls),
                f"{p}: a provider call failed: {Counter(c['status'] for c in calls)}")
    seconds = max(rows.updated) - released
    return Drain(n, n * len(providers), seconds, Meter.usage(before, after), retried,
                 {p: len(c) for p, c in new_calls.items()},
                 {p: Counter(route(p, call) for call in c) for p, c in new_calls.items()},
                 cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])


def script_names() -> dict[str, str]:
    """SHA1 -> `module.NAME` of every Lua script clientsync's modules hold as a module-level string."""
    import hashlib
    import importlib
    import pkgutil

    import tasks
    import worker

    names = {hashlib.sha1(text.encode()).hexdigest(): f"bench poll ({attr})"  # noqa: S324 - Redis's script id
             for attr, text in (("FINAL_SUM", Meter.FINAL_SUM), ("BACKLOG", Meter.BACKLOG))}
    for package in (worker, tasks):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                module = importlib.import_module(info.name)
            except Exception:  # noqa: S112 - a module that cannot be imported here holds no script we saw
                continue
            for attr, value in vars(module).items():
                if isinstance(value, str) and "redis.call" in value:
                    names[hashlib.sha1(value.encode()).hexdigest()] = f"{info.name}.{attr}"  # noqa: S324
    return names


@dataclass
class ScriptSample:
    jobs: int
    requests: Counter[str]  # EVALSHA by script name, other commands by name: what clients sent


def script_sample(stack: Stack, meter: Meter, workers: Sequence[str], providers: Sequence[str], n: int, tag: str,
                  args: argparse.Namespace) -> ScriptSample:
    """Which scripts and commands the workers send per job: MONITOR over a separate small batch.

    MONITOR slows Redis down, so this batch is never one a rate is measured on. The bench's own
    connection is left out; commands run inside scripts are not requests and are left out too.
    """
    names = script_names()
    own_port = meter.conn.sock.getsockname()[1]
    requests: Counter[str] = Counter()
    started, stopping = threading.Event(), threading.Event()
    client = redis.Redis.from_url(stack.redis_url)

    def watch() -> None:
        with client.monitor() as monitor:
            started.set()
            for entry in monitor.listen():
                if stopping.is_set():
                    return
                if entry.get("client_type") == "lua" or int(entry.get("client_port") or 0) == own_port:
                    continue
                parts = str(entry["command"]).split(" ")
                name = parts[0].upper()
                requests[f"EVALSHA {names.get(parts[1], parts[1][:12])}" if name == "EVALSHA" and len(parts) > 1
                         else name] += 1

    thread = threading.Thread(target=watch, name="monitor", daemon=True)
    thread.start()
    require(started.wait(10), "MONITOR did not start")
    changes = make_changes(tag, n)
    staging = f"bench:staging:{tag}"
    meter.stage(staging, sync_messages(changes))
    base = meter.final_count(providers)
    time.sleep(0.2)
    meter.release(staging, QUEUE)
    wait_final(meter, stack, workers, providers, base + n * len(providers), args.timeout, args.poll_ms / 1000)
    stopping.set()
    meter.call("PING")  # one more line for the monitor to read, so it sees `stopping`
    thread.join(10)
    client.close()
    return ScriptSample(n * len(providers), requests)


def idle_usage(meter: Meter, seconds: float) -> Usage:
    """What Redis sees from idle workers (heartbeats, blocking pops timing out, reapers, parking polls)."""
    before = meter.snapshot()
    time.sleep(seconds)
    return Meter.usage(before, meter.snapshot())


#: concurrent senders through the receiver (also how many changes prime its Redis connection pool)
SENDERS = 50


def receiver_batch(stack: Stack, meter: Meter, prime: Sequence[dict[str, Any]],
                   changes: Sequence[dict[str, Any]]) -> Usage:
    """Send changes through the receiver with no worker running: its Redis cost, alone.

    `prime` goes first, unmeasured: it opens the receiver's pooled Redis connections (each new one
    costs a handshake: HELLO, CLIENT SETINFO) and its one-off durability check (INFO).
    """
    secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
    queued_before = int(meter.call("LLEN", QUEUE))
    statuses = asyncio.run(post_webhooks(stack.receiver_url, secret, prime, rate=0, senders=SENDERS))
    before = meter.snapshot()
    statuses += asyncio.run(post_webhooks(stack.receiver_url, secret, changes, rate=0, senders=SENDERS))
    after = meter.snapshot()
    total = len(prime) + len(changes)
    require(Counter(statuses) == Counter({202: total}), f"receiver answered {Counter(statuses)}")
    queued = int(meter.call("LLEN", QUEUE)) - queued_before
    require(queued == total, f"{total} webhooks accepted but {queued} queued")
    return Meter.usage(before, after)


def top_commands(usage: Usage, per: int, limit: int = 8) -> list[tuple[str, float]]:
    return [(name, n / per) for name, n in usage.commands.most_common(limit)]


# --- ingest -----------------------------------------------------------------------------------------
def write_requests(path: Path, secret: str, tag: str, count: int) -> set[str]:
    """count distinct signed webhooks for the wrk script, one per line (see bench/wrk_webhooks.lua)."""
    ids = set()
    with path.open("w") as out:
        for change in make_changes(tag, count):
            body = json.dumps(change, separators=(",", ":"))
            headers = signed_headers(secret, body.encode(), msg_id=f"msg_{change['event_id']}")
            out.write("\t".join(["POST", "/webhooks/clients", headers["webhook-id"], headers["webhook-timestamp"],
                                 headers["webhook-signature"], body]) + "\n")
            ids.add(str(change["event_id"]))
    return ids


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    require(m is not None, f"cannot read wrk latency {text!r}")
    assert m is not None
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: Counter[int]
    wrapped: int
    socket_errors: dict[str, int]
    output: str


def run_wrk(url: str, datafile: Path, args: argparse.Namespace) -> WrkResult:
    argv = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{args.duration:g}s",
            "--latency", "--timeout", "10s", "-s", str(BENCH / "wrk_webhooks.lua"), f"{url}/webhooks/clients",
            "--", str(datafile), str(args.wrk_threads)]
    say("running " + shlex.join(argv))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 120, check=False)
    out = done.stdout
    require(done.returncode == 0, f"wrk failed ({done.returncode}): {done.stderr.strip()} {out[-500:]}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    require(bool(rps and total and p50 and p99), f"cannot read wrk's output:\n{out}")
    assert rps and total and p50 and p99
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)) \
        if errors else {}
    statuses = Counter({int(s): int(n) for s, n in re.findall(r"^BENCH_STATUS (\d+) (\d+)$", out, re.M)})
    wrapped = re.search(r"^BENCH_WRAPPED (\d+)$", out, re.M)
    require(wrapped is not None, f"the wrk script printed no totals:\n{out}")
    assert wrapped is not None
    return WrkResult(float(rps.group(1)), int(total.group(1)), _ms(total.group(2) + total.group(3)) / 1000,
                     _ms(p50.group(1)), _ms(p99.group(1)), statuses, int(wrapped.group(1)), socket_errors, out)


def queued_event_ids(r: redis.Redis, base: int) -> list[str]:
    """The event id of every message the receiver pushed after the first `base` ones (LPUSH: newest first)."""
    total = r.llen(QUEUE)
    ids = []
    for start in range(0, total - base, 5000):
        stop_at = min(total - base, start + 5000) - 1
        for raw in r.lrange(QUEUE, start, stop_at):
            envelope = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            ids.append(str(args[0]["event_id"]))
    return ids


def cmd_ingest(args: argparse.Namespace) -> list[str]:
    if shutil.which("wrk") is None:
        raise BenchFailed(WRK_INSTALL)
    require(args.duration <= 240, "--duration must stay under 240 s: webhooks are signed before the run "
                                  "and the receiver accepts timestamps up to 300 s old")
    require(args.connections >= args.wrk_threads, "--connections must be >= --wrk-threads")
    pool = args.pool or max(2000, int(args.duration * args.pool_rate))
    results: dict[str, WrkResult] = {}
    cpu: dict[str, float] = {}  # each server's user + system CPU seconds over its wrk run
    with bench_stack(args, None, receiver=False, prefix="ingest") as (stack, meter, r):
        secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
        run = uuid.uuid4().hex[:6]
        assert stack.log_dir is not None
        tmp = stack.log_dir.parent  # the request files go with the logs (removed after a good run)

        say(f"bare aiohttp handler: {pool} pre-signed webhooks, {args.connections} connections, {args.duration:g}s")
        port = free_port()
        bare = spawn(stack, "bare", [PY, str(BENCH / "bare_receiver.py"), "--port", str(port)])
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=bare)
        write_requests(tmp / "bare.tsv", secret, f"i{run}b", pool)
        cpu_before = cpu_seconds(stack, ["bare"])
        results["bare"] = run_wrk(f"http://127.0.0.1:{port}", tmp / "bare.tsv", args)
        cpu["bare"] = cpu_seconds(stack, ["bare"]) - cpu_before
        stop(stack, ["bare"])
        b = results["bare"]
        require(set(b.statuses) == {202}, f"bare handler answered {dict(b.statuses)}")

        say("receiver (clientsync serve), no worker running: every accepted webhook stays on the queue")
        stack.start_receiver()
        # Prime the receiver (its Redis connection pool, script load and one-off durability check),
        # as the bare handler needs none: those start-up costs are not the ingest rate.
        primed = asyncio.run(post_webhooks(stack.receiver_url, secret, make_changes(f"i{run}p", SENDERS), 0,
                                           senders=SENDERS))
        require(Counter(primed) == Counter({202: SENDERS}), f"receiver answered {Counter(primed)} while priming")
        sent_ids = write_requests(tmp / "receiver.tsv", secret, f"i{run}r", pool)
        base = r.llen(QUEUE)
        claims_before = sum(1 for _ in r.scan_iter(match=keys.event("*"), count=1000))
        before = meter.snapshot()
        cpu_before = cpu_seconds(stack, ["receiver"])
        results["receiver"] = run_wrk(stack.receiver_url, tmp / "receiver.tsv", args)
        time.sleep(1.0)  # requests in flight when wrk stopped finish (their answers go unread)
        cpu["receiver"] = cpu_seconds(stack, ["receiver"]) - cpu_before
        after = meter.snapshot()
        rec = results["receiver"]
        usage = Meter.usage(before, after)
        accepted = rec.statuses[202]
        require(rec.wrapped == 0, f"the receiver run used up the {pool} pre-built webhooks and resent some: "
                                  "raise --pool or --pool-rate")
        require(set(rec.statuses) == {202}, f"receiver answered {dict(rec.statuses)} (only 202 expected)")
        queued_ids = queued_event_ids(r, base)
        claims = sum(1 for _ in r.scan_iter(match=keys.event("*"), count=1000)) - claims_before
        in_flight = args.connections + sum(rec.socket_errors.values())
        require(len(set(queued_ids)) == len(queued_ids), "a webhook was queued twice")
        require(set(queued_ids) <= sent_ids, "the queue holds events the bench never sent")
        require(claims == len(queued_ids), f"{claims} event ids claimed but {len(queued_ids)} messages queued")
        require(accepted <= len(queued_ids) <= accepted + in_flight,
                f"{accepted} webhooks answered 202 but {len(queued_ids)} queued (at most {in_flight} may have been "
                "in flight when wrk stopped)")
        redis_version = meter.info().get("redis_version", "")

    # CPU per request moves less than req/s when other processes share the cores. The receiver's is
    # per queued message: the ones accepted while wrk was stopping cost CPU too.
    cpu_us = {"bare": cpu["bare"] / results["bare"].requests * 1e6,
              "receiver": cpu["receiver"] / len(queued_ids) * 1e6}
    rows = []
    for name, label in (("bare", "bare aiohttp (read JSON, 202)"), ("receiver", "clientsync receiver")):
        w = results[name]
        errors = sum(w.socket_errors.values())
        rows.append([label, num(w.rps), num(w.p50_ms, 1), num(w.p99_ms, 1), num(w.requests),
                     num(w.statuses[202]), errors, w.wrapped, num(cpu_us[name])])
    ratio = results["receiver"].rps / results["bare"].rps
    queued = len(queued_ids)
    return [
        f"### Ingest: receiver vs bare aiohttp ({args.connections} connections, {args.duration:g} s, "
        f"wrk -t{args.wrk_threads})",
        "",
        table(["server", "req/s", "p50 ms", "p99 ms", "requests", "202", "socket errors", "pool wraps",
               "CPU µs/request"], rows),
        "",
        f"ratio receiver / bare: **{ratio:.2f}** (req/s); CPU per request bare / receiver: "
        f"{cpu_us['bare'] / cpu_us['receiver']:.2f}; Redis CPU per accepted webhook: "
        f"{usage.cpu / queued * 1e6:,.0f} µs",
        "",
        f"check: {accepted:,} answered 202; {queued:,} messages on the queue, {claims:,} event ids claimed, "
        f"{len(set(queued_ids)):,} distinct event ids, all sent by this run ({queued - accepted} accepted while "
        "wrk was stopping, answers unread)",
        f"Redis per accepted webhook: {usage.reads / queued:.2f} round trips (read events), "
        f"{usage.total_commands / queued:.2f} commands ("
        + ", ".join(f"{n} {c / queued:.2f}" for n, c in usage.commands.most_common(6))
        + f"), {usage.net_in / queued:,.0f} bytes in, {usage.net_out / queued:,.0f} bytes out",
        "",
        command_line(),
        machine_line(redis_version),
    ]


# --- e2e ----------------------------------------------------------------------------------------------
@dataclass
class BaselineDrain:
    tasks: int
    seconds: float
    usage: Usage
    worker_cpu: float = 0.0
    sandbox_cpu: float = 0.0

    @property
    def per_s(self) -> float:
        return self.tasks / self.seconds


def baseline_drain(stack: Stack, meter: Meter, name: str, queue: str, task: str, payloads: Sequence[list[Any]],
                   args: argparse.Namespace) -> BaselineDrain:
    """Stage the messages, release them to the warm worker at once, poll until queue and unacked are empty."""
    staging = f"bench:staging:{name}"
    messages = [task_message(task, p, {}, queue=queue, task_id=str(uuid.uuid4())) for p in payloads]
    meter.stage(staging, messages)
    require(meter.backlog(queue) == 0, "the baseline queue or kombu's unacked hash is not empty")
    totals_before = celery_totals(stack, name)
    cpu_before = cpu_seconds(stack, [name]), cpu_seconds(stack, ["sandbox"])
    before = meter.snapshot()
    released = meter.release(staging, queue)
    deadline = time.monotonic() + args.timeout
    poll = min(args.poll_ms, 10) / 1000
    while meter.backlog(queue):
        alive(stack, [name])
        require(time.monotonic() < deadline, f"{name}: queue not drained after {args.timeout:g}s")
        time.sleep(poll)
    finished = time.time()
    after = meter.snapshot()
    cpu_after = cpu_seconds(stack, [name]), cpu_seconds(stack, ["sandbox"])
    time.sleep(0.2)
    ran = celery_totals(stack, name) - totals_before
    require(ran == Counter({task: len(payloads)}), f"{name} ran {dict(ran)}, expected {len(payloads)} x {task}")
    problems = log_problems(stack, [name])
    require(not problems, f"{name} logged errors:\n" + "\n".join(problems[:20]))
    return BaselineDrain(len(payloads), finished - released, Meter.usage(before, after),
                         cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])


@dataclass
class LatencyRun:
    latency_ms: float
    rate: float
    jobs: int
    p50_ms: float
    p99_ms: float
    calls_per_job: dict[str, float]
    calls_by_method: dict[str, Counter[str]]
    overhead_p50_ms: float
    overhead_p99_ms: float
    overhead_p99_by_provider: dict[str, float]
    #: the same, minus the time each job's attempts measured at the provider (`provider_ms`)
    measured_p50_ms: float = 0.0
    measured_p99_ms: float = 0.0
    measured_p99_by_provider: dict[str, float] = field(default_factory=dict)
    #: where the measured overhead went, p50 / p99 ms each (`AttemptTimes.parts`)
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)


def latency_phase(stack: Stack, meter: Meter, r: redis.Redis, workers: Sequence[str], providers: Sequence[str],
                  latency_ms: float, n: int, rate: float, tag: str, args: argparse.Namespace) -> LatencyRun:
    """n webhooks through the receiver, paced at `rate`/s (below saturation); receipt -> applied per job."""
    changes = make_changes(tag, n)
    stats_before = stats_of(r, providers)
    calls_before = sandbox_calls(stack, providers)
    base = meter.final_count(providers)
    statuses = asyncio.run(post_webhooks(stack.receiver_url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"], changes, rate))
    require(Counter(statuses) == Counter({202: n}), f"receiver answered {Counter(statuses)}")
    wait_final(meter, stack, workers, providers, base + n * len(providers), args.timeout, args.poll_ms / 1000)
    rows = read_jobs(r, changes, providers)
    check_all_succeeded(rows, n * len(providers), stats_before, stats_of(r, providers), n)
    calls_after = sandbox_calls(stack, providers)
    per_job, by_method = {}, {}
    for p in providers:
        new = calls_after[p][len(calls_before[p]):]
        require(all(200 <= c["status"] < 300 for c in new), f"{p}: a provider call failed: "
                f"{Counter(c['status'] for c in new)}")
        per_job[p] = len(new) / n
        by_method[p] = Counter(route(p, c) for c in new)
    latencies = [u - rcv for u, rcv in zip(rows.updated, rows.received, strict=True)]
    overheads = [lat - latency_ms / 1000 * per_job[p] for lat, p in zip(latencies, rows.providers, strict=True)]
    by_provider = {p: percentile([o for o, q in zip(overheads, rows.providers, strict=True) if q == p], 99) * 1000
                   for p in providers}
    times = attempt_times(r, changes, providers)
    measured = [lat - t.provider for lat, t in zip(latencies, times, strict=True)]
    measured_by = {p: percentile([o for o, q in zip(measured, rows.providers, strict=True) if q == p], 99) * 1000
                   for p in providers}
    return LatencyRun(latency_ms, rate, len(latencies), statistics.median(latencies) * 1000,
                      percentile(latencies, 99) * 1000, per_job, by_method,
                      statistics.median(overheads) * 1000, percentile(overheads, 99) * 1000, by_provider,
                      statistics.median(measured) * 1000, percentile(measured, 99) * 1000, measured_by,
                      AttemptTimes.parts(times, rows))


@dataclass(frozen=True)
class AttemptTimes:
    """One job's attempts as its ledger recorded them (seconds)."""

    provider: float  # at the provider, summed over the attempts (`provider_ms`)
    created: float  # unix s: its ledger `created_at`, the worker's clock when the fan-out built its opening
    first_start: float  # unix s: the first attempt began (after its start script)
    in_attempts: float  # the attempts' own durations, summed (`duration_ms`)
    last_end: float  # unix s: the last attempt's `at` + its duration

    @staticmethod
    def parts(times: Sequence[AttemptTimes], rows: JobRows) -> dict[str, tuple[float, float]]:
        """The measured overhead split where it is spent, p50 / p99 ms of each part:
        receipt -> the worker's fan-out (the receiver's push, the queue, the delivery to the
        worker's loop; the ledger's `created_at` is the worker's clock as the fan-out builds the
        job's opening, before its start script goes out), the fan-out -> the first attempt
        starting (the start script's round trip, and any wait before a first attempt: a 429
        block, the circuit, a busy client), inside the attempts but not at the provider (the
        worker's own work, its Redis trips, rate-limit waits), between attempts (retries), and
        after the last attempt. That last is ~0 by construction: the final transition's
        `updated_at` is the attempt's end as the worker stamps it, before the finish script
        goes out (the effect is at the provider by then), so the finish script's round trip is
        in no part and not in receipt -> applied."""
        cols: dict[str, list[float]] = {"receipt -> fan-out": [], "fan-out -> attempt": [],
                                        "in the attempt, not at the provider": [],
                                        "between attempts": [], "after the attempt": []}
        for t, received, updated in zip(times, rows.received, rows.updated, strict=True):
            span = t.last_end - t.first_start
            cols["receipt -> fan-out"].append(t.created - received)
            cols["fan-out -> attempt"].append(t.first_start - t.created)
            cols["in the attempt, not at the provider"].append(t.in_attempts - t.provider)
            cols["between attempts"].append(span - t.in_attempts)
            cols["after the attempt"].append(updated - t.last_end)
        return {k: (statistics.median(v) * 1000, percentile(v, 99) * 1000) for k, v in cols.items() if v}


def attempt_times(r: redis.Redis, changes: Sequence[dict[str, Any]], providers: Sequence[str]) -> list[AttemptTimes]:
    """Each succeeded job's attempts (`provider_ms`, measured by the worker around each HTTP call
    and each shared pass it waited for; `at` and `duration_ms`), in `read_jobs`' order."""
    ids = [keys.job_id(p, str(c["event_id"])) for c in changes for p in providers]
    out: list[AttemptTimes] = []
    for i in range(0, len(ids), 2000):
        pipe = r.pipeline(transaction=False)
        for j in ids[i:i + 2000]:
            pipe.hmget(keys.job(j), "state", "created_at")
            pipe.lrange(keys.job_attempts(j), 0, -1)
        replies = pipe.execute()
        for (state, created), history in zip(replies[::2], replies[1::2], strict=True):
            if state != "succeeded":
                continue
            attempts = sorted((json.loads(a) for a in history), key=lambda a: float(a["at"]))
            took = [float(a.get("duration_ms") or 0) / 1000 for a in attempts]
            out.append(AttemptTimes(
                provider=sum(float(a.get("provider_ms") or 0) for a in attempts) / 1000, created=int(created) / 1000,
                first_start=float(attempts[0]["at"]), in_attempts=sum(took),
                last_end=float(attempts[-1]["at"]) + took[-1]))
    return out


@dataclass
class ClientsyncRun:
    latency_ms: float
    drain: Drain
    receiver: Usage
    receiver_changes: int
    idle: Usage
    latency: LatencyRun
    rss_mb: float
    hwm_mb: float
    sample: ScriptSample | None
    #: the same clients updated (linked: no lookup), drained like the creates
    update: Drain | None = None


def cmd_e2e(args: argparse.Namespace) -> list[str]:
    n = args.n or 2000
    latency_n = args.latency_n or n
    providers = args.providers
    runs: list[ClientsyncRun] = []
    say(f"(a) baseline: stock Celery no-op, {args.noop_n} tasks, threads x {args.concurrency}, "
        f"task events {args.task_events}")
    with bench_stack(args, None, receiver=False, prefix="e2e-noop") as (stack, meter, _r):
        redis_version = meter.info().get("redis_version", "")
        start_baseline_worker(stack, "noop", NOOP_QUEUE, args)
        wait_celery_ready(stack, "noop")
        noop_sampler = RssSampler(stack, ["noop"])
        noop_sampler.start()
        baseline_drain(stack, meter, "noop", NOOP_QUEUE, NOOP_TASK, [[]] * min(200, args.noop_n), args)  # warm-up
        noop = baseline_drain(stack, meter, "noop", NOOP_QUEUE, NOOP_TASK, [[]] * args.noop_n, args)
        noop_rss, noop_hwm = noop_sampler.finish()
        stop(stack, ["noop"])
    say(f"    no-op: {noop.per_s:,.0f} tasks/s")

    for latency_ms in args.latency_ms:
        # A fresh stack per latency: every run starts from the same empty Redis and sandbox (what a
        # sandbox holds matters: LSP.expert's adapter reads every page of clients on a create).
        tag = f"e{uuid.uuid4().hex[:5]}-{latency_ms:g}"
        say(f"(b) clientsync, 1 worker, pool {args.worker_pool} x {args.concurrency}, {len(providers)} providers at "
            f"{latency_ms:g} ms")
        with bench_stack(args, providers, receiver=True, prefix="e2e") as (stack, meter, r):
            set_latency(stack, providers, latency_ms)
            prime, receiver_changes = make_changes(f"{tag}p", SENDERS), make_changes(f"{tag}w", args.warmup)
            base = meter.final_count(providers)
            receiver = receiver_batch(stack, meter, prime, receiver_changes)  # then the worker's warm-up
            workers = start_clientsync_workers(stack, tag, 1, args.concurrency)
            sampler = RssSampler(stack, workers)
            sampler.start()
            wait_final(meter, stack, workers, providers, base + (SENDERS + args.warmup) * len(providers),
                       args.timeout, args.poll_ms / 1000)
            idle = idle_usage(meter, args.idle_seconds)
            created = make_changes(f"{tag}d", n)
            drain = clientsync_drain(stack, meter, r, workers, providers, n, f"{tag}d", args, created)
            say(f"    drain: {drain.jobs_per_s:,.0f} jobs/s, {drain.changes_per_s:,.1f} changes/s")
            update = clientsync_drain(stack, meter, r, workers, providers, n, f"{tag}u", args,
                                      make_updates(f"{tag}u", created))
            say(f"    updates of those clients: {update.jobs_per_s:,.0f} jobs/s, {update.changes_per_s:,.1f} changes/s")
            rate = args.load * drain.changes_per_s
            lat = latency_phase(stack, meter, r, workers, providers, latency_ms, latency_n, rate, f"{tag}l", args)
            rss, hwm = sampler.finish()
            sample = script_sample(stack, meter, workers, providers, args.script_sample, f"{tag}s", args) \
                if args.script_sample else None
            problems = log_problems(stack, workers)
            stop(stack, workers)
            require(not problems, "the worker logged errors:\n" + "\n".join(problems[:20]))
            runs.append(ClientsyncRun(latency_ms, drain, receiver, len(receiver_changes), idle, lat, rss, hwm,
                                      sample, update))
    return report_e2e(args, n, noop, (noop_rss, noop_hwm), runs, redis_version)


def report_e2e(args: argparse.Namespace, n: int, noop: BaselineDrain, noop_rss: tuple[float, float],
               runs: list[ClientsyncRun], redis_version: str) -> list[str]:
    p = len(args.providers)
    out = [
        f"### End to end: clientsync vs a Celery no-op (1 worker process; clientsync's pool {args.worker_pool}, "
        f"the no-op's threads, x {args.concurrency} each; task events {args.task_events})",
        "",
        limits_line(args),
        "",
        table(["run", "provider latency", "tasks or jobs", "tasks/s", "jobs/s", "changes/s",
               "jobs/s ÷ no-op tasks/s", "changes/s ÷ no-op tasks/s", "peak worker RSS MB (sampled / VmHWM)"],
              [["Celery no-op (stock kombu transport)", "-", num(noop.tasks), num(noop.per_s), "-", "-", "1", "1",
                f"{noop_rss[0]:.0f} / {noop_rss[1]:.0f}"]]
              + [[f"clientsync, {p} providers", f"{run.latency_ms:g} ms", num(run.drain.jobs),
                  num(run.drain.changes_per_s), num(run.drain.jobs_per_s), num(run.drain.changes_per_s, 1),
                  f"{run.drain.jobs_per_s / noop.per_s:.3f}", f"{run.drain.changes_per_s / noop.per_s:.3f}",
                  f"{run.rss_mb:.0f} / {run.hwm_mb:.0f}"] for run in runs]
              + [[f"clientsync, {p} providers, updates of linked clients", f"{run.latency_ms:g} ms",
                  num(run.update.jobs), num(run.update.changes_per_s), num(run.update.jobs_per_s),
                  num(run.update.changes_per_s, 1), f"{run.update.jobs_per_s / noop.per_s:.3f}",
                  f"{run.update.changes_per_s / noop.per_s:.3f}", "-"] for run in runs if run.update is not None]),
        "",
        "A change is one webhook = one Celery task (`clientsync.sync_client`) = one job per provider; the "
        "tasks/s column of a clientsync row is its changes/s. Provider calls per job in these drains (sandbox "
        "call log; every change creates a new client):",
        "",
        *[f"- {run.latency_ms:g} ms: " + ", ".join(f"{prov} {c / run.drain.changes:.2f}"
                                                   for prov, c in run.drain.calls.items()) for run in runs],
        "",
        "#### CPU per job during the drains (where the machine's time goes)",
        "",
        table(["run", "worker CPU ms", "worker busy (cores)", "sandbox CPU ms", "Redis CPU ms"],
              [["Celery no-op (per task)", f"{noop.worker_cpu / noop.tasks * 1000:.2f}",
                f"{noop.worker_cpu / noop.seconds:.2f}", "-", f"{noop.usage.cpu / noop.tasks * 1000:.2f}"]]
              + [[f"clientsync @ {run.latency_ms:g} ms (per job)",
                  f"{run.drain.worker_cpu / run.drain.jobs * 1000:.2f}",
                  f"{run.drain.worker_cpu / run.drain.seconds:.2f}",
                  f"{run.drain.sandbox_cpu / run.drain.jobs * 1000:.2f}",
                  f"{run.drain.usage.cpu / run.drain.jobs * 1000:.2f}"] for run in runs]),
        "",
        "Worker and sandbox CPU: utime + stime from /proc/<pid>/stat over the drain; Redis: INFO cpu. A worker "
        "process with the threads pool runs Python on about one core at most (the GIL): busy near 1.0 means the "
        "worker's own CPU, not the providers' latency, set the rate.",
        "",
        "#### Receipt -> applied (paced below saturation)",
        "",
        table(["provider latency", "paced at changes/s", "jobs", "p50 ms", "p99 ms", "provider calls per job",
               "sandbox time per job ms", "overhead p50 ms", "overhead p99 ms",
               "overhead p50 ms (measured)", "overhead p99 ms (measured)"],
              [[f"{run.latency_ms:g} ms", num(run.latency.rate, 1), num(run.latency.jobs),
                num(run.latency.p50_ms), num(run.latency.p99_ms),
                ", ".join(f"{prov} {c:.2f}" for prov, c in run.latency.calls_per_job.items()),
                ", ".join(f"{run.latency_ms * c:.0f}" for c in run.latency.calls_per_job.values()),
                num(run.latency.overhead_p50_ms), num(run.latency.overhead_p99_ms),
                num(run.latency.measured_p50_ms), num(run.latency.measured_p99_ms)] for run in runs]),
        "",
        "Measured overhead of a job = its receipt -> applied time minus the time its attempts spent waiting on "
        "the provider, as the worker measured it (`provider_ms` per attempt: each HTTP call, and each shared "
        "LSP.expert pass it waited for). It includes queueing, Redis, our rate-limit waits and the worker's "
        "own CPU; a provider answer that the sandbox was slow to give (it shares the cores) counts as provider "
        "time, as it would for a slow real provider.",
        "",
        "Overhead of a job = its receipt -> applied time minus (sandbox latency x the mean number of calls its "
        "provider's jobs made in the run, from the sandbox's call log: no per-job count exists). Where a "
        "provider's calls per job vary (LSP.expert reads every page of clients, so later jobs make more calls), "
        "the mean over- or under-counts single jobs: read its row with that in mind.",
    ]
    for run in runs:
        out.append(f"- {run.latency_ms:g} ms, overhead p99 by provider (ms): " + ", ".join(
            f"{prov} {v:.0f}" for prov, v in run.latency.overhead_p99_by_provider.items()))
        out.append(f"- {run.latency_ms:g} ms, measured overhead p99 by provider (ms): " + ", ".join(
            f"{prov} {v:.0f}" for prov, v in run.latency.measured_p99_by_provider.items()))
        out.append(f"- {run.latency_ms:g} ms, measured overhead by part, p50 / p99 ms: " + "; ".join(
            f"{part} {p50:.0f} / {p99:.0f}" for part, (p50, p99) in run.latency.parts.items()))
        out.append(f"- {run.latency_ms:g} ms, calls by route: " + "; ".join(
            f"{prov}: " + ", ".join(f"{route} x{c / run.latency.jobs * p:.2f}" for route, c in methods.items())
            for prov, methods in run.latency.calls_by_method.items()))
    out += ["", "#### Redis per job (success path)", ""]
    rows = []
    for run in runs:
        d, u, rc = run.drain, run.drain.usage, run.receiver
        recv_rt = rc.reads / run.receiver_changes / p
        recv_cmd = rc.total_commands / run.receiver_changes / p
        rows.append([f"{run.latency_ms:g} ms", f"{u.reads / d.jobs:.2f}", f"{recv_rt:.2f}",
                     f"**{u.reads / d.jobs + recv_rt:.2f}**", f"{u.total_commands / d.jobs:.1f}",
                     f"{recv_cmd:.1f}", f"{u.scripts / d.jobs:.2f}", num(u.net_in / d.jobs), num(u.net_out / d.jobs),
                     f"{u.cpu / d.jobs * 1e6:.0f}",
                     f"{run.idle.reads / run.idle.seconds:.0f} / {run.idle.total_commands / run.idle.seconds:.0f}"])
    rows.append(["Celery no-op (per task)", f"{noop.usage.reads / noop.tasks:.2f}", "-",
                 f"{noop.usage.reads / noop.tasks:.2f}", f"{noop.usage.total_commands / noop.tasks:.1f}", "-",
                 f"{noop.usage.scripts / noop.tasks:.2f}", num(noop.usage.net_in / noop.tasks),
                 num(noop.usage.net_out / noop.tasks), f"{noop.usage.cpu / noop.tasks * 1e6:.0f}", "-"])
    for run in runs:
        if run.update is None:
            continue
        d, u, rc = run.update, run.update.usage, run.receiver
        recv_rt = rc.reads / run.receiver_changes / p
        rows.append([f"{run.latency_ms:g} ms, updates of linked clients", f"{u.reads / d.jobs:.2f}", f"{recv_rt:.2f}",
                     f"**{u.reads / d.jobs + recv_rt:.2f}**", f"{u.total_commands / d.jobs:.1f}",
                     f"{rc.total_commands / run.receiver_changes / p:.1f}", f"{u.scripts / d.jobs:.2f}",
                     num(u.net_in / d.jobs), num(u.net_out / d.jobs), f"{u.cpu / d.jobs * 1e6:.0f}", "-"])
    out.append(table(["provider latency", "round trips, workers", "+ receiver", "round trips", "commands, workers",
                      "+ receiver", "scripts (EVALSHA)", "bytes in", "bytes out", "Redis CPU µs",
                      "idle workers: round trips/s / commands/s"], rows))
    out += ["", "Round trips = requests Redis read (`total_reads_processed`); commands = `INFO commandstats` calls, "
            "which count every command a Lua script runs as well. Workers' part: from the release of the staged "
            f"batch to the last job final ({n:,} changes); receiver's part: the warm-up batch sent with no worker "
            "running, divided by the providers per change. The bench's own commands are taken out exactly.",
            "", "Top commands per job (workers' part, commands inside scripts included):", ""]
    tops = [dict(top_commands(run.drain.usage, run.drain.jobs, 12)) for run in runs]
    names = list(dict.fromkeys(name for t in tops for name in t))
    out.append(table(["command"] + [f"per job @ {run.latency_ms:g} ms" for run in runs],
                     [[name] + [f"{t.get(name, 0):.2f}" for t in tops] for name in names]))
    sampled = [run for run in runs if run.sample is not None]
    if sampled:
        rates = [{k: v / run.sample.jobs for k, v in run.sample.requests.items()} for run in sampled if run.sample]
        keys_seen = sorted({k for rate in rates for k in rate}, key=lambda k: -max(rate.get(k, 0) for rate in rates))
        out += ["", f"Requests per job by script and command (MONITOR on a separate batch of {args.script_sample} "
                "changes per run, no rate measured on it; scripts by their module-level name in worker/ and tasks/):",
                "", table(["request"] + [f"per job @ {run.latency_ms:g} ms" for run in sampled],
                          [[k] + [f"{rate.get(k, 0):.2f}" for rate in rates] for k in keys_seen
                           if max(rate.get(k, 0) for rate in rates) >= 0.01])]
    retried = [run.drain.retried for run in runs]
    out += ["", f"checks: every job succeeded (ledger state and counters), none dead, retries {sum(retried)}; "
            f"no-op: Celery's own count of tasks run (`inspect stats`) = {noop.tasks:,}, no error logged",
            "", command_line(), machine_line(redis_version)]
    return out


# --- naive ----------------------------------------------------------------------------------------------
def cmd_naive(args: argparse.Namespace) -> list[str]:
    n = args.n or 1000
    provider = "invoice_ninja"
    latency_ms = args.naive_latency_ms
    run = uuid.uuid4().hex[:5]
    say(f"naive Celery task: {n} changes, one POST each with a new session, {latency_ms:g} ms")
    with bench_stack(args, [provider], receiver=False, prefix="naive") as (stack, meter, _r):
        redis_version = meter.info().get("redis_version", "")
        set_latency(stack, [provider], latency_ms)
        start_baseline_worker(stack, "naive", NAIVE_QUEUE, args, {
            "BENCH_NAIVE_URL": stack.env["CLIENTSYNC_INVOICE_NINJA_URL"],
            "BENCH_NAIVE_TOKEN": stack.env["CLIENTSYNC_INVOICE_NINJA_TOKEN"]})
        wait_celery_ready(stack, "naive")
        sampler = RssSampler(stack, ["naive"])
        sampler.start()
        baseline_drain(stack, meter, "naive", NAIVE_QUEUE, NAIVE_TASK,
                       [[c] for c in make_changes(f"n{run}w", args.warmup)], args)
        calls_before = len(sandbox_calls(stack, [provider])[provider])
        naive = baseline_drain(stack, meter, "naive", NAIVE_QUEUE, NAIVE_TASK,
                               [[c] for c in make_changes(f"n{run}d", n)], args)
        new_calls = sandbox_calls(stack, [provider])[provider][calls_before:]
        naive_rss, _ = sampler.finish()
        stop(stack, ["naive"])
        require(len(new_calls) == n and all(c["method"] == "POST" and 200 <= c["status"] < 300 for c in new_calls),
                f"naive: expected {n} successful POSTs, the sandbox saw "
                f"{Counter((c['method'], c['status']) for c in new_calls)}")

    say(f"clientsync: 1 worker, {provider} alone, {n} changes")
    with bench_stack(args, [provider], receiver=False, prefix="naive-cs") as (stack, meter, r):
        set_latency(stack, [provider], latency_ms)
        workers = start_clientsync_workers(stack, f"n{run}", 1, args.concurrency)
        sampler = RssSampler(stack, workers)
        sampler.start()
        meter.stage(f"bench:staging:n{run}w", sync_messages(make_changes(f"n{run}cw", args.warmup)))
        base = meter.final_count([provider])
        meter.release(f"bench:staging:n{run}w", QUEUE)
        wait_final(meter, stack, workers, [provider], base + args.warmup, args.timeout, args.poll_ms / 1000)
        cs = clientsync_drain(stack, meter, r, workers, [provider], n, f"n{run}c", args)
        cs_rss, _ = sampler.finish()
        problems = log_problems(stack, workers)
        stop(stack, workers)
        require(not problems, "the worker logged errors:\n" + "\n".join(problems[:20]))
    nu, cu = naive.usage, cs.usage
    rows = [
        ["naive Celery task (new session per call, 1 POST, no state)", num(naive.per_s, 1), "1.00",
         f"{nu.reads / n:.2f}", f"{nu.total_commands / n:.1f}", f"{naive.worker_cpu / n * 1000:.2f}",
         f"{naive.worker_cpu / naive.seconds:.2f}", num(naive_rss), "1"],
        [f"clientsync ({provider} alone)", num(cs.changes_per_s, 1), f"{cs.calls[provider] / n:.2f}",
         f"{cu.reads / n:.2f}", f"{cu.total_commands / n:.1f}", f"{cs.worker_cpu / n * 1000:.2f}",
         f"{cs.worker_cpu / cs.seconds:.2f}", num(cs_rss), f"{cs.changes_per_s / naive.per_s:.2f}"],
    ]
    return [
        f"### Naive baseline vs clientsync (Invoice Ninja sandbox at {latency_ms:g} ms, 1 worker process, "
        f"x {args.concurrency} (clientsync's pool {args.worker_pool}, the naive task's threads), task events "
        f"{args.task_events}, {n:,} changes)",
        "",
        table(["variant", "changes/s", "provider calls per change", "Redis round trips per change",
               "Redis commands per change", "worker CPU ms per change", "worker busy (cores)",
               "peak worker RSS MB", "÷ naive"], rows),
        "",
        "clientsync's calls per change: " + ", ".join(f"{r} x{c / n:.2f}" for r, c in cs.routes[provider].items())
        + " (the naive task: POST /api/v1/clients x1.00)",
        "",
        f"checks: naive: Celery ran {n:,} tasks (`inspect stats`), the sandbox saw {n:,} POSTs, all 2xx, no error "
        f"logged; clientsync: every job succeeded, none dead, retries {cs.retried}",
        "",
        command_line(),
        machine_line(redis_version),
    ]


# --- redis-ceiling ----------------------------------------------------------------------------------------
@dataclass
class CeilingRun:
    providers: list[str]
    drain: Drain
    receiver: Usage
    receiver_changes: int
    idle: Usage
    rss_mb: float

    def per_change(self, attr: str) -> float:
        """Workers' part per change + the receiver's part per change."""
        worker = getattr(self.drain.usage, attr)
        recv = getattr(self.receiver, attr)
        return worker / self.drain.changes + recv / self.receiver_changes


def cmd_redis_ceiling(args: argparse.Namespace) -> list[str]:
    n = args.n or 2000
    runs: list[CeilingRun] = []
    redis_version = ""
    for providers in (["invoice_ninja"], ALL_PROVIDERS):
        tag = f"r{uuid.uuid4().hex[:5]}-{len(providers)}"
        say(f"redis-ceiling: {len(providers)} provider(s), 0 ms, {args.workers} workers, "
            f"pool {args.worker_pool} x {args.concurrency}")
        with bench_stack(args, providers, receiver=True, prefix="ceiling") as (stack, meter, r):
            redis_version = meter.info().get("redis_version", "")
            prime, receiver_changes = make_changes(f"{tag}p", SENDERS), make_changes(f"{tag}w", args.receiver_n)
            base = meter.final_count(providers)
            receiver = receiver_batch(stack, meter, prime, receiver_changes)  # then the workers' warm-up
            workers = start_clientsync_workers(stack, tag, args.workers, args.concurrency)
            sampler = RssSampler(stack, workers)
            sampler.start()
            wait_final(meter, stack, workers, providers, base + (SENDERS + len(receiver_changes)) * len(providers),
                       args.timeout, args.poll_ms / 1000)
            idle = idle_usage(meter, args.idle_seconds)
            drain = clientsync_drain(stack, meter, r, workers, providers, n, f"{tag}d", args)
            rss, _ = sampler.finish()
            problems = log_problems(stack, workers)
            stop(stack, workers)
            require(not problems, "a worker logged errors:\n" + "\n".join(problems[:20]))
        say(f"    {drain.changes_per_s:,.1f} changes/s")
        runs.append(CeilingRun(providers, drain, receiver, len(receiver_changes), idle, rss))

    rows, model = [], []
    for run in runs:
        d = run.drain
        cpu = run.per_change("cpu")
        busy = d.usage.cpu / d.usage.seconds
        capacity = 1 / cpu if cpu > 0 else float("nan")
        label = "invoice_ninja" if len(run.providers) == 1 else f"all {len(run.providers)}"
        rows.append([label, f"{args.workers} x {args.concurrency}", num(d.changes_per_s, 1), num(d.jobs_per_s),
                     f"{cpu * 1000:.3f}", f"{busy * 100:.0f}%", f"{run.per_change('reads'):.1f}",
                     f"{run.per_change('total_commands'):.1f}", num(run.per_change("net_in")),
                     num(run.per_change("net_out")), num(capacity), f"{d.worker_cpu / d.changes * 1000:.1f}",
                     f"{d.worker_cpu / d.seconds:.2f}", num(run.rss_mb)])
        model.append(f"- {label}: one Redis core serves at most ≈ **{capacity:,.0f} changes/s** "
                     f"({capacity * len(run.providers):,.0f} jobs/s) = 1 / {cpu * 1e6:,.0f} µs of Redis CPU per "
                     f"change; this run reached {d.changes_per_s:,.0f} changes/s with Redis {busy * 100:.0f}% busy, "
                     f"so {'Redis' if busy > 0.85 else 'the workers (or the machine), not Redis,'} set its pace.")
    return [
        f"### Redis ceiling (zero provider latency, {args.workers} worker processes, pool {args.worker_pool} x "
        f"{args.concurrency}, "
        f"task events {args.task_events}, {n:,} changes per row)",
        "",
        table(["providers", "workers x threads", "changes/s", "jobs/s", "Redis CPU s per 1,000 changes",
               "Redis busy", "round trips per change", "commands per change", "bytes in per change",
               "bytes out per change", "changes/s one Redis core could serve", "worker CPU ms per change",
               "workers busy (cores)", "peak RSS MB (all workers)"], rows),
        "",
        "Per change = the workers' part (staged batch released to warm workers, to the last job final) + the "
        "receiver's part (a batch sent with no worker running). Redis CPU = `INFO cpu` used_cpu_sys + "
        "used_cpu_user deltas; bytes = `INFO stats` total_net_input_bytes / total_net_output_bytes deltas, the "
        "bench's own traffic taken out; idle workers' background traffic is included (listed below).",
        "",
        "Capacity model (changes/s per Redis core = 1 / Redis CPU seconds per change):",
        "",
        *model,
        "",
        "Idle workers' background: " + "; ".join(
            f"{'invoice_ninja' if len(run.providers) == 1 else 'all five'}: "
            f"{run.idle.reads / run.idle.seconds:.0f} round trips/s, {run.idle.cpu / run.idle.seconds * 1000:.1f} "
            "ms Redis CPU per s" for run in runs),
        f"checks: every job succeeded (ledger state and counters), none dead, retries "
        f"{sum(run.drain.retried for run in runs)}; no error logged",
        "",
        command_line(),
        machine_line(redis_version),
    ]


# --- command line -------------------------------------------------------------------------------------------
def provider_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(names) - set(ALL_PROVIDERS)
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"providers are among {', '.join(ALL_PROVIDERS)}")
    return names


COMMON = {
    "--worker-pool": dict(choices=["loop", "threads"], default=DEFAULT_POOL,
                          help="clientsync's Celery pool (the baselines always run on threads)"),
    "--concurrency": dict(type=int, default=None,
                          help="tasks at once per worker process, clientsync's and the baselines' alike (unset: "
                               "the pool's default, loop 256, threads 64)"),
    "--task-events": dict(choices=["on", "off"], default="on" if DEFAULT_EVENTS else "off",
                          help="Celery task events, clientsync's workers and the baselines' alike"),
    "--rate-limits": dict(choices=["documented", "lifted"], default="documented",
                          help="documented: providers' published limits apply, as in production (Qonto caps a "
                               "five-provider run); lifted: set to 1,000,000 to measure clientsync's own path"),
    "--poll-ms": dict(type=float, default=20.0, help="how often the bench polls for completion (one EVALSHA)"),
    "--timeout": dict(type=float, default=900.0, help="longest wait for a batch, seconds"),
}
OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "ingest": {
        "--duration": dict(type=float, default=10.0, help="seconds of load per server"),
        "--connections": dict(type=int, default=50, help="wrk connections"),
        "--wrk-threads": dict(type=int, default=1, help="wrk threads (the machine's other core runs the server)"),
        "--pool-rate": dict(type=float, default=4000.0,
                            help="pre-built webhooks per second of --duration (the receiver must not run out)"),
        "--pool": dict(type=int, default=0, help="pre-built webhooks (0 = duration x pool-rate)"),
    },
    "e2e": {
        "--n": dict(type=int, default=None, help="changes per measured batch (unset: e2e 2000, naive 1000, "
                                                 "redis-ceiling 2000)"),
        "--noop-n": dict(type=int, default=5000, help="no-op tasks"),
        "--providers": dict(type=provider_list, default=ALL_PROVIDERS,
                            help="comma-separated providers of the clientsync runs"),
        "--latency-ms": dict(type=float, nargs="+", default=[100.0, 20.0], help="sandbox latency per provider call"),
        "--latency-n": dict(type=int, default=None, help="changes in the paced latency run (unset: --n)"),
        "--load": dict(type=float, default=0.5, help="pace of the latency run, as a fraction of the measured "
                                                     "changes/s"),
        "--warmup": dict(type=int, default=100, help="changes before the measured batch (e2e: sent through the "
                                                     "receiver to measure its Redis cost)"),
        "--idle-seconds": dict(type=float, default=3.0, help="idle-worker window for the background traffic"),
        "--script-sample": dict(type=int, default=20, help="changes in the MONITOR batch that breaks requests "
                                                           "down by script (0 = skip)"),
    },
    "naive": {
        "--n": None, "--warmup": None,
        "--naive-latency-ms": dict(type=float, default=100.0, help="Invoice Ninja sandbox latency"),
    },
    "redis-ceiling": {
        "--n": None, "--idle-seconds": None,
        "--workers": dict(type=int, default=2, help="clientsync worker processes"),
        "--receiver-n": dict(type=int, default=500, help="changes sent through the receiver to measure its "
                                                         "Redis cost (then the workers' warm-up)"),
    },
}


def _spec(name: str) -> dict[str, Any]:
    for options in OPTIONS.values():
        spec = options.get(name)
        if spec is not None:
            return spec
    raise KeyError(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in [*OPTIONS, "all"]:
        p = sub.add_parser(command, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="every subcommand in sequence" if command == "all" else None)
        names = list(dict.fromkeys(n for opts in OPTIONS.values() for n in opts)) if command == "all" \
            else list(OPTIONS[command])
        for name in [*COMMON, *names]:
            p.add_argument(name, **(COMMON.get(name) or _spec(name)))
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "ingest": cmd_ingest, "e2e": cmd_e2e, "naive": cmd_naive, "redis-ceiling": cmd_redis_ceiling,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.concurrency = args.concurrency or default_concurrency(args.worker_pool)
    for name in ("n", "warmup", "idle_seconds", "receiver_n", "noop_n", "latency_n", "script_sample"):
        if not hasattr(args, name):
            setattr(args, name, _spec("--" + name.replace("_", "-")).get("default"))
    todo = list(COMMANDS) if args.command == "all" else [args.command]
    try:
        for command in todo:
            report = COMMANDS[command](args)
            print("\n".join(report) + "\n", flush=True)
    except BenchFailed as exc:
        print(f"bench_throughput {args.command}: FAILED, no figures: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
