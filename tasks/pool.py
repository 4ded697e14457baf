"""The `loop` pool: clientsync's tasks run on the process's event loop, not one thread each.

A change spends nearly all its time waiting on providers. With Celery's threads pool each
change in flight holds a thread until its slowest provider answers, so a process has only as
many changes in flight as threads. This pool is Celery's threads pool with one difference:
a task that has a coroutine body (`tasks.sync.BODIES`) is not handed to a thread; its body is
scheduled on the runtime's loop (`tasks.runtime`), and the pool reports back to Celery when it
ends, exactly as a thread would have:

- `accept_callback` when it starts (the `task-started` event, the worker's active list);
- `callback((failed, result, runtime))` when it ends, which acks the message (late acks: only
  now, after the body recorded every effect), or rejects and requeues it when the body raised
  `Reject`, and sends `task-succeeded` with the result's repr, as Celery's tracer would.

So `--concurrency N` is the number of changes in flight (Celery prefetches N unacked messages,
`worker_prefetch_multiplier` 1), and they cost a coroutine each, not a thread. The callbacks do
blocking Redis I/O (the ack), so they run on a few threads of their own, never on the loop. Tasks
without a coroutine body run on the threads as before. A warm shutdown waits for the bodies
in flight and their acks, as the threads pool waits for its threads.

Celery's documented hook for an out-of-tree pool: `CELERY_CUSTOM_WORKER_POOL=tasks.pool:LoopPool`
with `--pool custom` (`clientsync worker --pool loop` sets both).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.concurrency import thread
from celery.exceptions import Reject
from celery.utils.saferepr import saferepr
from kombu.serialization import loads, prepare_accept_content

from worker.gcpolicy import gc_info

log = logging.getLogger("clientsync.pool")

_ThreadPool: Any = thread.TaskPool

#: threads that report ends to Celery (an ack is one short Redis call)
REPORTERS = 4
#: pause before requeueing a message the runtime could not take, so a broken runtime does not spin
REQUEUE_PAUSE_SECONDS = 1.0


def runtime() -> Any:
    """This process's runtime (`tasks.runtime`), imported late: the pool is loaded before the app."""
    from tasks.runtime import get_runtime

    return get_runtime()


def _failed(exc: BaseException) -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_exception(exc)
    return future


class LoopPool(_ThreadPool):  # type: ignore[misc]
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        #: bodies running on the loop, and their callbacks until they have run
        self._running = 0
        #: report ends (acks: blocking Redis I/O) off the loop, on a few threads of their own
        self._reporters = concurrent.futures.ThreadPoolExecutor(REPORTERS, thread_name_prefix="clientsync-ack")

    def on_apply(self, target: Any, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None,
                 callback: Callable[..., Any] | None = None, accept_callback: Callable[..., Any] | None = None,
                 **options: Any) -> Any:
        from tasks.sync import BODIES

        body = BODIES.get(args[0]) if args else None
        if args is None or body is None or callback is None:
            return super().on_apply(target, args, kwargs, callback, accept_callback, **options)
        name, task_id, _request, message_body, content_type, content_encoding = args[:6]
        maxsize = self.app.tasks[name].resultrepr_maxsize
        with self._lock:
            self._running += 1
        started = time.monotonic()
        if accept_callback is not None:
            accept_callback(os.getpid(), started)
        try:
            rt = runtime()
        except Exception as exc:
            return self._requeue(exc, task_id, callback, started, maxsize)
        try:
            call_args, call_kwargs = self._decode(message_body, content_type, content_encoding)
            coro = body(rt, task_id or "unknown", *call_args, **call_kwargs)  # a wrong arity raises here
        except Exception as exc:  # a message the task cannot take: a failure, as Celery's tracer has it
            self._ended(_failed(exc), callback, started, maxsize)
            return None
        try:
            future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, rt.loop)
        except Exception as exc:  # the runtime's loop is gone (a stop under way)
            coro.close()
            return self._requeue(exc, task_id, callback, started, maxsize)
        # The future completes on the loop's thread: hand the ack to a pool thread.
        future.add_done_callback(lambda f: self._ended(f, callback, started, maxsize))
        return None

    def _requeue(self, exc: Exception, task_id: Any, callback: Callable[..., Any], started: float,
                 maxsize: int) -> None:
        """The runtime could not take the message (Redis away when it was built, or its loop
        stopped): the message is not the problem, so it is requeued, not acked as a failure,
        after a pause so a broken runtime does not spin on it."""
        log.error("the worker runtime could not take task %s (%r); requeueing the message", task_id, exc)
        requeue = Reject(f"worker runtime unavailable: {exc!r}", requeue=True)
        self._ended(_failed(requeue), callback, started, maxsize, pause=REQUEUE_PAUSE_SECONDS)

    def _decode(self, body: Any, content_type: str | None, content_encoding: str | None
                ) -> tuple[list[Any], dict[str, Any]]:
        """The message body as Celery's tracer reads it (protocol 2: args, kwargs, embed)."""
        if content_type:
            accept = prepare_accept_content(self.app.conf.accept_content)
            args, kwargs, _embed = loads(body, content_type, content_encoding or "utf-8", accept=accept)
        else:
            args, kwargs, _embed = body
        return list(args or ()), dict(kwargs or {})

    def _ended(self, future: concurrent.futures.Future[Any], callback: Callable[..., Any], started: float,
               maxsize: int, pause: float = 0.0) -> None:
        try:
            self._reporters.submit(self._report, future, callback, started, maxsize, pause)
        except RuntimeError:  # the executor is shut down (a cold shutdown): report from here
            self._report(future, callback, started, maxsize)

    def _report(self, future: concurrent.futures.Future[Any], callback: Callable[..., Any], started: float,
                maxsize: int, pause: float = 0.0) -> None:
        """Tell Celery how the body ended, as `celery.app.trace` does for a thread."""
        try:
            if pause:
                time.sleep(pause)
            runtime = time.monotonic() - started
            try:
                result = future.result()
            except BaseException as exc:
                callback((1, ExceptionInfo((type(exc), exc, exc.__traceback__)), runtime))
            else:
                callback((0, saferepr(result, maxsize), runtime))
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def on_stop(self) -> None:
        """Warm shutdown: let the bodies in flight finish and be acked, then stop the threads."""
        with self._idle:
            while self._running:
                self._idle.wait()
        self._reporters.shutdown()
        super().on_stop()

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info["in-flight"] = self._running
        info["gc"] = gc_info()
        return info
