"""Job-level logic between the Celery tasks and the use case, testable without Celery.

`fan_out` validates a queued `sync_client` argument and opens one ledger job per target
provider; `run_job` runs one attempt of one job and decides what comes next. It is the one
owner of retries (adapters never loop):

- a provider's 429 block that will not end soon parks the job before it starts, shown as
  `retrying` (`rate_limited`), and spends no attempt;
- the provider's circuit (`worker.circuit`) is asked next; while it is open the job is
  parked the same way until the probe time (`circuit_open`);
- a call the shared rate limit cannot fit soon (`worker.ratelimit.BucketEmpty`) parks the job
  the same way (`rate_limited`), also without spending an attempt;
- a permanent error is dead at once; a transient one is retried after a full-jitter
  exponential backoff (a server's Retry-After wins; a 429's Retry-After also blocks every
  other job's calls to that provider), until the provider's `max_attempts`;
- every retry, short or long, is parked in Redis (`worker.parking`) rather than held as a
  Celery countdown, so no delay can outlive the broker's visibility timeout and run twice.

On the success path a job's bookkeeping is two Redis round trips (`worker.steps`): its start
(the block, the circuit, the ledger's `running`, the claim) and its finish (the store, the
ledger's `succeeded`, the circuit), each one script; a create adds its recorded intent, and a
provider with a configured rate limit one shared token per call after the first (the start
script takes the first when one is free at once).

The task layer only turns a `Decision` into a return (or, if parking failed, `self.retry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from worker import keys
from worker.backoff import RETRY_AFTER_MAX, retry_delay
from worker.circuit import CircuitBreaker, CircuitState, credentials_fingerprint
from worker.circuit import Outcome as CircuitOutcome
from worker.errors import (
    AuthError,
    Busy,
    ClientSyncError,
    IdempotencyConflict,
    InternalError,
    NeedsAttention,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from worker.lease import ProviderTime, provider_time
from worker.lease import calls as lease_calls
from worker.ledger import Attempt, Ledger
from worker.models import ClientChange, mask_email, mask_emails
from worker.parking import Parking
from worker.providers.base import ProviderAdapter, ProviderConfig
from worker.ratelimit import BucketEmpty, RateLimiter
from worker.ratelimit import prepaid as prepaid_tokens
from worker.steps import Call, JobSteps
from worker.store import SyncStore
from worker.sync import Outcome, apply_change

log = logging.getLogger("clientsync.jobs")


def _outcome(level: int, what: str, fields: dict[str, Any]) -> None:
    """One log line per outcome: `what {fields}` as text; the fields also travel structured
    (`extra`), so `CLIENTSYNC_LOG_FORMAT=json` (worker.logjson) writes them as JSON keys."""
    log.log(level, "%s %s", what, fields, extra={"fields": {"outcome": what, **fields}})



@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base: float
    cap: float

    @classmethod
    def for_provider(cls, config: ProviderConfig, *, max_attempts: int, base: float, cap: float,
                     ceiling: float | None = None) -> RetryPolicy:
        """The provider's own policy where set (`CLIENTSYNC_<PROVIDER>_MAX_ATTEMPTS`, …), else the
        global one. No visibility-timeout ceiling is needed: retries are parked, not countdowns."""
        cap = config.retry_cap or cap
        return cls(
            max_attempts=config.max_attempts or max_attempts,
            base=config.retry_base or base,
            cap=min(cap, ceiling) if ceiling is not None else cap,
        )


@dataclass(frozen=True)
class Decision:
    """What the task layer must do after one run of a job."""

    #: seconds for a Celery countdown: only set when parking in Redis failed (None = nothing to do)
    retry_in: float | None = None
    state: str = "succeeded"  # succeeded | skipped | dead | retrying
    #: the attempt number the next run carries (the same one when no attempt was spent)
    attempt: int | None = None
    #: unix seconds the parked retry is due
    next_attempt_at: float | None = None


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
    parking: Parking | None = None  # None: retries fall back to Celery countdowns
    limiter: RateLimiter | None = None
    circuit: CircuitBreaker | None = None
    retry_after_max: float = RETRY_AFTER_MAX
    #: how soon a job waiting on a half-open circuit looks again (also the spread after a cool-down)
    circuit_recheck: float = 1.0
    #: the longest fallback countdown (keep it well under the broker's visibility timeout)
    countdown_max: float = 60.0
    #: how often jobs held by an auth-failed or paused provider look again
    hold_recheck: float = 5.0
    #: the start and finish scripts (worker.steps), on the store's Redis
    steps: JobSteps = field(init=False)

    def __post_init__(self) -> None:
        self.steps = JobSteps(self.store.redis)


def before_call_hook(limiter: RateLimiter | None) -> Callable[[str], Awaitable[None]]:
    """The adapters' `before_call`: honour the shared rate limit and 429 blocks (the call itself
    is counted by the adapter, `worker.lease.calls`)."""

    async def before_call(provider: str) -> None:
        if limiter is not None:
            await limiter.before_call(provider)

    return before_call


def validation_message(exc: ValidationError) -> tuple[str, dict[str, list[str]]]:
    """A readable summary and per-field messages, with the field path named."""
    fields: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        fields.setdefault(loc, []).append(err["msg"])
    summary = "; ".join(f"{k}: {', '.join(v)}" for k, v in fields.items())
    return f"invalid ClientChange: {summary}", fields


async def fan_out(
    raw: Any, ctx: JobContext, *, task_id: str, received_at: float | None
) -> tuple[ClientChange | None, list[str]]:
    """Validate one queued change; return it and the providers to run.

    An invalid argument becomes a dead letter with the validation errors, never an exception.
    A provider the change names that is not enabled gets its job opened and dead-lettered here;
    the enabled providers' jobs are opened by their first attempts, each in its own start script
    (`run_first_attempts`), not in a round trip of their own before them.
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
        return None, []
    targets = list(change.providers) if change.providers is not None else sorted(ctx.adapters)
    disabled = [p for p in targets if p not in ctx.adapters]
    job_ids = await ctx.ledger.enqueued_many(change, disabled, received_at=received_at)
    for provider, job_id in zip(disabled, job_ids, strict=True):
        why = ctx.disabled.get(provider, "unknown provider")
        await ctx.ledger.dead(job_id, Attempt(1, time.time(), "dead", "provider_disabled", None,
                                              f"{provider} is not enabled: {why}"))
    return change, [p for p in targets if p in ctx.adapters]


