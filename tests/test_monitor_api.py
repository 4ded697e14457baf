"""The monitor JSON API through the real receiver app (aiohttp test client) on a real Redis."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestClient
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec

from tests.monitor_fixtures import AUTH, TOKEN, MakeClient, info_commandstats, make_job, settings
from worker import keys
from worker.heartbeat import Heartbeat
from worker.ledger import Ledger
from worker.monitor import APPLY_TASK, decode_cursor, encode_cursor
from worker.settings import Settings
from worker.web.app import create_app


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    from worker.web.monitor import OPENAPI

    loaded: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    return loaded


def conforms(spec: dict[str, Any], schema: str, instance: Any) -> None:
    """Validate a response body against a component schema of the OpenAPI file."""
    OAS30Validator({"$ref": f"#/components/schemas/{schema}", "components": spec["components"]}).validate(instance)


# --- auth -----------------------------------------------------------------------------------------------
async def test_without_a_configured_token_the_monitor_is_closed_with_a_clear_503(
        aiohttp_client: MakeClient, fresh_redis_url: str) -> None:
    client = await aiohttp_client(create_app(Settings(monitor_token=None), fresh_redis_url))
    for path in ("/monitor/summary", "/monitor/jobs", "/monitor/jobs/x:y"):
        resp = await client.get(path, headers=AUTH)
        assert resp.status == 503
        assert "CLIENTSYNC_MONITOR_TOKEN" in (await resp.json())["error"]
    resp = await client.post("/monitor/replay", json={}, headers={"Authorization": "Bearer "})
    assert resp.status == 503
    resp = await client.get("/dashboard")
    assert resp.status == 503 and "CLIENTSYNC_MONITOR_TOKEN" in await resp.text()


async def test_missing_or_wrong_tokens_are_401_and_the_right_one_is_accepted(api: TestClient[Any, Any]) -> None:
    resp = await api.get("/monitor/summary")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    for header in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN[:-1]}"):
        resp = await api.get("/monitor/summary", headers={"Authorization": header})
        assert resp.status == 401, header
    resp = await api.get("/monitor/summary", headers=AUTH)
    assert resp.status == 200


async def test_the_dashboard_login_sets_an_httponly_strict_session_cookie_that_is_not_the_token(
        api: TestClient[Any, Any]) -> None:
    page = await api.get("/dashboard")
    assert page.status == 200 and 'name="token"' in await page.text()
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    bad = await api.post("/dashboard/login", data={"token": "nope"}, allow_redirects=False)
    assert bad.status == 401 and "not valid" in await bad.text()
    resp = await api.post("/dashboard/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie
    # the cookie (kept by the client's jar) now opens the dashboard and the API
    page = await api.get("/dashboard")
    assert 'src="/dashboard/static/dashboard.js"' in await page.text()
    assert TOKEN not in await page.text()
    assert (await api.get("/monitor/summary")).status == 200
    js = await api.get("/dashboard/static/dashboard.js")
    assert js.status == 200 and "textContent" in await js.text()
    # a cookie-authenticated write needs the custom header a cross-site form cannot send
    resp = await api.post("/monitor/replay", json={"dry_run": True})
    assert resp.status == 403 and "X-Clientsync-Request" in (await resp.json())["error"]
    resp = await api.post("/monitor/replay", json={"dry_run": True}, headers={"X-Clientsync-Request": "1"})
    assert resp.status == 200
    await api.post("/dashboard/logout", allow_redirects=False)
    api.session.cookie_jar.clear()
    assert (await api.get("/monitor/summary")).status == 401


async def test_a_forged_or_expired_session_cookie_is_refused(api: TestClient[Any, Any]) -> None:
    import secrets

    from worker.web.monitor import COOKIE

    # Sessions live in Redis: a cookie naming no stored session (never opened, expired or
    # signed out) opens nothing.
    for value in (secrets.token_urlsafe(32), "garbage", f"{int(time.time()) + 999}.00", "x" * 500):
        api.session.cookie_jar.clear()
        api.session.cookie_jar.update_cookies({COOKIE: value}, api.make_url("/"))
        assert (await api.get("/monitor/summary")).status == 401, value


# --- listing ----------------------------------------------------------------------------------------------
async def test_jobs_filter_by_state_provider_client_event_error_class_and_time(
        api: TestClient[Any, Any], ledger: Ledger, spec: dict[str, Any]) -> None:
    await make_job(ledger, "qonto", "e1", "dead", client_id="acme", error_class="validation")
    await make_job(ledger, "qonto", "e2", "dead", client_id="globex", error_class="server_error")
    await make_job(ledger, "lsp_expert", "e1", "succeeded", client_id="acme")
    await make_job(ledger, "lsp_expert", "e3", "retrying", client_id="acme")
    mid = time.time()
    time.sleep(0.01)
    await make_job(ledger, "qonto", "e4", "queued", client_id="initech")

    async def ids(**params: str) -> list[str]:
        resp = await api.get("/monitor/jobs", params=params, headers=AUTH)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        conforms(spec, "JobPage", body)
        return [j["id"] for j in body["jobs"]]

    # order is newest update first; jobs made within the same millisecond tie, so compare as sets
    assert set(await ids()) == {"qonto:e4", "lsp_expert:e3", "lsp_expert:e1", "qonto:e2", "qonto:e1"}
    assert (await ids())[0] == "qonto:e4"
    assert set(await ids(state="dead")) == {"qonto:e2", "qonto:e1"}
    assert await ids(state="dead", provider="qonto", error_class="validation") == ["qonto:e1"]
    assert set(await ids(provider="lsp_expert")) == {"lsp_expert:e3", "lsp_expert:e1"}
    assert set(await ids(client_id="acme")) == {"lsp_expert:e3", "lsp_expert:e1", "qonto:e1"}
    assert await ids(client_id="acme", state="succeeded") == ["lsp_expert:e1"]
    assert set(await ids(event_id="e1")) == {"lsp_expert:e1", "qonto:e1"}
    assert await ids(event_id="e1", provider="qonto") == ["qonto:e1"]
    assert await ids(since=str(mid)) == ["qonto:e4"]
    assert "qonto:e4" not in await ids(until=str(mid))
    assert await ids(since="2000-01-01T00:00:00Z", state="retrying") == ["lsp_expert:e3"]


async def test_pages_follow_the_cursor_without_gaps_or_repeats(api: TestClient[Any, Any], ledger: Ledger) -> None:
    made = [await make_job(ledger, "qonto" if i % 3 else "grow_crm", f"e{i:02}", "dead") for i in range(23)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"state": "dead", "limit": "5", **({"cursor": cursor} if cursor else {})}
        body = await (await api.get("/monitor/jobs", params=params, headers=AUTH)).json()
        seen += [j["id"] for j in body["jobs"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(made) and len(seen) == len(set(seen))
    # the same with a post-filter (provider) that skips most index entries
    seen = []
    cursor = None
    while True:
        params = {"provider": "grow_crm", "limit": "2", **({"cursor": cursor} if cursor else {})}
        body = await (await api.get("/monitor/jobs", params=params, headers=AUTH)).json()
        seen += [j["id"] for j in body["jobs"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(j for j in made if j.startswith("grow_crm:"))


def test_cursors_order_equal_scores_by_id() -> None:
    assert decode_cursor(encode_cursor(1712345678901, "qonto:a|b")) == (1712345678901, "qonto:a|b")


@pytest.mark.parametrize(("params", "field"), [
    ({"state": "lost"}, "state"),
    ({"limit": "0"}, "limit"),
    ({"limit": "many"}, "limit"),
    ({"limit": "501"}, "limit"),
    ({"since": "yesterday"}, "since"),
    ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"}, "since"),
    ({"provider": "qonto;drop"}, "provider"),
    ({"cursor": "%%%"}, "cursor"),
    ({"stat": "dead"}, "stat"),
])
async def test_bad_filters_are_400_naming_the_field_and_rule(api: TestClient[Any, Any], params: dict[str, str],
                                                             field: str) -> None:
    resp = await api.get("/monitor/jobs", params=params, headers=AUTH)
    assert resp.status == 400
    body = await resp.json()
    assert body["field"] == field and body["rule"] and field in body["error"]


async def test_bad_bodies_and_unknown_jobs_are_4xx_json(api: TestClient[Any, Any]) -> None:
    h = {**AUTH, "Content-Type": "application/json"}
    cases = [
        (await api.post("/monitor/replay", data=b"{not json", headers=h), 400, "body"),
        (await api.post("/monitor/replay", data=b"[1]", headers=h), 400, "body"),
        (await api.post("/monitor/replay", data=b"", headers=h), 400, "body"),
        (await api.post("/monitor/replay", json={"provider": 3}, headers=AUTH), 400, "provider"),
        (await api.post("/monitor/replay", json={"state": "succeeded"}, headers=AUTH), 400, "state"),
        (await api.post("/monitor/replay", json={"dry_run": "yes"}, headers=AUTH), 400, "dry_run"),
        (await api.post("/monitor/replay", json={"limit": 100000}, headers=AUTH), 400, "limit"),
        (await api.post("/monitor/jobs/qonto:x/replay", data=b"{", headers=h), 400, "body"),
        (await api.post("/monitor/jobs/qonto:x/replay", json={"note": 5}, headers=AUTH), 400, "note"),
    ]
    for resp, status, field in cases:
        assert resp.status == status, await resp.text()
        assert (await resp.json())["field"] == field
    for resp in (await api.get("/monitor/jobs/qonto:nope", headers=AUTH),
                 await api.post("/monitor/jobs/qonto:nope/replay", headers=AUTH),
                 await api.post("/monitor/jobs/qonto:nope/discard", headers=AUTH)):
        assert resp.status == 404 and (await resp.json())["id"] == "qonto:nope"


# --- one job ----------------------------------------------------------------------------------------------
async def test_a_job_shows_its_history_and_never_an_unmasked_email(
        api: TestClient[Any, Any], ledger: Ledger, spec: dict[str, Any]) -> None:
    job_id = await make_job(ledger, "qonto", "e1", "dead", client_id="acme", email="jane.doe@example.com")
    resp = await api.get(f"/monitor/jobs/{job_id}", headers=AUTH)
    text = await resp.text()
    assert resp.status == 200
    assert "jane.doe@example.com" not in text and "j***@e***.com" in text
    body = json.loads(text)
    conforms(spec, "JobDetail", body)
    assert body["state"] == "dead" and body["replayable"] is True
    assert body["change"]["client"]["email"] == "j***@e***.com"
    assert body["history"][0]["outcome"] == "dead" and body["history"][0]["status"] == 422
    assert body["history"][0]["field_errors"] == {"email": ["already taken by j***@e***.com"]}
    listed = await (await api.get("/monitor/jobs", headers=AUTH)).text()
    assert "jane.doe@example.com" not in listed


# --- replay and discard -------------------------------------------------------------------------------------
def decode_message(raw: str) -> tuple[dict[str, Any], list[Any]]:
    message = json.loads(raw)
    return message["headers"], json.loads(base64.b64decode(message["body"]))


async def test_replay_enqueues_apply_change_with_the_full_change_and_marks_the_job_queued(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis, spec: dict[str, Any]) -> None:
    job_id = await make_job(ledger, "qonto", "e1", "dead", email="jane.doe@example.com")
    resp = await api.post(f"/monitor/jobs/{job_id}/replay", json={"note": "fixed the VAT number"}, headers=AUTH)
    assert resp.status == 202
    body = await resp.json()
    conforms(spec, "Replayed", body)
    raw = await r.lrange("celery", 0, -1)
    assert len(raw) == 1
    headers, (args, kwargs, _embed) = decode_message(raw[0])
    assert headers["task"] == APPLY_TASK and headers["id"] == body["task_id"]
    assert args[1] == "qonto" and kwargs == {"attempt": 1}
    assert args[0]["event_id"] == "e1" and args[0]["client"]["email"] == "jane.doe@example.com"  # the real change
    job = await (await api.get(f"/monitor/jobs/{job_id}", headers=AUTH)).json()
    assert job["state"] == "queued" and job["replays"] == 1 and job["note"] == "fixed the VAT number"
    assert [h["outcome"] for h in job["history"]] == ["dead", "replayed"]
    # a second replay while it is queued is refused, and nothing more is enqueued
    again = await api.post(f"/monitor/jobs/{job_id}/replay", headers=AUTH)
    assert again.status == 409 and (await again.json())["state"] == "queued"
    assert await r.llen("celery") == 1


def test_the_replayed_task_name_is_the_celery_task() -> None:
    from tasks.sync import APPLY_TASK as CELERY_APPLY_TASK

    assert APPLY_TASK == CELERY_APPLY_TASK


async def test_succeeded_running_and_invalid_jobs_are_not_replayable(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis) -> None:
    from worker.ledger import Attempt

    done = await make_job(ledger, "qonto", "e1", "succeeded")
    live = await make_job(ledger, "qonto", "e2", "retrying")
    await ledger.dead_letter("invalid:t1", raw='{"oops": "a@b.example"}',
                             attempt=Attempt(1, time.time(), "dead", "invalid_message", None, "invalid"))
    for job_id, state in ((done, "succeeded"), (live, "retrying"), ("invalid:t1", "dead")):
        resp = await api.post(f"/monitor/jobs/{job_id}/replay", headers=AUTH)
        assert resp.status == 409, job_id
        assert (await resp.json())["state"] == state
    resp = await api.post(f"/monitor/jobs/{done}/replay", headers=AUTH)
    assert "idempotency" in (await resp.json())["error"]
    assert await r.llen("celery") == 0
    letter = await (await api.get("/monitor/jobs/invalid:t1", headers=AUTH)).json()
    assert letter["replayable"] is False and "a@b.example" not in json.dumps(letter)


async def test_discard_takes_a_dead_job_out_of_the_dead_list_and_it_stays_replayable(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis) -> None:
    dead = await make_job(ledger, "qonto", "e1", "dead")
    live = await make_job(ledger, "qonto", "e2", "running")
    resp = await api.post(f"/monitor/jobs/{dead}/discard", headers=AUTH)
    assert resp.status == 200 and (await resp.json()) == {"id": dead, "status": "discarded"}
    assert (await api.post(f"/monitor/jobs/{dead}/discard", headers=AUTH)).status == 409
    assert (await api.post(f"/monitor/jobs/{live}/discard", headers=AUTH)).status == 409
    listed = await (await api.get("/monitor/jobs", params={"state": "dead"}, headers=AUTH)).json()
    assert listed["jobs"] == []
    bulk = await (await api.post("/monitor/replay", json={}, headers=AUTH)).json()
    assert bulk["replayed"] == 0  # bulk replay takes dead jobs only
    assert (await api.post(f"/monitor/jobs/{dead}/replay", headers=AUTH)).status == 202
    assert await r.llen("celery") == 1


async def test_bulk_replay_filters_by_provider_error_class_and_time(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis, spec: dict[str, Any]) -> None:
    await make_job(ledger, "qonto", "e1", "dead", error_class="validation")
    await make_job(ledger, "qonto", "e2", "dead", error_class="server_error")
    await make_job(ledger, "lsp_expert", "e3", "dead", error_class="validation")
    await make_job(ledger, "lsp_expert", "e4", "succeeded")
    dry = await api.post("/monitor/replay", json={"error_class": "validation", "dry_run": True}, headers=AUTH)
    assert dry.status == 200
    body = await dry.json()
    conforms(spec, "BulkResult", body)
    assert body["matched"] == 2 and sorted(body["jobs"]) == ["lsp_expert:e3", "qonto:e1"]
    assert await r.llen("celery") == 0
    resp = await api.post("/monitor/replay", json={"provider": "qonto", "error_class": "validation"}, headers=AUTH)
    assert resp.status == 202 and (await resp.json())["replayed"] == 1
    resp = await api.post("/monitor/replay", json={"until": "2000-01-01T00:00:00Z"}, headers=AUTH)
    assert (await resp.json())["matched"] == 0
    resp = await api.post("/monitor/replay", json={}, headers=AUTH)
    assert (await resp.json())["replayed"] == 2
    assert await r.llen("celery") == 3
    states = {j["id"]: j["state"] for j in (await (await api.get("/monitor/jobs", headers=AUTH)).json())["jobs"]}
    assert states == {"qonto:e1": "queued", "qonto:e2": "queued", "lsp_expert:e3": "queued",
                      "lsp_expert:e4": "succeeded"}


async def test_bulk_replay_of_1000_dead_jobs_takes_a_few_batched_round_trips(
        api: TestClient[Any, Any], r: aioredis.Redis) -> None:
    ledger = Ledger(r, trim_every=0)
    for i in range(1000):
        await make_job(ledger, "qonto" if i % 2 else "grow_crm", f"e{i}", "dead")
    await r.config_resetstat()
    started = time.perf_counter()
    resp = await api.post("/monitor/replay", json={}, headers=AUTH)
    took = time.perf_counter() - started
    body = await resp.json()
    assert resp.status == 202 and body["replayed"] == 1000 and body["more"] is False
    assert await r.llen("celery") == 1000
    assert await r.zcard(keys.jobs_in_state("queued")) == 1000
    calls = await info_commandstats(r)
    # 5 replay scripts of 200 jobs; the listing reads the index in a handful of pages
    assert calls.get("evalsha", 0) + calls.get("eval", 0) <= 6, calls
    assert calls.get("zrevrangebyscore", 0) <= 4, calls
    assert took < 5.0, took


# --- summary, metrics, readiness, OpenAPI ---------------------------------------------------------------
async def test_summary_counts_per_provider_with_oldest_retrying_and_tolerant_circuit_and_rate_reads(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis, spec: dict[str, Any]) -> None:
    first = await make_job(ledger, "qonto", "e1", "retrying")
    await make_job(ledger, "qonto", "e2", "retrying")
    await make_job(ledger, "qonto", "e3", "dead")
    await make_job(ledger, "lsp_expert", "e4", "succeeded")
    await make_job(ledger, "grow_crm", "e5", "queued")
    await r.hset(keys.circuit("qonto"), mapping={"state": "open", "failures": 5, "opened_at": time.time(),
                                                  "reopen_at": time.time() + 30})
    await r.set(keys.circuit("lsp_expert"), "something else")
    await r.hset(keys.rate_bucket("qonto"), mapping={"limit": 1000, "period": 10, "tokens": 10,
                                                      "tokens_at": time.time() - 0.05, "blocked_until": 0})
    await r.lpush("celery", "x", "y")
    resp = await api.get("/monitor/summary", headers=AUTH)
    body = await resp.json()
    conforms(spec, "Summary", body)
    q = body["providers"]["qonto"]
    assert q["counts"]["retrying"] == 2 and q["counts"]["dead"] == 1
    assert q["totals"]["enqueued"] == 3 and q["totals"]["retried"] == 2 and q["totals"]["dead"] == 1
    assert q["oldest_retrying"]["id"] == first
    assert q["circuit"]["state"] == "open" and q["circuit"]["failures"] == 5
    # the bucket holds a tenth of the limit: never more than 100 tokens shown for 1000 per 10 s
    assert 10 < q["rate_limit"]["tokens"] <= 100 and q["rate_limit"]["limit"] == 1000
    assert q["rate_limit"]["capacity"] == 100
    assert body["providers"]["lsp_expert"]["circuit"] == {"state": "unknown", "known": False}
    assert body["providers"]["grow_crm"]["circuit"] == {"state": "closed", "known": False}
    assert body["providers"]["grow_crm"]["rate_limit"] == {"known": False}
    assert body["queue_depth"] == 2 and body["totals"]["retrying"] == 2


async def test_metrics_expose_shared_counters_latency_queue_and_circuit_without_emails(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis) -> None:
    from tests.helpers import signed_headers
    from tests.monitor_fixtures import SECRET

    await make_job(ledger, "qonto", "e1", "succeeded", received_ago=0.7, email="jane.doe@example.com")
    await make_job(ledger, "qonto", "e2", "dead", email="jane.doe@example.com")
    await r.hset(keys.circuit("qonto"), mapping={"state": "half_open"})
    await r.lpush("celery", "x")
    body = json.dumps({"event_id": "w1", "occurred_at": "2024-05-01T12:00:00Z", "action": "upsert",
                       "client": {"id": "c9", "name": "N", "email": "john@example.org"}}).encode()
    assert (await api.post("/webhooks/clients", data=body, headers=signed_headers(SECRET, body))).status == 202
    assert (await api.post("/webhooks/clients", data=body, headers=signed_headers(SECRET, body))).status == 200
    bad = signed_headers(SECRET, body)
    bad["webhook-signature"] = "v1,AAAA"
    assert (await api.post("/webhooks/clients", data=body, headers=bad)).status == 401
    resp = await api.get("/metrics")  # no token needed
    text = await resp.text()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    lines = set(text.splitlines())
    assert 'clientsync_jobs_applied_total{provider="qonto"} 1.0' in lines
    assert 'clientsync_jobs_dead_total{provider="qonto"} 1.0' in lines
    assert 'clientsync_jobs_enqueued_total{provider="qonto"} 2.0' in lines
    assert 'clientsync_apply_latency_seconds_bucket{le="0.5",provider="qonto"} 0.0' in lines
    assert 'clientsync_apply_latency_seconds_bucket{le="1",provider="qonto"} 1.0' in lines
    assert 'clientsync_apply_latency_seconds_count{provider="qonto"} 1.0' in lines
    assert 'clientsync_queue_depth{queue="celery"} 2.0' in lines  # x + the webhook's message
    assert 'clientsync_circuit_state{provider="qonto",state="half_open"} 1.0' in lines
    assert 'clientsync_jobs{provider="qonto",state="dead"} 1.0' in lines
    assert "clientsync_webhooks_received_total 3.0" in lines
    assert "clientsync_webhooks_queued_total 1.0" in lines
    assert "clientsync_webhooks_duplicates_total 1.0" in lines
    assert 'clientsync_webhooks_rejected_total{reason="signature"} 1.0' in lines
    import importlib.metadata
    import platform
    version = importlib.metadata.version("clientsync")
    assert f'clientsync_build_info{{python="{platform.python_version()}",version="{version}"}} 1.0' in lines
    assert "@" not in text and TOKEN not in text and SECRET not in text


async def test_readyz_needs_redis_and_a_heartbeating_worker(api: TestClient[Any, Any], r: aioredis.Redis,
                                                            spec: dict[str, Any]) -> None:
    resp = await api.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["redis"] == "ok" and body["workers"] == [] and body["heartbeats"] == []
    assert any("worker" in m for m in body["missing"])
    conforms(spec, "Readiness", body)
    await Heartbeat(r, "host:123:abc", 10.0).beat_once()  # what a worker's runtime writes
    resp = await api.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["workers"] == ["host:123:abc"] and body["missing"] == []
    assert body["broker"] == {"queue": "celery", "depth": 0}
    [beat] = body["heartbeats"]
    assert beat["worker"] == "host:123:abc" and beat["live"] is True and beat["live_within_seconds"] == 20
    assert 0 <= beat["age_seconds"] < beat["live_within_seconds"]
    conforms(spec, "Readiness", body)
    assert (await api.get("/healthz")).status == 200


async def redis_now_ms(r: aioredis.Redis) -> float:
    seconds, micros = await r.time()
    return seconds * 1000 + micros / 1000


async def write_beat(r: aioredis.Redis, worker: str, *, age: float, every: float) -> None:
    """A heartbeat written straight into Redis, `age` seconds old by Redis's clock."""
    now = await redis_now_ms(r)
    await r.hset(keys.HEARTBEATS, worker, f"{int(now - age * 1000)} {every!r}")


