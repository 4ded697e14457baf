"""Redis round trips per job on the success path (issue 10), counted by the server itself.

A redis-server of this module's own (nobody else's commands in its counters), the five sandbox
providers over HTTP on loopback, a `JobContext` built as the worker runtime builds it (limits from
`limit_for`, the adapters' `before_call` hook), and the task's own steps: `fan_out`, then each
provider's first attempt. Round trips = requests Redis read (`INFO stats` `total_reads_processed`,
as the bench counts them), less the `INFO` that reads the count.

Per job: the start script and the finish script (`worker.steps`); a create also records its
intent (`SyncStore.mark_intent`) before its call; a provider with a published rate limit (Qonto)
takes a shared token per call, the first with the start script (when one is free at once). The
fan-out costs none: each job is opened by its first attempt's start script
(`worker.jobs.run_first_attempts`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.helpers import change, job_context
from worker import keys
from worker.jobs import JobContext, before_call_hook, fan_out, run_first_attempts, run_job
from worker.models import ClientChange
from worker.providers import adapter_class, load_configs
from worker.ratelimit import Limit, RateLimiter, limit_for
from worker.redis_server import EmbeddedRedis
from worker.sandbox.server import RunningSandbox, start_sandbox

PROVIDERS = ["grow_crm", "invoice_ninja", "lsp_expert", "qonto", "request_finance"]


@pytest.fixture(scope="module")
def own_redis_url() -> Iterator[str]:
    """A redis-server nobody else talks to: its counters are this module's alone."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    sb = await start_sandbox(names=PROVIDERS)
    yield sb
    await sb.stop()