async def run_first_attempts(change: ClientChange, providers: list[str], ctx: JobContext, *,
                             received_at: float | None = None) -> dict[str, Decision]:
    """The first run of every provider's job, concurrently on this process's loop.

    Running them here rather than as one Celery task per provider saves a publish, a
    delivery, an ack and their task events per provider; each job's retries still go their
    own way (parked in Redis as `clientsync.apply_change` messages). Each job is opened (ledger
    `queued`, with `received_at`) by its own start script if it is new, so it is never seen
    running before it was queued, and a redelivered change finds its jobs as they were.
    """
    results = await asyncio.gather(*(
        run_job(change, p, 1, ctx, open_job=ctx.ledger.open_call(change, p, received_at=received_at))
        for p in providers), return_exceptions=True)
    # Let every provider's job finish before surfacing a failure: the task requeues the
    # whole change, and the jobs that did finish skip on the rerun.
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return dict(zip(providers, results, strict=True))  # type: ignore[arg-type]


async def run_job(change: ClientChange, provider: str, attempt: int, ctx: JobContext, *,
                  task_id: str | None = None, open_job: Call | None = None) -> Decision:
    """One run of one (event, provider) job; records the ledger and returns the decision.

    `task_id` is the Celery message's id when it came through the queue; `open_job`
    (`Ledger.open_call`) opens the job in the start script when it is new (a first attempt).
    """
    job_id = keys.job_id(provider, change.event_id)
    adapter = ctx.adapters.get(provider)
    if adapter is None:
        await ctx.ledger.dead(job_id, Attempt(attempt, time.time(), "dead", "provider_disabled", None,
                                              f"{provider} is not enabled: {ctx.disabled.get(provider, '?')}"))
        return Decision(state="dead")
    bound = {"event_id": change.event_id, "provider": provider, "attempt": attempt,
             "client": change.client.id, "email": mask_email(change.client.email)}
    token = f"{ctx.owner}:{job_id}:{attempt}:{uuid.uuid4().hex[:8]}"
    idem = keys.idempotency_key(change.event_id, provider, change.action)
    # One round trip (worker.steps): the 429 block, the circuit, the ledger's `running` (naming
    # this process as the owner, so a reaper re-enqueues the job if it dies) and the claim.
    start = await ctx.steps.start(
        block=ctx.limiter.blocked_for_call(provider) if ctx.limiter is not None else None,
        max_wait=ctx.limiter.max_wait if ctx.limiter is not None else 0.0,
        allow=ctx.circuit.allow_call(provider, token, call_timeout=adapter.config.timeout,
                                     fingerprint=credentials_fingerprint(adapter.config))
        if ctx.circuit is not None else None,
        running=ctx.ledger.transition_call(job_id, "running", fields=Ledger.running_fields(
            ctx.owner, ctx.parking.queue if ctx.parking else None)),
        begin=ctx.store.begin_call(idem, provider, change.client.id, fingerprint=change.fingerprint(), owner=token),
        open_job=open_job,
        first_token=ctx.limiter.first_token_call(provider) if ctx.limiter is not None else None,
    )
    if start.opened:
        ctx.ledger.opened()  # counts toward retention; a due trim runs beside the job, not in its way
    if ctx.limiter is not None:
        ctx.limiter.learn_block(provider, start.blocked_for)
    if start.status == "blocked":
        # Another job's 429 stops this one before it starts (no call, no attempt, no probe taken).
        wait = start.blocked_for
        delay = wait + ctx.rng.uniform(0, min(max(wait, 0.5), 5.0))
        return await _wait(job_id, change, provider, attempt, ctx, bound, delay=delay, reason=BucketEmpty.kind,
                           message=f"{provider} asked to wait {wait:.1f}s (429)")
    verdict = start.verdict
    if start.status == "refused":
        assert verdict is not None
        if verdict.held:
            delay = ctx.hold_recheck * ctx.rng.uniform(0.5, 1.5)
            why = (f"{provider} is paused by an operator" if verdict.state == "paused" else
                   f"{provider} refused the credentials: jobs wait until they change or an operator resumes")
            return await _wait(job_id, change, provider, attempt, ctx, bound, delay=delay, reason=verdict.state,
                               message=why)
        if verdict.state == "open":
            delay = verdict.wait + ctx.rng.uniform(0, ctx.circuit_recheck)
            why = f"circuit open at {provider} after repeated failures; next probe in {verdict.wait:.1f}s"
        else:
            delay = ctx.circuit_recheck * ctx.rng.uniform(0.5, 1.5)
            why = f"circuit half-open at {provider}: another job is probing it"
        return await _wait(job_id, change, provider, attempt, ctx, bound, delay=delay, reason="circuit_open",
                           message=why)
    if start.status == "finished":
        await _record(ctx, provider, token, "neutral")  # hands back a probe it may hold
        return await _already_finished(job_id, change, start.previous, attempt, ctx, bound)
    started = time.time()
    calls = [0]
    waited = ProviderTime()  # the time at the provider (worker.lease.provider_time)
    #: set once the job's finish script has recorded the outcome everywhere
    finished: list[Attempt] = []

    def ending(outcome: Outcome) -> tuple[Attempt, Call, Call | None]:
        """The ledger's and the circuit's part of the finish script for `outcome`."""
        took = waited.elapsed_ms()
        skipped = outcome.result == "skipped"
        done = Attempt(attempt, started, "skipped" if skipped else "succeeded",
                       duration_ms=took, message=outcome.reason or outcome.result,
                       provider_ms=waited.provider_ms())
        fields = (Ledger.skipped_fields(done, reason=outcome.reason or "skipped", provider_id=outcome.provider_id)
                  if skipped else
                  Ledger.succeeded_fields(done, result=outcome.result, provider_id=outcome.provider_id,
                                          unsupported=outcome.unsupported))
        ledger = ctx.ledger.transition_call(job_id, "skipped" if skipped else "succeeded", mode="force",
                                            attempt=done, fields=fields)
        circuit = (ctx.circuit.record_call(provider, token, "success" if calls[0] else "neutral")
                   if ctx.circuit is not None else None)
        return done, ledger, circuit

    async def finish(idem_key: str, provider_: str, client_id: str, *, owner: str, outcome: dict[str, Any],
                     **bookkeeping: Any) -> str:
        """`SyncStore.finish`, with the ledger and the circuit in the same script (worker.steps)."""
        done, ledger, circuit = ending(Outcome.from_json(outcome))
        answer, _state = await ctx.steps.finish(provider, ledger=ledger, circuit=circuit, store=ctx.store.finish_call(
            idem_key, provider_, client_id, owner=owner, outcome=outcome, **bookkeeping))
        if answer == "ok":
            finished.append(done)
        return answer

    counting, timing = lease_calls.set(calls), provider_time.set(waited)
    paid = prepaid_tokens.set({provider: 1} if start.prepaid else None)
    try:
        outcome = await apply_change(change, adapter, ctx.store, owner=token, lock_wait=ctx.lock_wait, rng=ctx.rng,
                                     first=start.begin, finish=finish)
    except BucketEmpty as exc:
        await _record(ctx, provider, token, "neutral")
        wait = exc.retry_after or 0.0
        # Jitter: jobs turned away together must not all come back for the same one slot.
        delay = wait + ctx.rng.uniform(0, min(max(wait, 0.5), 5.0))
        return await _wait(job_id, change, provider, attempt, ctx, bound, delay=delay, reason=exc.kind,
                           message=str(exc))
    except IdempotencyConflict:
        await _record(ctx, provider, token, "neutral")
        return await _conflict(job_id, change, attempt, ctx, bound)
    except NeedsAttention as exc:
        await _record(ctx, provider, token, "success" if calls[0] else "neutral")
        await ctx.ledger.needs_attention(
            job_id, Attempt(attempt, started, "needs_attention", exc.kind, None, mask_emails(str(exc))),
            candidates=exc.candidates,
        )
        _outcome(logging.WARNING, "needs attention", {**bound, "candidates": len(exc.candidates)})
        return Decision(state="needs_attention")
    except Busy as exc:
        # Another run holds this job or this client: not a failure, so no attempt is spent
        # (a burst of changes to one client must not push the last of them to dead).
        await _record(ctx, provider, token, "neutral")
        delay = min(exc.retry_after or 1.0, 5.0) + ctx.rng.uniform(0, 1.0)
        return await _wait(job_id, change, provider, attempt, ctx, bound, delay=delay, reason=exc.kind,
                           message=mask_emails(str(exc)))
    except AuthError as exc:
        if ctx.circuit is None:
            return await _failed(job_id, change, provider, attempt, started, waited, exc, ctx, bound, None)
        # Wrong credentials fail every job alike: hold them all (no attempt spent) instead of
        # letting each die, until the credentials change or an operator resumes.
        await _record(ctx, provider, token, "auth", fingerprint=credentials_fingerprint(adapter.config))
        return await _wait(job_id, change, provider, attempt, ctx, bound, reason="auth_failed",
                           delay=ctx.hold_recheck * ctx.rng.uniform(0.5, 1.5),
                           message=f"{provider} refused the credentials ({exc.status}): {exc}")
    except ClientSyncError as exc:
        circuit = await _record(ctx, provider, token, _circuit_outcome(exc, calls[0]))
        return await _failed(job_id, change, provider, attempt, started, waited, exc, ctx, bound, circuit)
    except Exception as exc:
        # A bug or Redis trouble must not lose the job: retry it, and it ends dead with the
        # message rather than vanishing with an acked Celery message.
        _outcome(logging.ERROR, "internal error", {**bound, "error": mask_emails(repr(exc))})
        log.debug("internal error traceback", exc_info=True)
        await _record(ctx, provider, token, "neutral")
        internal = InternalError(f"internal error: {exc!r}", provider=provider)
        return await _failed(job_id, change, provider, attempt, started, waited, internal, ctx, bound, None)
    finally:
        lease_calls.reset(counting)
        provider_time.reset(timing)
        prepaid_tokens.reset(paid)
    if finished:
        done = finished[0]
    else:  # a completed key answered (`replayed`): nothing to finish in the store
        done, ledger_call, record_call = ending(outcome)
        await ctx.steps.finish(provider, store=None, ledger=ledger_call, circuit=record_call)
    took = done.duration_ms
    _outcome(logging.INFO, "applied", {**bound, "result": outcome.result, "reason": outcome.reason,
                                       "replayed": outcome.replayed, "ms": took})
    return Decision(state="skipped" if outcome.result == "skipped" else "succeeded")


