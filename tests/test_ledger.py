"""The ledger against a real Redis: indexes, shared counters, latency histogram, guarded
operator actions, and retention bounded by count and age with memory staying flat."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from tests.monitor_fixtures import make_change, make_job
from worker import keys
from worker.ledger import Attempt, Ledger


async def test_a_job_is_indexed_by_state_provider_client_and_time(r: aioredis.Redis) -> None:
    ledger = Ledger(r)
    job = await make_job(ledger, "qonto", "e1", "retrying", client_id="acme")
    assert await r.zscore(keys.jobs_in_state("retrying"), job)
    assert await r.zscore(keys.jobs_of_provider_in_state("qonto", "retrying"), job)
    assert await r.zscore(keys.jobs_of_client("acme"), job)
    assert await r.zscore(keys.JOBS_BY_TIME, job)
    assert await r.zscore(keys.JOBS_FINISHED, job) is None
    await ledger.running(job)
    await ledger.dead(job, Attempt(2, time.time(), "dead", "validation", 422, "bad"))
    assert await r.zscore(keys.jobs_in_state("retrying"), job) is None
    assert await r.zscore(keys.jobs_of_provider_in_state("qonto", "retrying"), job) is None
    assert await r.zscore(keys.jobs_of_provider_in_state("qonto", "dead"), job)
    assert await r.zscore(keys.JOBS_FINISHED, job)
    assert await ledger.counts() == {"queued": 0, "running": 0, "retrying": 0, "succeeded": 0, "skipped": 0,
                                     "dead": 1, "discarded": 0, "needs_attention": 0}


async def test_transitions_count_per_provider_once_and_time_receipt_to_applied(r: aioredis.Redis) -> None:
    ledger = Ledger(r)
    job = await make_job(ledger, "qonto", "e1", "retrying", received_ago=3.0)
    await ledger.running(job)
    await ledger.succeeded(job, Attempt(2, time.time(), "succeeded"), result="created", provider_id="9")
    # A redelivered duplicate run that finds the stored outcome does not count twice.
    await ledger.running(job)
    await ledger.succeeded(job, Attempt(3, time.time(), "succeeded"), result="created", provider_id="9")
    await ledger.enqueued(make_change("e1"), "qonto")  # a redelivered fan-out: not a new job
    await make_job(ledger, "lsp_expert", "e2", "dead")
    stats = await r.hgetall(keys.stats("qonto"))
    assert stats == {"enqueued": "1", "retried": "1", "applied": "1"}
    assert await r.hgetall(keys.stats("lsp_expert")) == {"enqueued": "1", "dead": "1"}
    latency = await r.hgetall(keys.latency("qonto"))
    assert latency["count"] == "1" and latency["5"] == "1"  # 3 s falls in the (2.5, 5] bucket
    assert 2.9 < float(latency["sum"]) < 4.0
    assert await r.smembers(keys.STATS_PROVIDERS) == {"qonto", "lsp_expert"}


async def test_replay_moves_only_allowed_states_and_pushes_in_the_same_script(r: aioredis.Redis) -> None:
    ledger = Ledger(r)
    dead = await make_job(ledger, "qonto", "e1", "dead")
    done = await make_job(ledger, "qonto", "e2", "succeeded")
    out = await ledger.replay("q", [(dead, "m1"), (done, "m2"), ("qonto:nope", "m3")], allowed=["dead"])
    assert out == ["ok", "succeeded", "missing"]
    assert await r.lrange("q", 0, -1) == ["m1"]
    job = await ledger.get(dead)
    assert job is not None and job.state == "queued" and job.fields["replays"] == "1"
    assert job.attempts[-1]["outcome"] == "replayed" and job.fields["attempts"] == "1"
    assert await ledger.replay("q", [(dead, "again")], allowed=["dead"]) == ["queued"]
    assert await r.llen("q") == 1
    assert (await r.hgetall(keys.stats("qonto")))["replayed"] == "1"


async def test_discard_only_takes_dead_jobs_and_keeps_the_history(r: aioredis.Redis) -> None:
    ledger = Ledger(r)
    dead = await make_job(ledger, "qonto", "e1", "dead")
    live = await make_job(ledger, "qonto", "e2", "retrying")
    assert await ledger.discard([dead, live]) == ["ok", "retrying"]
    job = await ledger.get(dead)
    assert job is not None and job.state == "discarded"
    assert [a["outcome"] for a in job.attempts] == ["dead", "discarded"]
    assert await r.zscore(keys.jobs_in_state("dead"), dead) is None
    # a final state: a late duplicate run cannot reopen it
    assert await ledger.running(dead) == "discarded"
    assert (await ledger.get(dead)).state == "discarded"  # type: ignore[union-attr]


async def test_the_count_bound_holds_at_every_transition_and_never_drops_live_jobs(r: aioredis.Redis) -> None:
    ledger = Ledger(r, max_jobs=5, trim_every=0)
    live = [await make_job(ledger, "qonto", f"live{i}", "retrying") for i in range(3)]
    done = []
    for i in range(12):
        done.append(await make_job(ledger, "qonto", f"done{i}", "succeeded", client_id=f"c{i}"))
        assert await r.zcard(keys.JOBS_FINISHED) <= 5
    assert await ledger.trim_all() == 0  # nothing left for the sweep
    remaining = set(await r.zrange(keys.JOBS_BY_TIME, 0, -1))
    assert remaining == set(live) | set(done[-5:])
    for gone in done[:7]:
        assert not await r.exists(keys.job(gone), keys.job_attempts(gone))
    # no index keeps a dropped id, and emptied client indexes disappear
    for key in (keys.jobs_in_state("succeeded"), keys.jobs_of_provider_in_state("qonto", "succeeded"),
                keys.JOBS_FINISHED):
        assert set(await r.zrange(key, 0, -1)) == set(done[-5:])
    assert not await r.exists(keys.jobs_of_client("c0"))


async def test_a_sweep_with_a_lower_bound_drops_the_oldest_finished_jobs(r: aioredis.Redis) -> None:
    writer = Ledger(r, max_jobs=1000, trim_every=0)
    done = [await make_job(writer, "qonto", f"done{i}", "dead") for i in range(8)]
    live = await make_job(writer, "qonto", "live", "queued")
    assert await Ledger(r, max_jobs=3).trim_all() == 5
    assert set(await r.zrange(keys.JOBS_BY_TIME, 0, -1)) == {live, *done[-3:]}


async def test_trim_drops_finished_jobs_older_than_the_max_age(r: aioredis.Redis) -> None:
    ledger = Ledger(r, max_jobs=1000, max_age_seconds=0.2, trim_every=0)
    old = await make_job(ledger, "qonto", "old", "dead")
    live = await make_job(ledger, "qonto", "live", "queued")
    time.sleep(0.3)
    fresh = await make_job(ledger, "qonto", "fresh", "succeeded")
    assert await ledger.trim_all() == 1
    assert set(await r.zrange(keys.JOBS_BY_TIME, 0, -1)) == {live, fresh}
    assert not await r.exists(keys.job(old))


async def test_retention_keeps_redis_memory_flat_over_3000_jobs(r: aioredis.Redis) -> None:
    """3,000 jobs with retention 300, trimming every 100 new jobs as a worker does."""
    ledger = Ledger(r, max_jobs=300, trim_every=100)

    async def run(start: int, n: int) -> None:
        for i in range(start, start + n):
            await make_job(ledger, "qonto" if i % 2 else "lsp_expert", f"e{i}", "succeeded" if i % 7 else "dead",
                           client_id=f"client{i}")

    await run(0, 1000)
    await ledger.trim_all()
    keys_after_1000 = await r.dbsize()
    memory_after_1000 = (await r.info("memory"))["used_memory"]
    await run(1000, 2000)
    assert await r.zcard(keys.JOBS_BY_TIME) <= 300 + 100  # at most one trim interval over
    await ledger.trim_all()
    assert await r.zcard(keys.JOBS_BY_TIME) == 300
    assert await r.dbsize() == keys_after_1000  # the same keys: job + attempts + client index per job
    memory_after_3000 = (await r.info("memory"))["used_memory"]
    # 2,000 more jobs kept would be ~3 MB; allow allocator noise only.
    assert memory_after_3000 - memory_after_1000 < 256 * 1024, (memory_after_1000, memory_after_3000)
    stats = await r.hgetall(keys.stats("qonto"))
    assert int(stats["enqueued"]) == 1500  # counters are not trimmed


async def test_a_parked_wait_counts_as_parked_not_as_a_retried_attempt(r: aioredis.Redis) -> None:
    ledger = Ledger(r)
    job = await make_job(ledger, "qonto", "e1", "running")
    await ledger.waiting(job, next_attempt_at=time.time() + 5, reason="circuit_open", message="circuit open")
    record = await ledger.get(job)
    assert record is not None and record.state == "retrying" and record.attempts == []
    assert await r.hgetall(keys.stats("qonto")) == {"enqueued": "1", "parked": "1"}
