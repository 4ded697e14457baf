"""Celery's remote control works through clientsync's transport: `celery inspect ping` (the
compose worker's healthcheck) and Flower's `enable_events` get their replies.

The replies come back on kombu's pidbox reply queues, consumed without acks. Before the fix the
intake gate took each reply for a malformed task message and dead-lettered it, so every ping
timed out ("No nodes replied") and a healthy worker's container read unhealthy.
"""

from __future__ import annotations

import subprocess
import sys
import time

import redis

from tests.conftest import REPO, running_stack
from worker import keys


def _celery(stack_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tasks.app", *args], env=stack_env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_inspect_ping_gets_the_workers_pong_and_leaves_nothing_behind(redis_server_url: str) -> None:
    with running_stack(redis_server_url, providers=["invoice_ninja"]) as stack:
        deadline = time.monotonic() + 120
        while True:  # the worker answers once it is consuming
            out = _celery(stack.env, "inspect", "ping", "--timeout", "5")
            if out.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no worker answered the ping:\n{out.stdout}\n{out.stderr}"
        assert "pong" in out.stdout and "1 node online" in out.stdout, out.stdout
        enabled = _celery(stack.env, "control", "enable_events", "--timeout", "5")
        assert enabled.returncode == 0 and "task events enabled" in enabled.stdout, enabled.stdout + enabled.stderr
        r = redis.Redis.from_url(stack.redis_url)
        try:
            # The replies were neither dead-lettered nor left owned as unacked deliveries.
            assert r.hgetall(keys.DEAD_LETTERS) == {}  # dead letters counted by reason
            assert not [k for k in r.hkeys(keys.HOLDERS)], "a reply was recorded as a held delivery"
        finally:
            r.close()
