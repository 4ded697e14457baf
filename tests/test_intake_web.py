"""Webhook and monitor JSON at the edge: depth, Content-Type, strict fields, limits, conflicts."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.helpers import change, signed_headers
from tests.monitor_fixtures import AUTH, SECRET, settings
from worker import keys
from worker.models import MAX_CONTACTS, MAX_TAGS
from worker.safejson import MAX_DEPTH
from worker.web.app import create_app

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def api(aiohttp_client: Client, fresh_redis_url: str) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings(), fresh_redis_url))


async def post(api: TestClient[Any, Any], body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    headers = signed_headers(SECRET, body)
    headers["content-type"] = content_type
    async with api.post("/webhooks/clients", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 5_000, 100_000])
async def test_deeply_nested_json_is_a_400_naming_the_limit(api: TestClient[Any, Any], levels: int) -> None:
    body = ('{"event_id": ' + "[" * levels + "]" * levels + "}").encode()
    status, answer = await post(api, body)
    assert status == 400 and answer["limit"] == MAX_DEPTH and str(MAX_DEPTH) in answer["error"]
    resp = await api.post("/monitor/replay", data=b"[" * levels + b"]" * levels, headers=AUTH)
    assert resp.status == 400 and str(MAX_DEPTH) in (await resp.json())["error"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded",
                                          "application/octet-stream"])
async def test_a_body_that_is_not_declared_json_is_a_415(api: TestClient[Any, Any], content_type: str) -> None:
    status, answer = await post(api, json.dumps(change("e-ct", "c1")).encode(), content_type)
    assert status == 415 and "application/json" in answer["error"]


async def test_json_with_a_charset_and_plus_json_types_are_accepted(api: TestClient[Any, Any]) -> None:
    assert (await post(api, json.dumps(change("e-cs1", "c1")).encode(), "application/json; charset=utf-8"))[0] == 202
    assert (await post(api, json.dumps(change("e-cs2", "c1")).encode(), "application/cloudevents+json"))[0] == 202


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"occurred_at": 1714564800}, "occurred_at"),
        ({"occurred_at": "1714564800"}, "occurred_at"),
        ({"occurred_at": "2024-05-01"}, "occurred_at"),
        ({"version": True}, "version"),
        ({"version": 1.0}, "version"),
        ({"version": "3"}, "version"),
        ({"client": {"id": "c1", "name": "n", "tags": ["t"] * (MAX_TAGS + 1)}}, "client.tags"),
        ({"client": {"id": "c1", "name": "n", "contacts": [{"first_name": "a"}] * (MAX_CONTACTS + 1)}},
         "client.contacts"),
    ],
)
async def test_strict_fields_and_documented_limits_are_422_naming_the_field(
        api: TestClient[Any, Any], patch: dict[str, Any], field: str) -> None:
    status, answer = await post(api, json.dumps({**change("e-strict", "c1"), **patch}).encode())
    assert status == 422 and field in [e["field"] for e in answer["errors"]]


async def test_the_limits_themselves_are_accepted(api: TestClient[Any, Any]) -> None:
    client = {"id": "c1", "name": "n", "tags": [f"t{i}" for i in range(MAX_TAGS)],
              "contacts": [{"first_name": f"a{i}"} for i in range(MAX_CONTACTS)]}
    assert (await post(api, json.dumps({**change("e-limits", "c1"), "client": client}).encode()))[0] == 202


async def test_a_changed_payload_under_a_known_event_id_is_a_409_recorded_as_a_dead_letter(
        api: TestClient[Any, Any], fresh_redis_url: str) -> None:
    first = change("e-conflict", "c1", name="First", email="first.person@example.com")
    second = {**first, "client": {**first["client"], "name": "Second"}}
    assert (await post(api, json.dumps(first).encode()))[0] == 202
    status, answer = await post(api, json.dumps(first).encode())
    assert (status, answer["status"]) == (200, "duplicate")
    status, answer = await post(api, json.dumps(second).encode())
    assert status == 409 and "e-conflict" in answer["error"] and answer["event_id"] == "e-conflict"
    r = aioredis.from_url(fresh_redis_url, decode_responses=True)
    try:
        assert await r.llen("celery") == 1  # only the first was queued
        [letter] = await r.zrange(keys.jobs_of_provider_in_state("intake", "dead"), 0, -1)
        record = await r.hgetall(keys.job(letter))
        assert record["reason"] == "event_conflict" and "e-conflict" in record["last_error"]
        assert json.loads(record["raw"])["client"]["name"] == "Second"
        assert "first.person@example.com" not in record["raw"]
    finally:
        await r.aclose()
    # The same original payload again is still a plain duplicate.
    assert (await post(api, json.dumps(first).encode()))[0] == 200
    job = await (await api.get(f"/monitor/jobs/{letter}", headers=AUTH)).json()
    assert job["state"] == "dead" and job["provider"] == "intake" and job["reason"] == "event_conflict"
    metrics = (await (await api.get("/metrics")).text()).splitlines()
    assert 'clientsync_dead_letters_total{reason="event_conflict"} 1.0' in metrics
    assert 'clientsync_webhooks_rejected_total{reason="conflict"} 1.0' in metrics
