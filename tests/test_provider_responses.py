"""`clientsync_provider_responses_total{provider,status}`: every answer a provider gave, counted by
every worker process (real Celery workers, real sandbox over HTTP, real Redis) and shown in /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import running_stack, uid
from tests.helpers import change, post_webhook, sandbox_calls, set_faults, wait_jobs, workers_ready
from worker import keys
from worker.launcher import Stack
from worker.redis_server import free_port
from worker.responses import ResponseCounter

PROVIDER = "lsp_expert"
LINE = re.compile(r'^clientsync_provider_responses_total\{provider="(?P<p>[^"]+)",status="(?P<s>[^"]+)"\} '
                  r'(?P<n>[0-9.e+]+)$', re.M)


@pytest.fixture(scope="module")
def stack(redis_server_url: str) -> Iterator[Stack]:
    with running_stack(redis_server_url, providers=[PROVIDER], workers=2, concurrency=2) as s:
        yield s


async def _metrics(http: aiohttp.ClientSession, stack: Stack) -> Counter[str]:
    async with http.get(f"{stack.receiver_url}/metrics") as resp:
        text = await resp.text()
    return Counter({m["s"]: int(float(m["n"])) for m in LINE.finditer(text) if m["p"] == PROVIDER})


async def test_every_provider_answer_from_every_worker_is_counted_by_status_in_metrics(stack: Stack) -> None:
    sandbox = f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"
    secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
    r = aioredis.from_url(stack.redis_url)
    try:
        await workers_ready(r, 2)
    finally:
        await r.aclose()
    async with aiohttp.ClientSession() as http:
        # slow answers and more jobs at once than one worker may hold (concurrency 2, prefetch 1):
        # both worker processes take jobs
        await set_faults(http, sandbox, latency_ms=300)
        good = [uid("evt-") for _ in range(8)]
        statuses = await asyncio.gather(*(post_webhook(http, stack.receiver_url, secret, change(e, uid("c-")))
                                          for e in good))
        assert set(statuses) == {202}
        await wait_jobs(stack.redis_url, [keys.job_id(PROVIDER, e) for e in good], timeout=60)
        await set_faults(http, sandbox, latency_ms=0)
        await set_faults(http, sandbox, fail_until=time.time() + 3600, error_status=422)
        bad = [uid("evt-") for _ in range(3)]
        for event_id in bad:
            assert await post_webhook(http, stack.receiver_url, secret, change(event_id, uid("c-"))) == 202
        records = await wait_jobs(stack.redis_url, [keys.job_id(PROVIDER, e) for e in bad], timeout=60)
        assert {r["state"] for r in records.values()} == {"dead"}
        r = aioredis.from_url(stack.redis_url)
        try:  # each died of the provider's 422 (its only attempt)
            for job_id in records:
                attempts = [json.loads(a) for a in await r.lrange(keys.job_attempts(job_id), 0, -1)]
                assert [a["status"] for a in attempts if a.get("number")] == [422], attempts
        finally:
            await r.aclose()
        await set_faults(http, sandbox, fail_until=0, error_status=503)

        # what the provider answered, as the provider itself recorded it
        answered = Counter(str(c["status"]) for c in await sandbox_calls(http, sandbox)
                           if "/_sandbox/" not in c["path"])
        # Each bad job died on a 422. LSP.expert's identity lookups that wait at the same moment in
        # one worker process share one pass over the pages (worker.providers.shared), and a pass
        # that fails fails them all: 1 to 3 answers of 422 for the 3 jobs.
        # 8 creates, a lookup in each of the two worker processes (both applied jobs: below), a 422
        assert 1 <= answered["422"] <= 3 and sum(answered.values()) >= 11
        deadline = time.monotonic() + 30
        counted = await _metrics(http, stack)
        while counted != answered and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            counted = await _metrics(http, stack)
        assert counted == answered
    # both worker processes made calls, so the exact total above holds both processes' counts
    for name in ("worker0", "worker1"):
        assert "applied" in (stack.log_dir / f"{name}.log").read_text(), name


def test_responses_are_attributed_to_the_provider_with_the_longest_matching_base_url() -> None:
    counter = ResponseCounter({"a": "http://127.0.0.1:8090/a", "ab": "http://127.0.0.1:8090/ab",
                               "root": "http://127.0.0.1:8090"})
    assert counter.provider_of("http://127.0.0.1:8090/a/v2/clients?page=2") == "a"
    assert counter.provider_of("http://127.0.0.1:8090/ab/clients") == "ab"
    assert counter.provider_of("http://127.0.0.1:8090/other") == "root"
    assert counter.provider_of("http://127.0.0.1:9999/a") is None


async def test_counts_that_cannot_reach_redis_wait_in_memory_for_the_next_flush(redis_server_url: str) -> None:
    counter = ResponseCounter({"a": "http://127.0.0.1:8090/a"})
    counter.count("http://127.0.0.1:8090/a/x", "201")
    counter.count("http://127.0.0.1:8090/a/x", "201")
    down = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    with pytest.raises((OSError, aioredis.RedisError)):
        await counter.flush(down)
    await down.aclose()
    assert counter.pending == Counter({("a", "201"): 2})
    up = aioredis.from_url(redis_server_url, decode_responses=True)
    try:
        await up.delete(keys.PROVIDER_RESPONSES)
        await counter.flush(up)
        assert await up.hgetall(keys.PROVIDER_RESPONSES) == {"a|201": "2"}
        assert not counter.pending
    finally:
        await up.delete(keys.PROVIDER_RESPONSES)
        await up.aclose()
