"""`clientsync run` (what `make run` starts): everything up, a webhook applied, Ctrl-C stops it all."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO, clean_env
from tests.helpers import change, signed_headers
from worker.redis_server import free_port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_run(tmp_path: Path, port: int, sandbox_port: int, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`clientsync run` as a user starts it; returns the process and its banner, once it is up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--port", str(port), "--sandbox-port", str(sandbox_port),
         "--data-dir", str(tmp_path / "redis")],
        cwd=REPO, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    banner = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        banner += line
        if "Stop with Ctrl-C" in line:
            break
    return proc, banner


def drain(proc: subprocess.Popen[str], banner: str = "") -> list[str]:
    """The banner's lines, then whatever `run` prints next (read on: a full pipe would block the children)."""
    lines: list[str] = banner.splitlines(keepends=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for(lines: list[str], pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if re.search(pattern, line):
                return line
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(lines[-40:])}")


def test_run_shows_the_childrens_logs_prefixed_keeps_them_lists_providers_and_keeps_its_secrets(
        tmp_path: Path) -> None:
    port, sandbox_port = free_port(), free_port()
    proc, banner = start_run(tmp_path, port, sandbox_port)
    try:
        lines = drain(proc, banner)
        # the banner says which providers run, and why the others do not
        assert re.search(r"enabled: .*invoice_ninja", banner), banner
        secret = re.search(r"CLIENTSYNC_WEBHOOK_SECRET=(whsec_\S+)", banner).group(1)  # type: ignore[union-attr]
        token = re.search(r"CLIENTSYNC_MONITOR_TOKEN=(\S+)", banner).group(1)  # type: ignore[union-attr]
        assert len(token) >= 32
        # the children's start-up lines, prefixed, interleaved on stdout
        wait_for(lines, r"^\[worker\] .*providers enabled")
        wait_for(lines, r"^\[sandbox\] ")
        event = change("run-evt-logs", "run-client-logs", name="Logged Co")
        body = json.dumps(event).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/clients", data=body, method="POST",
                                     headers=signed_headers(secret, body))
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
        applied = wait_for(lines, r"^\[worker\] .*applied .*run-evt-logs")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    logs = tmp_path / "logs"
    assert applied.removeprefix("[worker] ") in (logs / "worker.log").read_text()
    assert (logs / "receiver.log").stat().st_size > 0 and (logs / "sandbox.log").is_file()
    assert (tmp_path / "secrets" / "webhook_secret").stat().st_mode & 0o077 == 0

    # a restart keeps the same secret and token (a configured sender keeps working)
    proc, again = start_run(tmp_path, free_port(), free_port())
    try:
        assert f"CLIENTSYNC_WEBHOOK_SECRET={secret}" in again
        assert f"CLIENTSYNC_MONITOR_TOKEN={token}" in again
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_run_lists_disabled_providers_with_what_to_set(tmp_path: Path) -> None:
    # Only Qonto configured (at a port nothing listens on): no sandbox, the others disabled.
    proc, banner = start_run(tmp_path, free_port(), free_port(), CLIENTSYNC_QONTO_TOKEN="t",
                             CLIENTSYNC_QONTO_URL=f"http://127.0.0.1:{free_port()}")
    try:
        drain(proc)
        assert "enabled: qonto" in banner
        assert re.search(r"grow_crm\s+disabled: set CLIENTSYNC_GROW_CRM_URL", banner), banner
        assert re.search(r"lsp_expert\s+disabled: set CLIENTSYNC_LSP_EXPERT_API_KEY", banner), banner
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_run_starts_everything_prints_how_to_use_it_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, sandbox_port = free_port(), free_port()
    proc, banner = start_run(tmp_path, port, sandbox_port)
    try:
        assert f"POST http://127.0.0.1:{port}/webhooks/clients" in banner
        secret = re.search(r"CLIENTSYNC_WEBHOOK_SECRET=(whsec_\S+)", banner)
        assert secret, banner
        assert f"sandbox at http://127.0.0.1:{sandbox_port}" in banner
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", banner).group(1))  # type: ignore[union-attr]

        event = change("run-evt-1", "run-client-1", name="Run Test Co")
        body = json.dumps(event).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/clients", data=body, method="POST",
                                     headers=signed_headers(secret.group(1), body))
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
        # Applied at every sandbox provider that can hold this client.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            url = f"http://127.0.0.1:{sandbox_port}/invoice_ninja/_sandbox/clients"
            with urllib.request.urlopen(url, timeout=5) as resp:
                if any(c.get("name") == "Run Test Co" for c in json.load(resp)["clients"]):
                    break
            time.sleep(0.3)
        else:
            raise AssertionError("the webhook was not applied at the Invoice Ninja sandbox")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    for p in (port, sandbox_port, redis_port):
        assert not port_open(p), f"port {p} still open after Ctrl-C"
    assert (tmp_path / "redis").is_dir()  # the embedded Redis kept its data where asked


def celery_workers(parent: int, wait: float = 20) -> list[str]:
    """Pids of the Celery workers `parent` started (`clientsync worker` execs Celery, so it takes a moment)."""
    deadline = time.monotonic() + wait
    while True:
        found = subprocess.run(["pgrep", "-f", "-P", str(parent), "tasks.app worker"], capture_output=True,
                               text=True).stdout.split()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def test_run_restarts_a_worker_that_dies(tmp_path: Path) -> None:
    proc, _banner = start_run(tmp_path, free_port(), free_port())
    try:
        assert proc.stdout is not None
        workers = celery_workers(proc.pid)
        assert len(workers) == 1
        subprocess.run(["kill", "-9", workers[0]], check=True)
        for line in proc.stdout:
            if "restarting it" in line:
                break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            again = celery_workers(proc.pid, wait=0)
            if again and again != workers:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no new worker was started")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
