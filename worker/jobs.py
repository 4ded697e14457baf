"""Job-level logic between the Celery tasks and the use case, testable without Celery.

`fan_out` validates a queued `sync_client` argument and opens one ledger job per target
provider; `run_job` runs one attempt of one job and returns the decision (done, or retry
in N seconds). The task layer only turns a decision into `self.retry(...)`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from worker import keys
from worker.backoff import retry_delay
from worker.errors import Busy, ClientSyncError, InternalError, ProviderError
from worker.ledger import Attempt, Ledger
from worker.models import ClientChange, mask_email
from worker.providers.base import ProviderAdapter, ProviderConfig
from worker.store import SyncStore
from worker.sync import apply_change

log = logging.getLogger("clientsync.jobs")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base: float
    cap: float

    @classmethod
    def for_provider(cls, config: ProviderConfig, *, max_attempts: int, base: float, cap: float,
                     ceiling: float) -> RetryPolicy:
        """The provider's own policy where set; every delay stays under `ceiling`."""
        return cls(
            max_attempts=config.max_attempts or max_attempts,
            base=config.retry_base or base,
            cap=min(config.retry_cap or cap, ceiling),
        )


@dataclass(frozen=True)
class Decision:
    """What the task layer must do after one attempt."""

    retry_in: float | None = None  # None = finished (succeeded, skipped or dead)
    state: str = "succeeded"


@dataclass
class JobContext:
    """Everything a job needs, built once per worker process."""

    store: SyncStore
    ledger: Ledger
    adapters: Mapping[str, ProviderAdapter]
    policies: Mapping[str, RetryPolicy]
    disabled: Mapping[str, str]  # provider -> why (missing env vars)
    owner: str
    lock_wait: float
    rng: random.Random


def validation_message(exc: ValidationError) -> tuple[str, dict[str, list[str]]]:
    """A readable summary and per-field messages, with the field path named."""
    fields: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        fields.setdefault(loc, []).append(err["msg"])
    summary = "; ".join(f"{k}: {', '.join(v)}" for k, v in fields.items())
    return f"invalid ClientChange: {summary}", fields


async def fan_out(raw: Any, ctx: JobContext, *, task_id: str, received_at: float | None) -> list[tuple[str, str]]:
    """Validate one queued change; open a ledger job per provider; return (job_id, provider) pairs.

    An invalid argument becomes a dead letter with the validation errors, never an exception.
    """
    try:
        change = ClientChange.model_validate(raw)
    except ValidationError as exc:
        message, fields = validation_message(exc)
        raw_text = json.dumps(raw, default=str) if not isinstance(raw, str) else raw
        await ctx.ledger.dead_letter(
            f"invalid:{task_id}", raw=raw_text,
            attempt=Attempt(1, time.time(), "dead", "invalid_message", None, message, fields),
        )
        log.warning("dead-lettered invalid message task_id=%s: %s", task_id, message)
        return []
    targets = list(change.providers) if change.providers is not None else sorted(ctx.adapters)
    jobs = []
    for provider in targets:
        job_id = await ctx.ledger.enqueued(change, provider, received_at=received_at)
        if provider in ctx.adapters:
            jobs.append((job_id, provider))
            continue
        why = ctx.disabled.get(provider, "unknown provider")
        await ctx.ledger.dead(job_id, Attempt(1, time.time(), "dead", "provider_disabled", None,
                                              f"{provider} is not enabled: {why}"))
    return jobs


async def run_job(change: ClientChange, provider: str, attempt: int, ctx: JobContext) -> Decision:
    """One attempt at one (event, provider) job; records the ledger and returns the decision."""
    job_id = keys.job_id(provider, change.event_id)
    adapter = ctx.adapters.get(provider)
    started = time.time()
    if adapter is None:
        await ctx.ledger.dead(job_id, Attempt(attempt, started, "dead", "provider_disabled", None,
                                              f"{provider} is not enabled: {ctx.disabled.get(provider, '?')}"))
        return Decision(state="dead")
    await ctx.ledger.running(job_id)
    bound = {"event_id": change.event_id, "provider": provider, "attempt": attempt,
             "client": change.client.id, "email": mask_email(change.client.email)}
    try:
        outcome = await apply_change(change, adapter, ctx.store, owner=f"{ctx.owner}:{job_id}:{attempt}",
                                     lock_wait=ctx.lock_wait, rng=ctx.rng)
    except ClientSyncError as exc:
        return await _failed(job_id, attempt, started, exc, ctx.policies[provider], ctx, bound)
    except Exception as exc:
        # A bug or Redis trouble must not lose the job: retry it, and it ends dead with the
        # message rather than vanishing with an acked Celery message.
        log.exception("internal error %s", bound)
        internal = InternalError(f"internal error: {exc!r}", provider=provider)
        return await _failed(job_id, attempt, started, internal, ctx.policies[provider], ctx, bound)
    took = (time.time() - started) * 1000
    done = Attempt(attempt, started, "skipped" if outcome.result == "skipped" else "succeeded",
                   duration_ms=round(took, 1), message=outcome.reason or outcome.result)
    if outcome.result == "skipped":
        await ctx.ledger.skipped(job_id, done, reason=outcome.reason or "skipped", provider_id=outcome.provider_id)
    else:
        await ctx.ledger.succeeded(job_id, done, result=outcome.result, provider_id=outcome.provider_id)
    log.info("applied %s", {**bound, "result": outcome.result, "reason": outcome.reason,
                            "replayed": outcome.replayed, "ms": round(took, 1)})
    return Decision(state="skipped" if outcome.result == "skipped" else "succeeded")


async def _failed(job_id: str, attempt: int, started: float, exc: ClientSyncError, policy: RetryPolicy,
                  ctx: JobContext, bound: dict[str, Any]) -> Decision:
    status = exc.status if isinstance(exc, ProviderError) else None
    fields = exc.field_errors if isinstance(exc, ProviderError) else {}
    message = str(exc)
    took = round((time.time() - started) * 1000, 1)
    if exc.retryable and attempt < policy.max_attempts:
        retry_after = getattr(exc, "retry_after", None)
        # Busy is not the provider's fault: come back soon, whatever the attempt number.
        delay = (retry_delay(1, base=policy.base, cap=policy.cap, retry_after=retry_after, rng=ctx.rng)
                 if isinstance(exc, Busy) else
                 retry_delay(attempt, base=policy.base, cap=policy.cap, retry_after=retry_after, rng=ctx.rng))
        delay = min(delay, policy.cap)
        await ctx.ledger.retrying(job_id, Attempt(attempt, started, "retrying", exc.kind, status, message, fields,
                                                  next_attempt_at=time.time() + delay, duration_ms=took))
        log.warning("retrying %s", {**bound, "error": exc.kind, "status": status, "in_s": round(delay, 2)})
        return Decision(retry_in=delay, state="retrying")
    await ctx.ledger.dead(job_id, Attempt(attempt, started, "dead", exc.kind, status, message, fields,
                                          duration_ms=took))
    log.error("dead %s", {**bound, "error": exc.kind, "status": status, "message": message})
    return Decision(state="dead")
