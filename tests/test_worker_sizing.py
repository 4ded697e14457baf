"""`clientsync worker --concurrency N` sizes what the worker's threads share, not only Celery's pool.

The runtime (tasks.runtime) sizes its Redis connection pool and its HTTP connector from the
settings; a flag that reached Celery alone left them at the default's size (issue 10 measured
156 vs 279 jobs/s at 64). The worker's own start-up line says what it built.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import clean_env
from worker.launcher import Stack

READY = re.compile(r"worker runtime ready .*; (\w+) pool of (\d+), Redis pool of (\d+) connections, "
                   r"(\d+) HTTP connections per host")


def _ready_line(log: Path, deadline: float) -> re.Match[str]:
    while True:
        found = READY.search(log.read_text(errors="replace")) if log.exists() else None
        if found:
            return found
        assert time.monotonic() < deadline, f"the worker never said it was ready:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.parametrize("pool", ["loop", "threads"])
def test_the_concurrency_flag_sizes_the_runtime_too(fresh_redis_url: str, tmp_path: Path, pool: str) -> None:
    # The settings say 3; the flag says 40: the flag wins everywhere.
    stack = Stack(env=clean_env(CLIENTSYNC_REDIS_URL=fresh_redis_url, CLIENTSYNC_WORKER_CONCURRENCY="3",
                                CLIENTSYNC_LOG_LEVEL="INFO"), log_dir=tmp_path)
    try:
        stack.ensure_secrets()
        stack.start_worker("worker0", concurrency=40, pool=pool)
        named, tasks, redis_conns, http_per_host = _ready_line(tmp_path / "worker0.log",
                                                               time.monotonic() + 90).groups()
    finally:
        stack.stop()
    assert (named, int(tasks)) == (pool, 40)
    assert int(redis_conns) >= 40 and int(http_per_host) >= 40  # one each per change in flight at least
    assert int(redis_conns) > 3 * 6 and int(http_per_host) > 3 * 2  # not sized from the setting's 3