def _circuit_outcome(exc: ClientSyncError, calls: int) -> CircuitOutcome:
    """What one failed job tells the provider's circuit."""
    if calls == 0 or isinstance(exc, RateLimitedError | InternalError):
        return "neutral"  # never reached the provider, or it is up and only throttling
    if isinstance(exc, TransientError):
        return "failure"
    if isinstance(exc, ProviderError) and exc.status is not None:
        return "success"  # it answered (a 4xx): the provider is up
    return "neutral"


async def _record(ctx: JobContext, provider: str, token: str, outcome: CircuitOutcome, *,
                  fingerprint: str = "") -> CircuitState | None:
    if ctx.circuit is None:
        return None
    try:
        return await ctx.circuit.record(provider, token, outcome, fingerprint=fingerprint)
    except Exception:  # the job's own outcome matters more than the breaker's bookkeeping
        log.warning("circuit bookkeeping failed for %s", provider, exc_info=True)
        return None


async def _already_finished(job_id: str, change: ClientChange, previous: str, attempt: int, ctx: JobContext,
                            bound: dict[str, Any]) -> Decision:
    """A job that already ended ran again: a redelivered copy, or the event id reused for another change."""
    recorded = await ctx.ledger.get(job_id)
    if recorded is not None and recorded.change not in (None, change.model_dump(mode="json")):
        return await _conflict(job_id, change, attempt, ctx, bound)
    # A worker died after the work but before its ack: the effect is already there.
    _outcome(logging.INFO, "duplicate delivery", {**bound, "previous": previous})
    return Decision(state=previous)


