"""The loop pool's contract with Celery when a message cannot run (tasks.pool), in-process.

Celery acks a task that failed (late acks, `acks_on_failure_or_timeout`) and requeues one that
raised `Reject(requeue=True)`. A runtime that cannot be built (Redis away at start-up) or whose
loop has stopped is not the message's fault: it must come back as a requeue, never as a failure
that would ack it away. A message the task cannot take (a wrong arity) is a failure, as Celery's
own tracer reports it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from celery.exceptions import Reject

import tasks.sync  # noqa: F401 - registers the tasks
from tasks import pool as loop_pool
from tasks.app import app
from tasks.pool import LoopPool
from tests.helpers import change


def _apply(pool: LoopPool, task: str, args: list[Any]) -> tuple[int, Any, float]:
    reported: list[tuple[int, Any, float]] = []
    done = threading.Event()

    def callback(result: tuple[int, Any, float]) -> None:
        reported.append(result)
        done.set()

    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    pool.on_apply(None, args=(task, "task-1", {}, body.encode(), "application/json", "utf-8"),
                  callback=callback, accept_callback=lambda pid, at: None)
    assert done.wait(60), "the pool never reported the end"
    failed, info, took = reported[0]
    # billiard wraps the exception with its traceback; Celery's on_failure unwraps it the same way
    return failed, getattr(info.exception, "exc", info.exception), took


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(loop_pool, "REQUEUE_PAUSE_SECONDS", 0.0)
    p = LoopPool(limit=2, app=app)
    yield p
    p.on_stop()


def test_a_runtime_that_cannot_be_built_requeues_the_message(pool: LoopPool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(loop_pool, "runtime", broken)
    failed, exc, _ = _apply(pool, "clientsync.sync_client", [change("e-1", "c-1")])
    assert failed == 1
    assert isinstance(exc, Reject) and exc.requeue is True
    assert "Redis is away" in str(exc)


def test_a_stopped_loop_requeues_the_message(pool: LoopPool, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    class Stopped:
        loop = asyncio.new_event_loop()
        context = None

    Stopped.loop.close()  # run_coroutine_threadsafe refuses a closed loop
    monkeypatch.setattr(loop_pool, "runtime", lambda: Stopped())
    failed, exc, _ = _apply(pool, "clientsync.sync_client", [change("e-2", "c-2")])
    assert failed == 1 and isinstance(exc, Reject) and exc.requeue is True


def test_a_message_with_the_wrong_arity_is_a_failure_not_a_requeue(pool: LoopPool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_pool, "runtime", lambda: object())
    failed, exc, _ = _apply(pool, "clientsync.apply_change", [])  # needs a change and a provider
    assert failed == 1 and isinstance(exc, TypeError)