async def test_a_heartbeat_with_an_old_timestamp_is_not_live_and_readyz_names_its_worker(
        api: TestClient[Any, Any], r: aioredis.Redis, spec: dict[str, Any]) -> None:
    every = 10.0
    # live means younger than two of the worker's own intervals, whatever the key's TTL
    await write_beat(r, "host:1:old", age=2 * every + 5, every=every)
    await write_beat(r, "host:2:recent", age=2 * every - 5, every=every)
    await write_beat(r, "host:3:quick", age=2 * every - 5, every=1.0)  # same age, beats every second: silent
    await r.hset(keys.HEARTBEATS, "host:4:legacy", "1")  # not a heartbeat of this format: ignored
    await write_beat(r, "host:5:gone", age=30 * every + 5, every=every)  # past KEEP_BEATS: as if gone
    resp = await api.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["workers"] == ["host:2:recent"] and body["missing"] == []
    beats = {b["worker"]: b for b in body["heartbeats"]}
    assert set(beats) == {"host:1:old", "host:2:recent", "host:3:quick"}
    assert body["heartbeats"][0]["worker"] == "host:2:recent"  # live ones first
    assert beats["host:2:recent"]["live"] is True
    assert beats["host:1:old"]["live"] is False and beats["host:1:old"]["age_seconds"] >= 2 * every + 5
    assert beats["host:3:quick"]["live"] is False and beats["host:3:quick"]["live_within_seconds"] == 2
    conforms(spec, "Readiness", body)

    await r.hdel(keys.HEARTBEATS, "host:2:recent")
    resp = await api.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["workers"] == []
    [missing] = body["missing"]
    assert "no worker is heartbeating" in missing and "host:1:old" in missing and "live within 20 s" in missing
    assert "host:3:quick" in missing and "host:4:legacy" not in missing and "host:5:gone" not in missing
    conforms(spec, "Readiness", body)

    resp = await api.get("/monitor/summary", headers=AUTH)
    summary = await resp.json()
    assert resp.status == 200 and summary["workers"] == []
    assert {b["worker"]: b["live"] for b in summary["heartbeats"]} == {"host:1:old": False, "host:3:quick": False}
    conforms(spec, "Summary", summary)


