"""Thin task entry points: decode, call one coroutine, map the decision to retry or done.

Each task's body is a coroutine (`BODIES`). The `loop` pool (`tasks.pool`, the default) runs it
on the worker process's event loop without holding a thread, so hundreds of changes wait on
their providers at once; the threads, prefork and solo pools run the same coroutine through
the Celery task below, which blocks its thread on it. Either way the message is acked only
after the body returned, that is after every effect is recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from celery import Task
from celery.exceptions import Reject
from pydantic import ValidationError

from tasks.app import app
from tasks.runtime import Runtime, get_runtime
from worker import keys
from worker.jobs import Decision, fan_out, run_first_attempts, run_job
from worker.models import ClientChange
from worker.parking import APPLY_TASK, marked_headers, task_key

log = logging.getLogger("clientsync.tasks")

__all__ = ["APPLY_TASK", "BODIES", "apply_change_task", "sync_client"]

#: pause before requeueing after Redis trouble, so a struggling Redis is not hammered
REQUEUE_PAUSE_SECONDS = 1.0

SYNC_TASK = "clientsync.sync_client"


async def sync_client_body(rt: Runtime, task_id: str, *args: Any, **kwargs: Any) -> dict[str, str]:
    """`clientsync.sync_client`: one argument, a `ClientChange` JSON object.

    Takes `*args` so a wrong arity is dead-lettered with a reason instead of a TypeError.
    Each provider's first attempt runs here, concurrently; retries are their own messages.
    Returns each provider job's state after that attempt (succeeded, skipped, retrying,
    needs_attention, dead; `intake: dead` for a message that is not a change): Flower shows it
    as the task's result, so SUCCESS (the message was handled) never hides a provider's failure.
    """
    raw: Any = args[0] if len(args) == 1 else {"__args__": list(args), "__kwargs__": kwargs}
    received_at = kwargs.get("received_at") if isinstance(kwargs.get("received_at"), int | float) else None
    async with _requeue_on_infrastructure_error("sync_client"):
        change, providers = await fan_out(raw, rt.context, task_id=task_id, received_at=received_at)
        if change is None:
            return {"intake": "dead"}
        decisions = await run_first_attempts(change, providers, rt.context, received_at=received_at)
    for provider, decision in decisions.items():
        await _fallback_retry(rt, change.model_dump(mode="json"), provider, decision)
    # Providers the change names that are not enabled here were dead-lettered by fan_out.
    states = {p: "dead" for p in change.providers or () if p not in decisions}
    return states | {p: d.state for p, d in decisions.items()}


async def apply_change_body(rt: Runtime, task_id: str, change: dict[str, Any], provider: str,
                            attempt: int = 1) -> str:
    """`clientsync.apply_change`: one run of one (event, provider) job, a parked retry or a replay."""
    try:
        parsed = ClientChange.model_validate(change)
    except ValidationError:
        # Only reachable from a hand-made message: the ledger gets it as a dead letter.
        await fan_out(change, rt.context, task_id=task_id, received_at=None)
        return "dead"
    async with _requeue_on_infrastructure_error("apply_change"):
        decision = await run_job(parsed, provider, attempt, rt.context, task_id=task_id)
    await _fallback_retry(rt, change, provider, decision)
    return decision.state


#: task name -> its body, called as body(runtime, task_id, *args, **kwargs)
BODIES: dict[str, Callable[..., Coroutine[Any, Any, Any]]] = {
    SYNC_TASK: sync_client_body, APPLY_TASK: apply_change_body,
}


@app.task(name=SYNC_TASK, bind=True, max_retries=None)
def sync_client(self: Task[Any, Any], *args: Any, **kwargs: Any) -> dict[str, str]:
    """Entry point for every producer (see `sync_client_body`), on a thread of the pool."""
    rt = get_runtime()
    return rt.run(sync_client_body(rt, self.request.id or "unknown", *args, **kwargs))


@app.task(name=APPLY_TASK, bind=True, max_retries=None)
def apply_change_task(self: Task[Any, Any], change: dict[str, Any], provider: str, attempt: int = 1) -> str:
    """A parked retry or an operator's replay (see `apply_change_body`), on a thread of the pool."""
    rt = get_runtime()
    return rt.run(apply_change_body(rt, self.request.id or "unknown", change, provider, attempt))


@asynccontextmanager
async def _requeue_on_infrastructure_error(what: str) -> AsyncIterator[None]:
    """An error escaping the job logic (Redis unreachable or saturated) must not ack the message.

    `run_job` turns every provider and code failure into a decision; what still escapes is
    trouble with Redis itself. Requeue the message after a pause (jobs that already finished
    skip on the rerun); if Redis cannot even take the requeue, the message stays unacked and
    the broker redelivers it after the visibility timeout.
    """
    try:
        yield
    except Exception as exc:
        log.error("%s could not finish (%r); requeueing the message", what, exc)
        await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
        raise Reject(repr(exc), requeue=True) from exc


async def _fallback_retry(rt: Runtime, change: dict[str, Any], provider: str, decision: Decision, *,
                          publish: Callable[..., Any] | None = None) -> None:
    """Only when parking in Redis failed: a short Celery countdown beats losing the job.

    The countdown message carries the same authenticity mark as a parked retry
    (`worker.parking.marked_headers`): without it the intake gate dead-letters it as forged and
    the job is stranded, `retrying` with no message left to run it (a chaos run with a Redis
    kill showed it: parking failed while Redis restarted, the publish a moment later did not).
    """
    if decision.retry_in is None:
        return
    attempt = decision.attempt or 1
    try:
        headers = marked_headers(await task_key(rt.context.store.redis), keys.job_id(provider, change["event_id"]),
                                 change, provider, attempt)
        # kombu's publish blocks: off the loop.
        await asyncio.to_thread(publish or apply_change_task.apply_async, args=(change, provider),
                                kwargs={"attempt": attempt}, countdown=decision.retry_in, headers=headers)
    except Exception as exc:
        # Redis is away: requeue this message (or, if even that fails, it stays unacked and
        # the broker redelivers it after the visibility timeout). Finished jobs skip on rerun.
        log.error("could not schedule the retry of %s at %s: %s", change.get("event_id"), provider, exc)
        raise Reject(str(exc), requeue=True) from exc
