"""Celery signal hooks: build the runtime when a worker process starts, close it at exit."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from tasks.runtime import close_runtime, get_runtime
from worker.gcpolicy import settle_startup_heap

log = logging.getLogger("clientsync.signals")


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    get_runtime()
    settle_startup_heap("worker child")


@worker_ready.connect
def _ready(**_: Any) -> None:
    get_runtime()
    settle_startup_heap("worker")


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stopping(**_: Any) -> None:
    close_runtime()
