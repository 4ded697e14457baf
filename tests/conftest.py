"""Shared fixtures: a real Redis server, and whole clientsync stacks as real processes.

Redis: `CLIENTSYNC_REDIS_URL` when it is set and answers (the tests then use database 15
of that server and flush it first, never the database you pointed at); otherwise an
embedded redis-server started for the session. Never an in-process Redis fake, never Celery eager mode.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import redis

from worker.launcher import Stack
from worker.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
#: reference data copied into the repo (provenance and licence in each folder)
DATA = REPO / "tests" / "data"
TEST_DB = 15


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
    """A real Redis server for the whole session (external db 15, or embedded)."""
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


def clean_env(**overrides: str) -> dict[str, str]:
    """The process env without any CLIENTSYNC_* settings from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIENTSYNC_")}
    env.update(overrides)
    return env


@contextlib.contextmanager
def running_stack(
    redis_url: str, *, providers: list[str], workers: int = 1, concurrency: int = 8, **settings: str
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
            stack.start_worker(f"worker{i}", concurrency=concurrency)
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