async def test_readyz_monitor_and_metrics_are_503_when_redis_is_unreachable(aiohttp_client: MakeClient) -> None:
    from worker.redis_server import free_port

    client = await aiohttp_client(create_app(settings(), f"redis://127.0.0.1:{free_port()}/0"))
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and "unreachable" in body["redis"]
    for path in ("/monitor/summary", "/monitor/jobs", "/metrics"):
        resp = await client.get(path, headers=AUTH)
        assert resp.status == 503 and "Redis" in (await resp.json())["error"], path


async def test_the_openapi_file_is_served_and_is_a_valid_openapi_3_document(api: TestClient[Any, Any]) -> None:
    resp = await api.get("/monitor/openapi.yaml")
    assert resp.status == 200
    document = yaml.safe_load(await resp.text())
    validate_spec(document)
    assert document["openapi"].startswith("3.")
    documented = {(p, m) for p, ops in document["paths"].items() for m in ops}
    routes = {(r.resource.canonical.replace("{id:.+}", "{id}"), r.method.lower())
              for r in api.app.router.routes() if r.resource is not None}
    for path, method in documented:
        assert (path, method) in routes, (path, method)
    for path, method in routes:
        if path.startswith("/monitor") and method != "head":
            assert (path, method) in documented, (path, method)
