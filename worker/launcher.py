"""Start and stop the whole system as child processes: Redis, sandbox, receiver, workers.

Used by `clientsync run`, `clientsync demo`, the benchmarks and the end-to-end tests, so
all of them exercise the same real processes an operator runs.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.redis_server import EmbeddedRedis, die_with_parent, free_port
from worker.sandbox import SIMULATORS
from worker.sandbox.server import make_simulators

PY = sys.executable


def sandbox_env(port: int, names: list[str] | None = None) -> dict[str, str]:
    """The env that points every adapter at a sandbox on `port` (with its default credentials)."""
    env: dict[str, str] = {}
    for name, sim in make_simulators(names).items():
        env.update(sim.env(f"http://127.0.0.1:{port}/{name}"))
    return env


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310
            if resp.status < 500:  # loopback only: our own child process
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout:g}s")


_print_lock = threading.Lock()


def _pump(name: str, proc: subprocess.Popen[bytes], log: Any) -> None:
    """Copy a child's output line by line to its log file and, prefixed `[name]`, to stdout."""
    assert proc.stdout is not None
    prefix = f"[{name}] ".encode()
    for line in iter(proc.stdout.readline, b""):
        if log is not None:
            log.write(line)
            log.flush()
        with _print_lock, contextlib.suppress(OSError, ValueError):
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.buffer.flush()
    proc.stdout.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@dataclass
class Stack:
    """A running clientsync: every piece a child process, stopped together."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    redis: EmbeddedRedis | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sandbox_port: int | None = None
    receiver_port: int | None = None
    log_dir: Path | None = None
    #: also copy every child's output to this process's stdout, each line prefixed `[name]`
    echo: bool = False

    @property
    def redis_url(self) -> str:
        return self.env["CLIENTSYNC_REDIS_URL"]

    @property
    def receiver_url(self) -> str:
        return f"http://127.0.0.1:{self.receiver_port}"

    def ensure_redis(self, *, persist_dir: str | None = None) -> str:
        """Use CLIENTSYNC_REDIS_URL when set, else start an embedded redis-server."""
        if not self.env.get("CLIENTSYNC_REDIS_URL"):
            self.redis = EmbeddedRedis(data_dir=persist_dir, persist=persist_dir is not None).start()
            self.env["CLIENTSYNC_REDIS_URL"] = self.redis.url
        return self.env["CLIENTSYNC_REDIS_URL"]

    def ensure_secrets(self, persist_dir: Path | None = None) -> None:
        """A webhook secret and a monitor token for a local run, unless the environment sets them.

        With `persist_dir`, generated ones are kept there (mode 0600) and reused on the next
        start, so a configured sender and a signed-in dashboard keep working across restarts.
        """
        generators: dict[str, Callable[[], str]] = {
            "CLIENTSYNC_WEBHOOK_SECRET": lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            # 43 characters: well above the 32 the receiver requires of a monitor token
            "CLIENTSYNC_MONITOR_TOKEN": lambda: secrets.token_urlsafe(32),
        }
        for name, make in generators.items():
            if self.env.get(name, "").strip():
                continue
            path = persist_dir / name.removeprefix("CLIENTSYNC_").lower() if persist_dir else None
            value = path.read_text().strip() if path is not None and path.is_file() else ""
            if not value:
                value = make()
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "w") as handle:
                        handle.write(value + "\n")
            self.env[name] = value

    @staticmethod
    def say(text: str) -> None:
        """Print to stdout without interleaving with the children's prefixed lines."""
        with _print_lock:
            print(text, flush=True)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out: int | object = subprocess.DEVNULL
        log = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
            out = log
        if self.echo:
            out = subprocess.PIPE
        proc = subprocess.Popen(  # noqa: S603
            args, env=self.env, stdout=out, stderr=subprocess.STDOUT,  # type: ignore[arg-type]
            start_new_session=True, preexec_fn=die_with_parent,
        )
        if self.echo:
            threading.Thread(target=_pump, args=(name, proc, log), name=f"log-{name}", daemon=True).start()
        self.procs[name] = proc
        return proc

    def start_sandbox(self, port: int = 0, names: list[str] | None = None) -> str:
        self.sandbox_port = port or free_port()
        names = names or list(SIMULATORS)
        proc = self._spawn("sandbox", [PY, "-m", "worker", "sandbox", "--port", str(self.sandbox_port),
                                       "--providers", ",".join(names)])
        wait_http(f"http://127.0.0.1:{self.sandbox_port}/", proc=proc)
        self.env.update(sandbox_env(self.sandbox_port, names))
        return f"http://127.0.0.1:{self.sandbox_port}"

    def start_receiver(self, port: int = 0) -> str:
        self.receiver_port = port or free_port()
        self.env["CLIENTSYNC_PORT"] = str(self.receiver_port)
        proc = self._spawn("receiver", [PY, "-m", "worker", "serve"])
        wait_http(f"{self.receiver_url}/healthz", proc=proc)
        return self.receiver_url

    def start_worker(self, name: str = "worker", *, concurrency: int | None = None,
                     pool: str | None = None) -> subprocess.Popen[bytes]:
        args = [PY, "-m", "worker", "worker", "--hostname", f"{name}-{os.getpid()}@%h"]
        if concurrency:
            args += ["--concurrency", str(concurrency)]
        if pool:
            args += ["--pool", pool]
        return self._spawn(name, args)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a child's whole process group (a Celery worker and its pool children)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        # A SIGTERM (e.g. from `timeout`) must still run `stop`: turn it into SystemExit.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
