"""The doors an operator uses: sessions end on the server, wrong tokens are slowed down, short
tokens are refused, and personal data kept in the ledger is bounded in time."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

from tests.conftest import REPO, clean_env
from tests.monitor_fixtures import AUTH, TOKEN, make_job, settings
from worker import keys
from worker.ledger import Ledger
from worker.settings import MIN_TOKEN, Settings
from worker.web.app import create_app
from worker.web.monitor import COOKIE, FREE_FAILURES

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def api(aiohttp_client: Client, fresh_redis_url: str) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings(), fresh_redis_url))


@pytest.fixture
async def r(fresh_redis_url: str) -> Any:
    client = aioredis.from_url(fresh_redis_url)
    yield client
    await client.aclose()


async def test_signing_out_ends_the_session_on_the_server(api: TestClient[Any, Any]) -> None:
    resp = await api.post("/dashboard/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 303
    value = resp.cookies[COOKIE].value
    assert (await api.get("/monitor/summary")).status == 200
    await api.post("/dashboard/logout", allow_redirects=False)
    # A copy of the cookie kept after signing out (another tab, a stolen cookie) opens nothing.
    api.session.cookie_jar.clear()
    api.session.cookie_jar.update_cookies({COOKIE: value}, api.make_url("/"))
    assert (await api.get("/monitor/summary")).status == 401
    assert (await api.get("/dashboard")).status == 200  # the login form, not the dashboard
    assert 'name="token"' in await (await api.get("/dashboard")).text()


async def test_a_session_ends_when_the_token_changes(aiohttp_client: Client, fresh_redis_url: str) -> None:
    first = await aiohttp_client(create_app(settings(), fresh_redis_url))
    value = (await first.post("/dashboard/login", data={"token": TOKEN}, allow_redirects=False)).cookies[COOKIE].value
    rotated = await aiohttp_client(create_app(settings(monitor_token="r" * MIN_TOKEN), fresh_redis_url))
    rotated.session.cookie_jar.update_cookies({COOKIE: value}, rotated.make_url("/"))
    assert (await rotated.get("/monitor/summary")).status == 401


async def test_repeated_wrong_tokens_are_locked_out_with_retry_after(api: TestClient[Any, Any]) -> None:
    statuses = []
    for i in range(20):
        resp = await api.get("/monitor/summary", headers={"Authorization": f"Bearer wrong-{i}"})
        statuses.append(resp.status)
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
    assert statuses[:FREE_FAILURES] == [401] * FREE_FAILURES
    assert statuses[FREE_FAILURES] == 401 and set(statuses[FREE_FAILURES + 1:]) == {429}
    # While locked out even the right token is not looked at, and the login form is closed too.
    resp = await api.get("/monitor/summary", headers=AUTH)
    assert resp.status == 429 and "Retry-After" in resp.headers
    resp = await api.post("/dashboard/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 429 and "Retry-After" in resp.headers


async def test_the_lockout_grows_and_a_right_token_resets_the_count(api: TestClient[Any, Any], r: Any) -> None:
    for i in range(FREE_FAILURES - 1):
        assert (await api.post("/dashboard/login", data={"token": f"bad{i}"}, allow_redirects=False)).status == 401
    assert (await api.get("/monitor/summary", headers=AUTH)).status == 200
    assert await r.exists(keys.auth_failures("127.0.0.1")) == 0
    waits = []
    for i in range(FREE_FAILURES + 3):
        await r.hdel(keys.auth_failures("127.0.0.1"), "until")  # look past each lockout at once
        resp = await api.get("/monitor/summary", headers={"Authorization": f"Bearer bad{i}"})
        assert resp.status == 401
        until = await r.hget(keys.auth_failures("127.0.0.1"), "until")
        waits.append(until)
    assert waits[:FREE_FAILURES] == [None] * FREE_FAILURES
    bounds = [float(w) for w in waits[FREE_FAILURES:]]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)  # each lockout longer than the last


def test_a_short_monitor_token_is_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(monitor_token="x" * (MIN_TOKEN - 1))
    Settings(monitor_token="x" * MIN_TOKEN)
    out = subprocess.run([sys.executable, "-m", "worker", "serve"], cwd=REPO, capture_output=True, text=True,
                         env=clean_env(CLIENTSYNC_MONITOR_TOKEN="too-short", CLIENTSYNC_REDIS_URL="redis://127.0.0.1:1"),
                         timeout=60, check=False)
    assert out.returncode == 2
    assert "CLIENTSYNC_MONITOR_TOKEN" in out.stderr and "at least 32 characters" in out.stderr
    assert "too-short" not in out.stderr


async def test_the_full_change_is_dropped_from_finished_jobs_after_its_time(r: Any) -> None:
    ledger = Ledger(r, change_ttl_seconds=0)
    done = await make_job(ledger, "qonto", "e1", "succeeded")
    skipped = await make_job(ledger, "qonto", "e2", "skipped")
    dead = await make_job(ledger, "qonto", "e3", "dead")
    live = await make_job(ledger, "qonto", "e4", "retrying")
    assert await ledger.scrub_changes() == 2
    for job_id in (done, skipped):
        job = await ledger.get(job_id)
        assert job is not None and job.change is None and job.fields["result"]  # the outcome stays
        assert "change_dropped_at" in job.fields
    for job_id in (dead, live):  # a dead job may be replayed; a live one is still working
        job = await ledger.get(job_id)
        assert job is not None and job.change is not None
    later = await make_job(ledger, "qonto", "e5", "succeeded")
    assert await ledger.scrub_changes() == 1
    assert (await ledger.get(later)) is not None and (await ledger.get(later)).change is None  # type: ignore[union-attr]
    kept = await make_job(Ledger(r), "qonto", "e6", "succeeded")
    assert await Ledger(r).scrub_changes() == 0  # the default keeps a week
    assert (await ledger.get(kept)).change is not None  # type: ignore[union-attr]
