"""Thin task entry points: decode, call one coroutine, map the decision to retry or done."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from pydantic import ValidationError

from tasks.app import app
from tasks.runtime import get_runtime
from worker.jobs import fan_out, run_job
from worker.models import ClientChange
from worker.parking import APPLY_TASK

log = logging.getLogger("clientsync.tasks")

__all__ = ["APPLY_TASK", "apply_change_task", "sync_client"]


@app.task(name="clientsync.sync_client", bind=True, max_retries=None)
def sync_client(self: Task[Any, Any], *args: Any, **kwargs: Any) -> int:
    """Entry point for every producer: one argument, a `ClientChange` JSON object.

    Takes `*args` so a wrong arity is dead-lettered with a reason instead of a TypeError.
    """
    rt = get_runtime()
    task_id = self.request.id or "unknown"
    raw: Any = args[0] if len(args) == 1 else {"__args__": list(args), "__kwargs__": kwargs}
    received_at = kwargs.get("received_at") if isinstance(kwargs.get("received_at"), int | float) else None
    jobs = rt.run(fan_out(raw, rt.context, task_id=task_id, received_at=received_at))
    for _job_id, provider in jobs:
        apply_change_task.apply_async(args=(raw, provider), kwargs={"attempt": 1})
    return len(jobs)


@app.task(name=APPLY_TASK, bind=True, max_retries=None)
def apply_change_task(self: Task[Any, Any], change: dict[str, Any], provider: str, attempt: int = 1) -> str:
    """One run of one (event, provider) job; its retries are parked in Redis by `run_job`."""
    rt = get_runtime()
    try:
        parsed = ClientChange.model_validate(change)
    except ValidationError:
        # Only reachable from a hand-made message: sync_client validated it already.
        log.error("apply_change got an invalid change; dropping to the ledger via sync_client")
        rt.run(fan_out(change, rt.context, task_id=self.request.id or "unknown", received_at=None))
        return "dead"
    decision = rt.run(run_job(parsed, provider, attempt, rt.context))
    if decision.retry_in is not None:
        # Only when parking in Redis failed: a short countdown beats losing the job.
        raise self.retry(args=(change, provider), kwargs={"attempt": decision.attempt or attempt + 1},
                         countdown=decision.retry_in)
    return decision.state
