"""The Celery app, built from settings. Each reliability option says why it is set."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from tasks import intake
from worker import logsafe
from worker.settings import LOOP_POOL, Settings


def make_celery(settings: Settings, broker_url: str) -> Celery:
    app = Celery("clientsync", broker=broker_url, include=["tasks.sync", "tasks.signals"])
    app.conf.update(
        # kombu's Redis transport, with every delivery owned from the moment it leaves the queue
        # (BLMOVE into the process's inbox, then its unacked record and holder in one script), so
        # a worker killed anywhere loses nothing and its messages are back in seconds
        # (worker.inflight); and with the intake gate (tasks.intake) in front of Celery's parsing:
        # no entry on the queue, however malformed, kills a worker; it becomes a dead letter.
        # The URL stays redis://.
        broker_transport="tasks.transport:Transport",
        # JSON only: a pickle from a foreign producer would be code execution.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results live in the ledger, not in a result backend.
        task_ignore_result=True,
        # Ack after the task body ran, so a worker killed mid-task leaves the message to be
        # redelivered; idempotency keys make the second run harmless.
        task_acks_late=True,
        # A child process killed (OOM, SIGKILL) requeues its message instead of acking it.
        task_reject_on_worker_lost=True,
        # With acks_late, a worker holds at most `concurrency` unacked messages (with the loop
        # pool, the changes in flight): a crash strands few, and long jobs do not starve others.
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        broker_transport_options={
            intake.OPTION: {"redis_url": broker_url, "max_jobs": settings.ledger_max_jobs},
            # Unacked messages come back after this long even if no reaper did it first (a dead
            # worker's come back within seconds: worker.inflight). Retries never wait as unacked ETA
            # messages (they would be redelivered early and run twice): they are parked in
            # Redis (worker.parking) and pushed back onto the queue when due.
            "visibility_timeout": settings.visibility_timeout,
            # kombu sweeps for expired unacked messages every interval x throttle seconds
            # (100 s by default); a throttle of 1 makes the interval the whole story.
            "unacked_restore_interval": settings.unacked_restore_interval,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        # Task events on by default so Flower (and `celery events`) can watch the workers;
        # they are a fanout publish per task state, so a busy deployment may turn them off.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.concurrency(),
        # The loop pool (tasks.pool) runs each change on the process's event loop.
        worker_pool=LOOP_POOL if settings.worker_pool == "loop" else settings.worker_pool,
    )
    return app


def _json_logs(logger: logging.Logger, **_: Any) -> None:
    from worker.logjson import use_json

    use_json(logger)


def _default_app() -> Celery:
    # Before Celery or kombu log anything: no line carries a full email or a secret.
    logsafe.install()
    settings = Settings()
    if settings.log_format == "json":
        # Celery sets up the worker's log handlers after this import: format them as JSON then.
        signals.after_setup_logger.connect(_json_logs, weak=False)
        signals.after_setup_task_logger.connect(_json_logs, weak=False)
    # `clientsync worker` refuses to start without CLIENTSYNC_REDIS_URL; this fallback only
    # serves tooling that imports the app (e.g. `celery -A tasks.app inspect`).
    return make_celery(settings, settings.redis_url or "redis://127.0.0.1:6379/0")


#: the app `celery -A tasks.app worker` and `clientsync worker` run
app = _default_app()
