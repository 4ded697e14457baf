"""`run_job` decisions without Celery: a real Redis, the Invoice Ninja sandbox over HTTP.

What the retry engine decides for one run of a job: park and how long, with which attempt
number, what the ledger shows, and what the shared circuit and bucket learn.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.helpers import change, job_context
from worker import keys, lease
from worker.errors import LeaseLost
from worker.jobs import JobContext, before_call_hook, run_job
from worker.lease import LeaseGuard
from worker.models import ClientChange
from worker.providers import adapter_class
from worker.ratelimit import Limit, RateLimiter
from worker.sandbox.server import RunningSandbox, start_sandbox

IN = "invoice_ninja"


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    sb = await start_sandbox(names=[IN])
    yield sb
    await sb.stop()


@pytest.fixture
def redis(r: aioredis.Redis) -> aioredis.Redis:
    """The flushed Redis's client (conftest's `r`), by the name these tests use."""
    return r


@pytest.fixture
async def ctx(sandbox: RunningSandbox, redis: aioredis.Redis,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[JobContext]:
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    async with aiohttp.ClientSession() as session:
        adapter = adapter_class(IN)(adapter_class(IN).settings_class(), session)
        limiter = RateLimiter(redis, {IN: Limit(None, 1.0)}, max_wait=0.5)
        adapter.before_call = before_call_hook(limiter)
        yield job_context(redis, {IN: adapter}, limiter, lease_seconds=5, circuit_threshold=2, circuit_recheck=0.5)


def sim(sandbox: RunningSandbox) -> Any:
    return sandbox.simulators[IN]


async def start(ctx: JobContext, n: int = 1) -> ClientChange:
    c = ClientChange.model_validate(change(f"e-{n}-{time.time_ns()}", f"c-{n}-{time.time_ns()}"))
    await ctx.ledger.enqueued(c, IN)
    return c


def assert_shown_due(shown: float, due: float, took: float) -> None:
    """The ledger shows the parked retry's due time: it is written (now + the same delay) just
    before the retry is parked (Redis's now + that delay), so it may be earlier by at most the
    time the run took, never later; 2 ms is the parking script's rounding to milliseconds."""
    assert -0.002 <= due - shown <= took + 0.002, (shown, due, took)


async def parked_attempt(redis: aioredis.Redis, job_id: str) -> tuple[int, float]:
    """The attempt number a job's parked message carries, and its due time (unix seconds)."""
    message = await redis.hget(keys.DELAYED_JOBS, job_id)
    assert message, f"{job_id} is not parked"
    _args, kwargs, _ = json.loads(base64.b64decode(json.loads(message)["body"]))
    return kwargs["attempt"], float(await redis.zscore(keys.DELAYED, message) or 0) / 1000


async def test_a_transient_failure_parks_the_next_attempt(ctx: JobContext, sandbox: RunningSandbox,
                                                          redis: aioredis.Redis) -> None:
    sim(sandbox).faults.fail_next = 1
    c = await start(ctx)
    before = time.time()
    decision = await run_job(c, IN, 1, ctx)
    took = time.time() - before
    assert decision.state == "retrying" and decision.retry_in is None and decision.attempt == 2
    attempt, due = await parked_attempt(redis, keys.job_id(IN, c.event_id))
    assert attempt == 2 and before <= due <= time.time() + 0.5  # within the first backoff ceiling
    job = await ctx.ledger.get(keys.job_id(IN, c.event_id))
    assert job is not None and job.state == "retrying" and job.fields["attempts"] == "1"
    assert_shown_due(float(job.fields["next_attempt_at"]), due, took)
    assert job.fields["last_error_class"] == "unavailable"


async def test_a_permanent_error_is_dead_at_once(ctx: JobContext, sandbox: RunningSandbox,
                                                 redis: aioredis.Redis) -> None:
    sim(sandbox).faults.fail_next, sim(sandbox).faults.error_status = 1, 422
    c = await start(ctx)
    decision = await run_job(c, IN, 1, ctx)
    assert decision.state == "dead"
    assert await redis.zcard(keys.DELAYED) == 0
    # the provider answered: that is a success for its circuit
    assert (await ctx.circuit.allow(IN, "x")).state == "closed"  # type: ignore[union-attr]


async def test_the_last_attempt_is_dead_with_the_providers_own_policy(ctx: JobContext, sandbox: RunningSandbox,
                                                                      redis: aioredis.Redis) -> None:
    sim(sandbox).faults.fail_next = 1
    c = await start(ctx)
    assert (await run_job(c, IN, 3, ctx)).state == "dead"  # max_attempts=3
    assert await redis.zcard(keys.DELAYED) == 0


async def test_an_open_circuit_parks_the_job_without_a_call_or_an_attempt(
    ctx: JobContext, sandbox: RunningSandbox, redis: aioredis.Redis
) -> None:
    assert ctx.circuit is not None
    for i in range(2):
        await ctx.circuit.record(IN, f"j{i}", "failure")
    c = await start(ctx)
    before = time.time()
    decision = await run_job(c, IN, 4, ctx)
    took = time.time() - before
    assert decision.state == "retrying" and decision.attempt == 4  # the same attempt number
    assert sim(sandbox).calls == []
    attempt, due = await parked_attempt(redis, keys.job_id(IN, c.event_id))
    assert attempt == 4 and 29 < due - time.time() <= 30.6  # at the probe time (plus a little spread)
    job = await ctx.ledger.get(keys.job_id(IN, c.event_id))
    assert job is not None and job.state == "retrying" and job.attempts == []
    assert job.fields["last_error_class"] == "circuit_open"
    assert_shown_due(float(job.fields["next_attempt_at"]), due, took)


async def test_failures_open_the_circuit_and_the_failing_job_waits_for_the_probe(
    ctx: JobContext, sandbox: RunningSandbox, redis: aioredis.Redis
) -> None:
    sim(sandbox).faults.fail_next = 2
    first, second = await start(ctx, 1), await start(ctx, 2)
    await run_job(first, IN, 1, ctx)
    await run_job(second, IN, 1, ctx)  # the second consecutive failure opens it
    assert (await redis.hget(keys.circuit(IN), "state")) == "open"
    _attempt, due = await parked_attempt(redis, keys.job_id(IN, second.event_id))
    assert due - time.time() > 29  # not its 0.5 s backoff: nobody calls before the probe


async def test_the_probe_closes_the_circuit_when_the_provider_is_back(
    ctx: JobContext, sandbox: RunningSandbox, redis: aioredis.Redis
) -> None:
    assert ctx.circuit is not None
    for i in range(2):
        await ctx.circuit.record(IN, f"j{i}", "failure", now_ms=int(time.time() * 1000) - 31_000)
    c = await start(ctx)
    assert (await run_job(c, IN, 2, ctx)).state == "succeeded"
    assert (await redis.hget(keys.circuit(IN), "state")) == "closed"


async def test_a_429_blocks_the_provider_for_every_job_until_its_retry_after(
    ctx: JobContext, sandbox: RunningSandbox, redis: aioredis.Redis
) -> None:
    sim(sandbox).faults.throttle_next, sim(sandbox).faults.retry_after = 1, 3
    first, other = await start(ctx, 1), await start(ctx, 2)
    assert (await run_job(first, IN, 1, ctx)).attempt == 2  # a real call: an attempt spent
    _attempt, due = await parked_attempt(redis, keys.job_id(IN, first.event_id))
    assert due - time.time() > 2.9
    # Another job meets the block before any call: parked, no call, no attempt spent.
    decision = await run_job(other, IN, 1, ctx)
    assert decision.state == "retrying" and decision.attempt == 1
    assert len(sim(sandbox).calls) == 1
    job = await ctx.ledger.get(keys.job_id(IN, other.event_id))
    assert job is not None and job.fields["last_error_class"] == "rate_limited" and job.attempts == []
    assert (await redis.hget(keys.circuit(IN), "failures")) in (None, "0")  # throttling is not an outage


async def test_without_parking_a_retry_falls_back_to_a_short_countdown(ctx: JobContext,
                                                                       sandbox: RunningSandbox) -> None:
    ctx.parking, ctx.countdown_max = None, 0.25
    sim(sandbox).faults.throttle_next, sim(sandbox).faults.retry_after = 1, 30
    decision = await run_job(await start(ctx), IN, 1, ctx)
    assert decision.retry_in == 0.25 and decision.attempt == 2


async def test_the_fallback_countdown_carries_the_mark_so_the_intake_gate_runs_it(
    ctx: JobContext, sandbox: RunningSandbox, redis: aioredis.Redis, fresh_redis_url: str
) -> None:
    """Parking failed (Redis away a moment), then the Celery countdown was published: the message
    must pass the intake gate like a parked retry. Unmarked, the gate dead-letters it as forged and
    the job is stranded `retrying` with nothing left to run it (seen in a chaos run)."""
    from tasks.app import app
    from tasks.intake import Gate
    from tasks.sync import _fallback_retry, apply_change_task

    ctx.parking, ctx.countdown_max = None, 0.25
    sim(sandbox).faults.throttle_next, sim(sandbox).faults.retry_after = 1, 30
    c = await start(ctx)
    decision = await run_job(c, IN, 1, ctx)
    assert decision.retry_in == 0.25 and decision.attempt == 2
    queue = f"fallback-{time.time_ns()}"
    gate = Gate(fresh_redis_url, max_jobs=1000)
    with app.connection_for_write(fresh_redis_url) as conn:
        publish = functools.partial(apply_change_task.apply_async, connection=conn, queue=queue)
        await _fallback_retry(SimpleNamespace(context=ctx), c.model_dump(mode="json"), IN, decision,  # type: ignore[arg-type]
                              publish=publish)
        marked = await redis.rpop(queue)
        assert marked is not None
        admitted = gate.admit(marked, queue)
        assert admitted is not None, await redis.hgetall(keys.DEAD_LETTERS)
        assert admitted["headers"]["task"] == "clientsync.apply_change" and admitted["headers"]["eta"]
        assert admitted["headers"]["clientsync_job"] == keys.job_id(IN, c.event_id)
        # The same publish without the mark (what the fallback sent before): refused as forged.
        publish(args=(c.model_dump(mode="json"), IN), kwargs={"attempt": 2}, countdown=0.25)
        unmarked = await redis.rpop(queue)
        assert unmarked is not None and gate.admit(unmarked, queue) is None
    assert await redis.hget(keys.DEAD_LETTERS, "forged") == "1"


async def test_a_fallback_that_cannot_read_the_mark_key_requeues_the_message_and_publishes_nothing(
    ctx: JobContext, sandbox: RunningSandbox
) -> None:
    """Redis still away when the countdown is due to go out: the message is requeued (it runs
    again later), never acked with its retry unsent, and nothing unmarked is published."""
    from celery.exceptions import Reject

    from tasks.sync import _fallback_retry
    from worker.redis_server import free_port

    ctx.parking, ctx.countdown_max = None, 0.25
    sim(sandbox).faults.throttle_next, sim(sandbox).faults.retry_after = 1, 30
    c = await start(ctx)
    decision = await run_job(c, IN, 1, ctx)
    assert decision.retry_in == 0.25
    published: list[Any] = []
    away = aioredis.Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens there
    try:
        runtime = SimpleNamespace(context=SimpleNamespace(store=SimpleNamespace(redis=away)))
        with pytest.raises(Reject) as caught:
            await _fallback_retry(runtime, c.model_dump(mode="json"), IN, decision,  # type: ignore[arg-type]
                                  publish=lambda **kw: published.append(kw))
    finally:
        await away.aclose()
    assert caught.value.requeue is True and published == []


async def test_a_replayed_job_meeting_an_open_circuit_parks_with_its_attempt_one(
    ctx: JobContext, sandbox: RunningSandbox, redis: aioredis.Redis
) -> None:
    sim(sandbox).faults.fail_next, sim(sandbox).faults.error_status = 1, 422
    c = await start(ctx)
    job_id = keys.job_id(IN, c.event_id)
    assert (await run_job(c, IN, 1, ctx)).state == "dead"
    await ctx.ledger.requeued(job_id, note="replayed")  # what the monitor's replay records
    assert ctx.circuit is not None
    for i in range(2):
        await ctx.circuit.record(IN, f"j{i}", "failure")
    decision = await run_job(c, IN, 1, ctx)  # the replayed message: attempt 1
    assert decision.state == "retrying" and decision.attempt == 1
    job = await ctx.ledger.get(job_id)
    assert job is not None and job.state == "retrying" and job.fields["attempts"] == "1"
    assert (await parked_attempt(redis, job_id))[0] == 1


async def test_two_copies_of_one_job_in_one_process_create_once(ctx: JobContext, sandbox: RunningSandbox) -> None:
    # A duplicate delivery landing in the same worker process while the first copy is still
    # calling the provider: the second must wait on the first's claim, never create too.
    sim(sandbox).faults.latency_ms = 300
    c = await start(ctx)
    first, second = await asyncio.gather(run_job(c, IN, 1, ctx), run_job(c, IN, 1, ctx))
    assert sorted([first.state, second.state]) in (["retrying", "succeeded"], ["succeeded", "succeeded"])
    created = [r for r in sim(sandbox).clients.values() if r["name"] == c.client.name]
    assert len(created) == 1


async def test_waiting_on_a_busy_client_spends_no_attempt(ctx: JobContext, sandbox: RunningSandbox,
                                                          redis: aioredis.Redis) -> None:
    c = await start(ctx)
    await redis.set(keys.client_lock(IN, c.client.id), "another-run", px=10_000)
    decision = await run_job(c, IN, 3, ctx)  # the last attempt of max_attempts=3
    assert decision.state == "retrying" and decision.attempt == 3
    record = await redis.hgetall(keys.job(keys.job_id(IN, c.event_id)))
    assert record["state"] == "retrying" and record["last_error_class"] == "busy"


async def test_a_job_that_keeps_losing_its_lease_spends_attempts_and_ends_dead(
        ctx: JobContext, sandbox: RunningSandbox, redis: aioredis.Redis) -> None:
    """A lost lease is not `Busy`: it spends an attempt, so the job cannot re-run forever."""
    sim(sandbox).faults.latency_ms = 800  # the first-create lookups outlast a renewal tick (lease 5 s / 3)
    c = await start(ctx)
    job = asyncio.create_task(run_job(c, IN, 3, ctx))  # the provider's last attempt (max_attempts=3)
    lock = keys.client_lock(IN, c.client.id)
    while await redis.get(lock) is None:
        await asyncio.sleep(0.01)
    await redis.set(lock, "another-run")  # the lease went to another run meanwhile
    decision = await job
    assert decision.state == "dead"
    record = await ctx.ledger.get(keys.job_id(IN, c.event_id))
    assert record is not None and record.fields["last_error_class"] == "lease_lost"
    assert not [x for x in sim(sandbox).calls if x.method == "POST"], "no create after the lease was lost"


async def test_a_circuit_that_cannot_be_read_lets_the_job_through(ctx: JobContext, redis: aioredis.Redis) -> None:
    # The circuit is read and recorded inside the job's start and finish scripts: an error there
    # fails open (as a breaker of its own would), it never strands the job or fails its finish.
    await redis.set(keys.circuit(IN), "not a hash")
    c = await start(ctx)
    assert (await run_job(c, IN, 1, ctx)).state == "succeeded"
    job = await ctx.ledger.get(keys.job_id(IN, c.event_id))
    assert job is not None and job.state == "succeeded"


async def test_a_create_our_rate_limit_stopped_before_its_post_leaves_no_intent_to_wait_out(
    ctx: JobContext, sandbox: RunningSandbox
) -> None:
    """The lookups went out, then the create's POST found no slot (another job of this process
    met a 429 meanwhile): nothing was sent, so the intent written before the POST is answered
    and the re-run creates at once, instead of waiting out the call timeout and settle time for a
    create that never left (measured: Qonto at its limit spent 40 of 80 s in such waits)."""
    assert ctx.limiter is not None
    limiter, hook, calls = ctx.limiter, ctx.adapters[IN].before_call, [0]
    assert hook is not None

    async def block_before_the_post(provider: str) -> None:
        calls[0] += 1
        if calls[0] == 4:  # Invoice Ninja's create: three lookups, then the POST
            limiter.learn_block(provider, 30.0)
        await hook(provider)

    ctx.adapters[IN].before_call = block_before_the_post
    c = await start(ctx)
    decision = await run_job(c, IN, 1, ctx)
    assert (decision.state, decision.attempt) == ("retrying", 1), "parked, no attempt spent"
    assert [call.method for call in sim(sandbox).calls] == ["GET", "GET", "GET"], "the POST never left"
    limiter._known_blocks.clear()  # the block is over
    assert (await run_job(c, IN, 1, ctx)).state == "succeeded", "no wait for a create that was never sent"
    assert [call.method for call in sim(sandbox).calls].count("POST") == 1 and len(sim(sandbox).clients) == 1


async def test_a_call_whose_lease_ran_out_while_it_waited_for_a_slot_is_not_sent(
    ctx: JobContext, sandbox: RunningSandbox
) -> None:
    """`ProviderAdapter.request` checks the lease again after the rate-limit wait: a slot wait
    (up to CLIENTSYNC_RATE_WAIT_SECONDS) may outlast the lease, and another worker may hold the
    client by then."""
    guard = LeaseGuard("client c-1 at invoice_ninja", valid_until=time.monotonic() + 60)

    async def slot_after_the_lease(provider: str) -> None:
        guard.valid_until = time.monotonic() - 1

    adapter = ctx.adapters[IN]
    adapter.before_call = slot_after_the_lease
    token = lease.current.set(guard)
    try:
        with pytest.raises(LeaseLost):
            await adapter.request("POST", "/api/v1/clients", json_body={"name": "Acme"})
    finally:
        lease.current.reset(token)
    assert sim(sandbox).calls == [], "the POST never left"


async def test_each_attempt_records_its_time_at_the_provider_within_its_duration(
        ctx: JobContext, sandbox: RunningSandbox) -> None:
    # The sandbox holds every call 200 ms before answering. The first attempt's first call (the
    # stamp lookup) fails (503): at least 200 ms at the provider. The second attempt looks up its
    # stamp, then its email and name together, then creates: at least 3 x 200 ms, though it made 4
    # or more calls, because calls out at the same time count once. No attempt's provider time exceeds
    # the time it took.
    sim(sandbox).faults.latency_ms = 200
    sim(sandbox).faults.fail_next = 1
    c = await start(ctx)
    assert (await run_job(c, IN, 1, ctx)).state == "retrying"
    first_calls = len(sim(sandbox).calls)
    assert (await run_job(c, IN, 2, ctx)).state == "succeeded"
    second_calls = len(sim(sandbox).calls) - first_calls
    assert first_calls == 1 and second_calls >= 4
    job = await ctx.ledger.get(keys.job_id(IN, c.event_id))
    assert job is not None
    attempts = [a for a in job.attempts if a.get("number")]
    assert [a["outcome"] for a in attempts] == ["retrying", "succeeded"]
    for a, least in zip(attempts, (200, 600), strict=True):
        assert least <= a["provider_ms"] <= a["duration_ms"], a