@pytest.fixture
async def redis(own_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(own_redis_url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def ctx(sandbox: RunningSandbox, redis: aioredis.Redis,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[JobContext]:
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    configs = {name: config for name, config in load_configs().items() if name in PROVIDERS}
    async with aiohttp.ClientSession() as session:
        limiter = RateLimiter(redis, {n: limit_for(n, c) for n, c in configs.items()}, max_wait=5)
        adapters = {}
        for name, config in configs.items():
            adapters[name] = adapter_class(name)(config, session)
            adapters[name].before_call = before_call_hook(limiter)
        yield job_context(redis, adapters, limiter, lease_seconds=30, circuit_threshold=5)


async def reads(redis: aioredis.Redis) -> int:
    """Requests Redis has read so far (this `INFO` is one of them)."""
    return int((await redis.info("stats"))["total_reads_processed"])


def a_change(client_id: str, n: int) -> ClientChange:
    # Grow CRM needs a person's names for the account owner.
    return ClientChange.model_validate(change(f"e-{client_id}-{n}-{time.time_ns()}", client_id,
                                              name=f"Client {client_id} v{n}",
                                              contacts=[{"first_name": "Jane", "last_name": f"Owner {n}"}]))


async def one_change(ctx: JobContext, redis: aioredis.Redis, sandbox: RunningSandbox,
                     c: ClientChange) -> tuple[int, dict[str, tuple[int, int]]]:
    """The fan-out's round trips, and each provider's job's (round trips, provider calls), the
    task's steps one job at a time (`sync_client_body` runs the same first attempts together)."""
    received = time.time()
    before = await reads(redis)
    found, providers = await fan_out(c.model_dump(mode="json"), ctx, task_id="t", received_at=received)
    fan = await reads(redis) - before - 1
    assert found is not None and providers == PROVIDERS
    per_job: dict[str, tuple[int, int]] = {}
    for provider in providers:
        calls = len(sandbox.simulators[provider].calls)
        before = await reads(redis)
        decision = await run_job(c, provider, 1, ctx,
                                 open_job=ctx.ledger.open_call(c, provider, received_at=received))
        used = await reads(redis) - before - 1
        assert decision.state == "succeeded", (provider, decision)
        per_job[provider] = (used, len(sandbox.simulators[provider].calls) - calls)
    return fan, per_job


async def test_a_job_costs_two_round_trips_to_update_and_three_to_create_plus_a_token_per_limited_call(
    ctx: JobContext, redis: aioredis.Redis, sandbox: RunningSandbox
) -> None:
    assert ctx.limiter is not None
    limited = {p for p in PROVIDERS if ctx.limiter.limits[p].calls}
    assert limited == {"qonto"}  # Qonto publishes 1,000 calls per 10 s; the others are unlimited here
    # Warm up: Redis loads each script once per process (EVALSHA, NOSCRIPT, SCRIPT LOAD), and each
    # provider's epoch is read once per process.
    await one_change(ctx, redis, sandbox, a_change("warm", 1))

    fan, created = await one_change(ctx, redis, sandbox, a_change("c1", 1))
    assert fan == 0  # each job is opened by its start script
    for provider, (used, calls) in created.items():
        # start, intent, finish; plus one shared token per call after the first where a limit is
        # configured (the first rides in the start script)
        assert used == 3 + (calls - 1 if provider in limited else 0), (provider, used, calls)

    fan, updated = await one_change(ctx, redis, sandbox, a_change("c1", 2))
    assert fan == 0
    for provider, (used, calls) in updated.items():
        assert used == 2 + (calls - 1 if provider in limited else 0), (provider, used, calls)

    unlimited = [p for p in PROVIDERS if p not in limited]
    assert all(created[p][0] == 3 for p in unlimited) and all(updated[p][0] == 2 for p in unlimited)
    per_job_create = sum(used for used, _ in created.values()) / len(PROVIDERS)
    per_job_update = sum(used for used, _ in updated.values()) / len(PROVIDERS)
    # With Qonto's tokens (3 calls to create: two lookups and the POST; 1 to update).
    assert per_job_create == (5 * 3 + created["qonto"][1] - 1) / 5 <= 3.4
    assert per_job_update == (5 * 2 + updated["qonto"][1] - 1) / 5 <= 2.0


async def test_a_job_opened_by_its_first_attempt_is_the_job_the_fan_out_opened(
    ctx: JobContext, redis: aioredis.Redis, sandbox: RunningSandbox
) -> None:
    """Opening the jobs in their start scripts (`run_first_attempts`) records what opening them
    in the fan-out's own round trip did: the same fields, counted once as enqueued; a redelivered
    change finds its jobs as they were; a job stopped by a 429 block is still opened (queued,
    then parked), never lost."""
    assert ctx.limiter is not None
    received = time.time() - 5

    async def record(c: ClientChange, provider: str) -> dict[str, str]:
        fields = await redis.hgetall(keys.job(keys.job_id(provider, c.event_id)))
        return {k: v for k, v in fields.items() if k not in ("created_at", "updated_at", "started_at")}

    async def enqueued() -> dict[str, int]:
        return {p: int(await redis.hget(keys.stats(p), "enqueued") or 0) for p in PROVIDERS}

    # The jobs opened all at once in their own round trip, then the first attempts run (the path
    # before the start scripts opened them).
    old = a_change("o1", 1)
    await ctx.ledger.enqueued_many(old, PROVIDERS, received_at=received)
    for provider in PROVIDERS:
        assert (await run_job(old, provider, 1, ctx)).state == "succeeded"
    # Each first attempt opens its own job (and only a job it opened counts toward retention).
    before, counted = await enqueued(), ctx.ledger._created
    new = a_change("n1", 1)
    _, providers = await fan_out(new.model_dump(mode="json"), ctx, task_id="t", received_at=received)
    assert {p: d.state for p, d in (await run_first_attempts(new, providers, ctx, received_at=received)).items()} \
        == dict.fromkeys(PROVIDERS, "succeeded")
    assert {p: n - before[p] for p, n in (await enqueued()).items()} == dict.fromkeys(PROVIDERS, 1)
    assert ctx.ledger._created == counted + len(PROVIDERS)
    for provider in PROVIDERS:
        was, now = await record(old, provider), await record(new, provider)
        assert set(was) == set(now), provider
        # (Lua writes a number with 14 significant digits: the same text either way)
        assert now["received_at"] == was["received_at"] and float(now["received_at"]) == pytest.approx(received)
        assert now["state"] == "succeeded"
        assert now["provider"] == provider and now["client_id"] == new.client.id
        assert json.loads(now["change"]) == new.model_dump(mode="json")

    # Delivered again: nothing reopened, nothing counted twice.
    kept = {p: await redis.hgetall(keys.job(keys.job_id(p, new.event_id))) for p in PROVIDERS}
    again = await run_first_attempts(new, PROVIDERS, ctx, received_at=time.time())
    assert {p: d.state for p, d in again.items()} == dict.fromkeys(PROVIDERS, "succeeded")
    assert {p: n - before[p] for p, n in (await enqueued()).items()} == dict.fromkeys(PROVIDERS, 1)
    assert ctx.ledger._created == counted + len(PROVIDERS)  # nothing opened, nothing counted
    for provider in PROVIDERS:
        assert await redis.hgetall(keys.job(keys.job_id(provider, new.event_id))) == kept[provider]

    # A 429 block stops the start script before `running`: the job is opened all the same.
    await ctx.limiter.block("qonto", 600)
    blocked = a_change("b1", 1)
    decisions = await run_first_attempts(blocked, ["qonto"], ctx, received_at=received)
    assert decisions["qonto"].state == "retrying"
    job = await redis.hgetall(keys.job(keys.job_id("qonto", blocked.event_id)))
    assert job["state"] == "retrying" and float(job["received_at"]) == pytest.approx(received)
    assert job["provider"] == "qonto"
    assert job["last_error_class"] == "rate_limited"


async def test_a_trim_that_falls_due_on_opening_runs_beside_the_jobs(
    ctx: JobContext, redis: aioredis.Redis, sandbox: RunningSandbox
) -> None:
    """The job that opens is holding its claim and its client's lock: the retention trim its
    opening makes due runs as a task of its own, and does trim."""
    ctx.ledger.trim_every, ctx.ledger.max_jobs = len(PROVIDERS), 3
    first = a_change("t1", 1)
    await run_first_attempts(first, PROVIDERS, ctx, received_at=time.time())
    trimming = ctx.ledger._trimming
    assert trimming is not None  # 5 jobs opened: one trim due
    await trimming
    assert await redis.zcard(keys.JOBS_FINISHED) == 3  # 5 finished, kept to max_jobs


async def test_the_first_token_taken_with_the_start_is_counted_once(
    ctx: JobContext, redis: aioredis.Redis, sandbox: RunningSandbox
) -> None:
    """The start script takes a job's first token from the shared bucket; the job's first call
    spends it instead of asking again: the bucket counts each call exactly once."""
    assert ctx.limiter is not None
    ctx.limiter.limits["qonto"] = Limit(calls=100, period=3600)  # burst 10, ~0.025 tokens/s back
    bucket = keys.rate_bucket("qonto")

    async def tokens() -> float:
        return float(await redis.hget(bucket, "tokens") or 10)

    for n in range(2):  # a create (its lookups and the POST), then an update
        c = a_change("tok", n + 1)
        before, calls = await tokens(), len(sandbox.simulators["qonto"].calls)
        assert (await run_first_attempts(c, ["qonto"], ctx, received_at=time.time()))["qonto"].state == "succeeded"
        made = len(sandbox.simulators["qonto"].calls) - calls
        assert made >= 1 and before - await tokens() == pytest.approx(made, abs=0.05), (n, made)
