"""Celery's remote control works through clientsync's transport: `celery inspect ping` (the
compose worker's healthcheck) and Flower's `enable_events` get their replies.

The replies come back on kombu's pidbox reply queues, consumed without acks. Before the fix the
intake gate took each reply for a malformed task message and dead-lettered it, so every ping
timed out ("No nodes replied") and a healthy worker's container read unhealthy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from tests.conftest import REPO, running_stack
from worker import keys
from worker.gcpolicy import YOUNG_THRESHOLD
from worker.launcher import Stack


def _celery(stack_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tasks.app", *args], env=stack_env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def stack(redis_server_url: str) -> Iterator[Stack]:
    with running_stack(redis_server_url, providers=["invoice_ninja"]) as running:
        yield running


def test_inspect_ping_gets_the_workers_pong_and_leaves_nothing_behind(stack: Stack) -> None:
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


def test_the_running_worker_froze_its_startup_heap_and_raised_the_young_threshold(stack: Stack) -> None:
    """`celery inspect stats` reads the worker process's own collector (worker.gcpolicy): the
    startup heap frozen out of every collection, the young threshold raised. A worker that
    skipped `settle_startup_heap` shows 0 frozen and CPython's 700."""
    deadline = time.monotonic() + 120
    while True:
        out = _celery(stack.env, "inspect", "stats", "--json", "--timeout", "5")
        if out.returncode == 0:
            break
        assert time.monotonic() < deadline, f"no worker answered:\n{out.stdout}\n{out.stderr}"
    (stats,) = json.loads(out.stdout).values()
    gc_seen = stats["pool"]["gc"]
    assert gc_seen["threshold"][0] == YOUNG_THRESHOLD, gc_seen
    assert gc_seen["frozen"] > 10_000, gc_seen  # modules, classes, functions: tens of thousands
