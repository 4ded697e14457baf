"""Shared fixtures: a real Redis server, and whole clientsync stacks as real processes.

Redis: `CLIENTSYNC_REDIS_URL` when it is set and answers (the tests then use database 15 of
that server, 14 and 13 in the second and third xdist process, and flush it first, never the
database you pointed at); otherwise an embedded redis-server started for each test process.
Never an in-process Redis fake, never Celery eager mode.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.monitor_fixtures import MakeClient
from worker.launcher import Stack
from worker.ledger import Ledger
from worker.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
#: reference data copied into the repo (provenance and licence in each folder)
DATA = REPO / "tests" / "data"
#: under pytest-xdist (`make test`), each test process has a database of its own: gw0 15, gw1 14, ...
TEST_DB = 15 - int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)

#: modules that run whole stacks as real processes (Celery workers, the receiver, Chromium, the
#: chaos bench): `make test` runs them one after another in a single test process, beside the
#: in-process tests, which mostly wait on provider timeouts and settle times. Two CPU-heavy
#: stacks at once on a 2-core machine would only slow each other down.
PROCESS_MODULES = frozenset({
    "test_chaos_short", "test_cli_operator", "test_dashboard_browser", "test_demo", "test_identity_e2e",
    "test_intake_corpus", "test_intake_doors", "test_lifecycle_crash", "test_link_command", "test_monitor_e2e",
    "test_operator_controls_e2e", "test_provider_responses", "test_retry_e2e_outage", "test_retry_e2e_parking",
    "test_retry_e2e_throttle", "test_run_command", "test_spine_crash", "test_spine_e2e",
    "test_spine_redis_trouble", "test_status_truth", "test_worker_sizing", "test_check", "test_durability",
    "test_inflight", "test_completion", "test_cli", "test_flower_result", "test_loop_pool",
    "test_remote_control",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`--dist loadgroup`: the process-running modules share one group (see PROCESS_MODULES)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in PROCESS_MODULES:
            item.add_marker(pytest.mark.xdist_group("processes"))


def _external_redis() -> str | None:
    url = os.environ.get("CLIENTSYNC_REDIS_URL")
    if not url:
        return None
    parts = urlsplit(url)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{TEST_DB}", "", ""))
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return None
    return url


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """A real Redis server for the whole session (external db TEST_DB, or embedded)."""
    url = _external_redis()
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for talking to the receiver and the sandbox control API."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def fresh_redis_url(redis_server_url: str) -> str:
    """The session's Redis, flushed: a test that needs an empty database."""
    redis.Redis.from_url(redis_server_url).flushdb()
    return redis_server_url


# --- the monitor API tests (test_monitor_api, test_monitor_client_api); a module's own `r` or
# `api` fixture (e.g. test_ledger, test_intake_web) takes precedence over these -----------------
@pytest.fixture
async def r(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client (str replies) of the flushed Redis."""
    client = aioredis.from_url(fresh_redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def ledger(r: aioredis.Redis) -> Ledger:
    return Ledger(r)


@pytest.fixture
async def api(aiohttp_client: MakeClient, fresh_redis_url: str) -> TestClient[Any, Any]:
    """The real receiver app with the monitor token set (tests.monitor_fixtures.AUTH), on the flushed Redis."""
    from tests.monitor_fixtures import settings
    from worker.web.app import create_app  # here: only the tests that use it import the web app

    return await aiohttp_client(create_app(settings(), fresh_redis_url))


def clean_env(**overrides: str) -> dict[str, str]:
    """The process env without any CLIENTSYNC_* settings from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIENTSYNC_")}
    env.update(overrides)
    return env


@contextlib.contextmanager
def running_stack(
    redis_url: str, *, providers: list[str], workers: int = 1, concurrency: int = 8, pool: str | None = None,
    **settings: str
) -> Iterator[Stack]:
    """Redis flushed, then sandbox + receiver + `workers` Celery workers as real processes."""
    redis.Redis.from_url(redis_url).flushdb()
    log_dir = REPO / "var" / "test-logs" / uuid.uuid4().hex[:8]
    stack = Stack(env=clean_env(CLIENTSYNC_REDIS_URL=redis_url, **settings), log_dir=log_dir)
    try:
        stack.ensure_secrets()
        stack.start_sandbox(names=providers)
        stack.start_receiver()
        for i in range(workers):
            stack.start_worker(f"worker{i}", concurrency=concurrency, pool=pool)
        yield stack
    finally:
        stack.stop()


def uid(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def provider_timeouts(providers: list[str], seconds: float = 1.0) -> dict[str, str]:
    """Per-provider call timeouts (and settle times) short enough for a test's short lease: the
    worker refuses to start when CLIENTSYNC_LEASE_SECONDS <= timeout + settle (worker.sync.lease_problems)."""
    out: dict[str, str] = {}
    for name in providers:
        out[f"CLIENTSYNC_{name.upper()}_TIMEOUT"] = f"{seconds:g}"
        out[f"CLIENTSYNC_{name.upper()}_SETTLE_SECONDS"] = f"{seconds:g}"
    return out


@pytest.fixture(name="redis")
async def stack_redis(stack: Stack) -> AsyncIterator[aioredis.Redis]:
    """A client (str replies) of the module's `stack` fixture (each stack-running module defines
    one), once every worker that stack started is heartbeating."""
    from tests.helpers import workers_ready

    client = aioredis.from_url(stack.redis_url, decode_responses=True)
    await workers_ready(client, sum(name.startswith("worker") for name in stack.procs))
    yield client
    await client.aclose()

