"""The client page's API (`GET /monitor/clients/{id}`) and the dead-job groups (`GET /monitor/dead-groups`),
through the real receiver app (aiohttp test client) on a real Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestClient
from openapi_schema_validator import OAS30Validator

from tests.monitor_fixtures import AUTH, make_change, make_job
from worker import keys
from worker import monitor as monitor_mod
from worker.ledger import Attempt, Ledger
from worker.models import PROVIDER_NAMES


def conforms(schema: str, instance: Any) -> None:
    from worker.web.monitor import OPENAPI

    spec = yaml.safe_load(OPENAPI.read_text())
    OAS30Validator({"$ref": f"#/components/schemas/{schema}", "components": spec["components"]}).validate(instance)


# --- the client page ---------------------------------------------------------------------------------------
async def test_the_client_view_shows_its_record_at_each_provider_and_its_jobs_across_providers(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis) -> None:
    now = time.time()
    applied_us = int((now - 60) * 1_000_000)
    settle_ms = int((now + 120) * 1000)
    await r.hset(keys.client_state("lsp_expert", "c42"), mapping={
        "link": "L-981", "mark_v": "7", "mark_t": str(applied_us), "unsettled": f"cs_lsp_expert_abc|{settle_ms}",
        "resolution": json.dumps({"action": "adopt", "provider_id": "L-981", "event_id": "e0"}),
    })
    await r.hset(keys.client_state("qonto", "c42"), mapping={
        "link": "Q-1", "mark_v": "-1", "mark_t": str(applied_us), "deleted": "1",
        "del_intent": f"e9@{now - 5:.3f}",
    })
    await r.hset(keys.client_state("grow_crm", "c42"), mapping={"intent": f"e8@{now - 3:.3f}"})
    await r.hset(keys.client_state("qonto", "someone-else"), mapping={"link": "Q-2"})
    first = await make_job(ledger, "lsp_expert", "e1", "succeeded", client_id="c42")
    second = await make_job(ledger, "qonto", "e2", "dead", client_id="c42", email="jane.doe@example.com")
    await make_job(ledger, "qonto", "e3", "dead", client_id="other")

    resp = await api.get("/monitor/clients/c42", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    conforms("ClientView", body)
    assert body["client_id"] == "c42"
    assert set(PROVIDER_NAMES) <= set(body["providers"])
    lsp = body["providers"]["lsp_expert"]
    assert lsp["known"] and lsp["link"] == "L-981" and lsp["version"] == 7 and not lsp["deleted"]
    assert lsp["changed_at"] == monitor_mod.iso(applied_us / 1_000_000)
    assert lsp["unsettled"] == {"key": "cs_lsp_expert_abc", "settle_at": monitor_mod.iso(settle_ms, ms=True),
                                "settled": False}
    assert lsp["resolution"]["provider_id"] == "L-981"
    qonto = body["providers"]["qonto"]
    assert qonto["deleted"] is True and qonto["version"] is None  # an unversioned mark is not a version
    assert qonto["del_intent"]["event_id"] == "e9" and qonto["intent"] is None
    assert body["providers"]["grow_crm"]["intent"]["event_id"] == "e8"
    assert body["providers"]["invoice_ninja"] == {
        "known": False, "link": None, "deleted": False, "version": None, "changed_at": None, "intent": None,
        "del_intent": None, "unsettled": None, "resolution": None}
    # every change of this client, at every provider, newest update first; nobody else's
    assert [j["id"] for j in body["jobs"]] == [second, first]
    assert "jane.doe@example.com" not in await resp.text()

    page = await (await api.get("/monitor/clients/c42?limit=1", headers=AUTH)).json()
    assert [j["id"] for j in page["jobs"]] == [second] and page["next_cursor"]
    rest = await (await api.get(f"/monitor/clients/c42?limit=1&cursor={page['next_cursor']}", headers=AUTH)).json()
    assert [j["id"] for j in rest["jobs"]] == [first]


async def test_a_client_known_only_by_its_record_is_found_and_an_unknown_one_is_404(
        api: TestClient[Any, Any], r: aioredis.Redis) -> None:
    await r.hset(keys.client_state("qonto", "only-linked"), mapping={"link": "Q-7"})
    body = await (await api.get("/monitor/clients/only-linked", headers=AUTH)).json()
    assert body["providers"]["qonto"]["link"] == "Q-7" and body["jobs"] == []
    resp = await api.get("/monitor/clients/never-seen", headers=AUTH)
    assert resp.status == 404
    assert "never-seen" in (await resp.json())["error"]


async def test_the_client_view_refuses_bad_input_naming_the_field_and_needs_the_token(
        api: TestClient[Any, Any]) -> None:
    resp = await api.get("/monitor/clients/bad%20id", headers=AUTH)
    assert resp.status == 400 and (await resp.json())["field"] == "client_id"
    resp = await api.get("/monitor/clients/c1?limit=0", headers=AUTH)
    assert resp.status == 400 and (await resp.json())["field"] == "limit"
    resp = await api.get("/monitor/clients/c1?colour=red", headers=AUTH)
    assert resp.status == 400 and (await resp.json())["field"] == "colour"
    assert (await api.get("/monitor/clients/c1")).status == 401


# --- dead jobs grouped by cause ----------------------------------------------------------------------------
async def test_dead_jobs_are_grouped_by_error_class_with_exact_counts(
        api: TestClient[Any, Any], ledger: Ledger, r: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # a small scan batch so the count spans many ZSCAN pages of a sorted set past its listpack size
    monkeypatch.setattr(monitor_mod, "_GROUP_BATCH", 17)
    expected = {("validation", "qonto"): 150, ("auth", "qonto"): 40, ("validation", "lsp_expert"): 25}
    n = 0
    for (error_class, provider), count in expected.items():
        for _ in range(count):
            n += 1
            await make_job(ledger, provider, f"e{n}", "dead", error_class=error_class,
                           email=f"person{n}@example.com")
    # jobs that are not dead are not counted, nor a dead job discarded since
    await make_job(ledger, "qonto", "r1", "retrying")
    await make_job(ledger, "qonto", "s1", "succeeded")
    gone = await make_job(ledger, "qonto", "d1", "dead", error_class="auth")
    assert (await api.post(f"/monitor/jobs/{gone}/discard", headers=AUTH)).status == 200

    resp = await api.get("/monitor/dead-groups", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    conforms("DeadGroups", body)
    got = {(g["error_class"], g["provider"]): g["count"] for g in body["groups"]}
    assert got == expected
    assert body["total"] == sum(expected.values())
    assert [g["count"] for g in body["groups"]] == sorted(expected.values(), reverse=True)
    assert "@example.com" not in await resp.text()
    assert all(g["example_error"] and "***" in g["example_error"] for g in body["groups"])

    only = await (await api.get("/monitor/dead-groups?provider=lsp_expert", headers=AUTH)).json()
    assert only == {"total": 25, "groups": [next(g for g in body["groups"] if g["provider"] == "lsp_expert")]}
    resp = await api.get("/monitor/dead-groups?provider=bad/name", headers=AUTH)
    assert resp.status == 400 and (await resp.json())["field"] == "provider"
    assert (await api.get("/monitor/dead-groups")).status == 401


# --- the job view's extra fields ---------------------------------------------------------------------------
async def test_a_needs_attention_job_shows_masked_candidates_then_its_resolution(
        api: TestClient[Any, Any], ledger: Ledger) -> None:
    job_id = await ledger.enqueued(make_change("na1", "c9"), "grow_crm")
    await ledger.running(job_id)
    await ledger.needs_attention(job_id, Attempt(1, time.time(), "needs_attention", "ambiguous", None,
                                                 "two records could be this client"), candidates=[
        {"provider_id": "G-1", "name": "Client c9", "email": "boss@acme.example", "created_at": "2024-01-02"},
        {"provider_id": "G-2", "name": "Client c9", "email": "sales@acme.example", "created_at": "2024-02-03"},
    ])
    job = await (await api.get(f"/monitor/jobs/{job_id}", headers=AUTH)).json()
    assert job["state"] == "needs_attention" and job["resolution"] is None
    assert [c["provider_id"] for c in job["candidates"]] == ["G-1", "G-2"]
    assert "boss@acme.example" not in json.dumps(job) and job["candidates"][0]["email"].startswith("b***@")
    resp = await api.post(f"/monitor/jobs/{job_id}/resolve", json={"action": "adopt", "provider_id": "G-2"},
                          headers=AUTH)
    assert resp.status == 202
    job = await (await api.get(f"/monitor/jobs/{job_id}", headers=AUTH)).json()
    assert job["state"] == "queued" and job["resolution"]["provider_id"] == "G-2"


async def test_a_dead_letter_shows_its_reason_stage_and_masked_raw_payload(
        api: TestClient[Any, Any], ledger: Ledger) -> None:
    await ledger.dead_letter("intake:t7", raw='{"client": {"email": "x.y@corp.example"}', reason="bad_json",
                             stage="gate", attempt=Attempt(1, time.time(), "dead", "invalid_message", None, "no"))
    job = await (await api.get("/monitor/jobs/intake:t7", headers=AUTH)).json()
    assert job["provider"] == "intake" and job["reason"] == "bad_json" and job["stage"] == "gate"
    assert "x.y@corp.example" not in job["raw"] and "corp" not in job["raw"]


async def test_dead_groups_of_one_client_count_only_that_clients_dead_jobs(
        api: TestClient[Any, Any], ledger: Ledger) -> None:
    await make_job(ledger, "qonto", "a1", "dead", client_id="c1")
    await make_job(ledger, "qonto", "a2", "dead", client_id="c1", error_class="auth")
    await make_job(ledger, "lsp_expert", "a3", "dead", client_id="c1")
    await make_job(ledger, "qonto", "a4", "succeeded", client_id="c1")
    await make_job(ledger, "qonto", "b1", "dead", client_id="c2")
    body = await (await api.get("/monitor/dead-groups?client_id=c1", headers=AUTH)).json()
    assert {(g["error_class"], g["provider"]): g["count"] for g in body["groups"]} == {
        ("validation", "qonto"): 1, ("auth", "qonto"): 1, ("validation", "lsp_expert"): 1}
    body = await (await api.get("/monitor/dead-groups?client_id=c1&provider=qonto", headers=AUTH)).json()
    assert body["total"] == 2 and {g["provider"] for g in body["groups"]} == {"qonto"}


async def test_the_root_redirects_to_the_dashboard(api: TestClient[Any, Any]) -> None:
    resp = await api.get("/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/dashboard"


async def test_the_login_page_keeps_a_shared_links_view_through_sign_in(api: TestClient[Any, Any]) -> None:
    page = await (await api.get("/dashboard")).text()
    assert 'src="/dashboard/static/login.js"' in page
    script = await (await api.get("/dashboard/static/login.js")).text()
    assert "location.hash" in script