async def _conflict(job_id: str, change: ClientChange, attempt: int, ctx: JobContext,
                    bound: dict[str, Any]) -> Decision:
    """Same idempotency key, different payload: rejected, not applied, and shown to the operator
    as its own dead letter; the job whose change was applied keeps its record."""
    message = (f"event {change.event_id} was already received for job {job_id} with a different payload; "
               "a new change needs a new event_id")
    await ctx.ledger.dead_letter(
        f"conflict:{job_id}:{change.fingerprint()[:12]}", raw=change.model_dump_json(),
        attempt=Attempt(attempt, time.time(), "dead", IdempotencyConflict.kind, None, message),
    )
    _outcome(logging.ERROR, "idempotency conflict", bound)
    return Decision(state="dead")


async def _failed(job_id: str, change: ClientChange, provider: str, attempt: int, started: float,
                  waited: ProviderTime, exc: ClientSyncError, ctx: JobContext, bound: dict[str, Any],
                  circuit: CircuitState | None) -> Decision:
    policy = ctx.policies[provider]
    status = exc.status if isinstance(exc, ProviderError) else None
    fields = exc.field_errors if isinstance(exc, ProviderError) else {}
    message = str(exc)
    took, at_provider = waited.elapsed_ms(), waited.provider_ms()
    if exc.retryable and attempt < policy.max_attempts:
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            retry_after = min(retry_after, ctx.retry_after_max)
        delay = retry_delay(attempt, base=policy.base, cap=policy.cap,
                            retry_after=retry_after, rng=ctx.rng, retry_after_max=ctx.retry_after_max)
        if isinstance(exc, RateLimitedError) and status == 429 and retry_after and ctx.limiter is not None:
            # Tell every worker: no call to this provider before its Retry-After is over.
            try:
                await ctx.limiter.block(provider, retry_after)
            except Exception:
                log.warning("could not share the 429 block for %s", provider, exc_info=True)
        if circuit is not None and circuit.state == "open" and circuit.wait > delay:
            # The circuit is open: there is no point coming back before it may be probed.
            delay = circuit.wait + ctx.rng.uniform(0, ctx.circuit_recheck)
        await ctx.ledger.retrying(job_id, Attempt(attempt, started, "retrying", exc.kind, status, message, fields,
                                                  next_attempt_at=time.time() + delay, duration_ms=took,
                                                  provider_ms=at_provider))
        _outcome(logging.WARNING, "retrying", {**bound, "error": exc.kind, "status": status, "in_s": round(delay, 2)})
        return await _park(job_id, change, provider, attempt + 1, delay, ctx)
    await ctx.ledger.dead(job_id, Attempt(attempt, started, "dead", exc.kind, status, message, fields,
                                          duration_ms=took, provider_ms=at_provider))
    _outcome(logging.ERROR, "dead", {**bound, "error": exc.kind, "status": status, "message": mask_emails(message)})
    return Decision(state="dead")


async def _wait(job_id: str, change: ClientChange, provider: str, attempt: int, ctx: JobContext,
                bound: dict[str, Any], *, delay: float, reason: str, message: str) -> Decision:
    """Park the job without spending an attempt (no call reached the provider)."""
    await ctx.ledger.waiting(job_id, next_attempt_at=time.time() + delay, reason=reason, message=message)
    _outcome(logging.INFO, "waiting", {**bound, "reason": reason, "in_s": round(delay, 2)})
    return await _park(job_id, change, provider, attempt, delay, ctx)


async def _park(job_id: str, change: ClientChange, provider: str, attempt: int, delay: float,
                ctx: JobContext) -> Decision:
    if ctx.parking is None:
        return Decision(retry_in=min(delay, ctx.countdown_max), state="retrying", attempt=attempt)
    try:
        due = await ctx.parking.park(job_id, change.model_dump(mode="json"), provider, attempt, delay)
    except Exception:
        # Losing the retry is the one unacceptable outcome: fall back to a (short) countdown.
        log.exception("parking %s failed; falling back to a Celery countdown", job_id)
        return Decision(retry_in=min(delay, ctx.countdown_max), state="retrying", attempt=attempt)
    return Decision(state="retrying", attempt=attempt, next_attempt_at=due)
