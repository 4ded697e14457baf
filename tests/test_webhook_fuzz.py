"""A bounded fuzz test of the webhook: signed bodies generated from the published ClientChange
JSON Schema, plus structural garbage, against a real receiver process. No answer is a 5xx."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, clean_env
from tests.helpers import signed_headers
from worker.launcher import Stack
from worker.models import change_json_schema


def from_schema(node: dict[str, Any], defs: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values valid for (the subset of) JSON Schema pydantic publishes: $ref, anyOf, enum, const,
    objects, arrays, strings (pattern, date-time, lengths), integers, booleans, null. A small
    hand-made walker: hypothesis-jsonschema 0.23 does not run on current hypothesis."""
    defs = defs if defs is not None else node.get("$defs", {})
    if "$ref" in node:
        return from_schema(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in node:
        return st.one_of([from_schema(n, defs) for n in node["anyOf"]])
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        props, required = node.get("properties", {}), set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required})
    if kind == "array":
        return st.lists(from_schema(node.get("items", {}), defs), min_size=node.get("minItems", 0),
                        max_size=min(node.get("maxItems", 4), 4))
    if kind == "string":
        if node.get("format") == "date-time":
            offsets = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5, minutes=30))])
            return st.datetimes(timezones=offsets).map(lambda d: d.isoformat())
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: len(s) <= 200)
        return st.text(min_size=node.get("minLength", 0), max_size=min(node.get("maxLength", 30), 30))
    if kind == "integer":
        return st.integers(min_value=node.get("minimum"), max_value=node.get("maximum"))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


EXAMPLES = 120  # per test: bounded in count; each example is one local HTTP request
ANSWERS = {200, 202, 400, 409, 413, 415, 422}


@pytest.fixture(scope="module")
def receiver(redis_server_url: str) -> Iterator[Stack]:
    stack = Stack(env=clean_env(CLIENTSYNC_REDIS_URL=redis_server_url, CLIENTSYNC_MAX_BODY_BYTES="65536"),
                  log_dir=REPO / "var" / "test-logs" / "fuzz")
    try:
        stack.ensure_secrets()
        stack.start_receiver()
        yield stack
    finally:
        stack.stop()


def post(stack: Stack, body: bytes, content_type: str = "application/json") -> int:
    headers = signed_headers(stack.env["CLIENTSYNC_WEBHOOK_SECRET"], body)
    headers["content-type"] = content_type
    request = urllib.request.Request(f"{stack.receiver_url}/webhooks/clients", data=body, headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        json.loads(exc.read())  # every answer, error or not, is JSON
        return int(exc.code)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40,
)


@FUZZ
@given(change=from_schema(change_json_schema()))
def test_bodies_from_the_json_schema_never_get_a_5xx(receiver: Stack, change: dict[str, Any]) -> None:
    status = post(receiver, json.dumps(change).encode())
    assert status in ANSWERS, (status, change)


@FUZZ
@given(
    body=st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=300),
        st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.dictionaries(st.sampled_from(["event_id", "occurred_at", "version", "action", "client", "providers"]),
                        json_values, max_size=6).map(lambda v: json.dumps(v).encode()),
    ),
    content_type=st.sampled_from(["application/json", "text/plain", "application/xml", "", "application/json; x"]),
)
def test_structural_garbage_never_gets_a_5xx(receiver: Stack, body: bytes, content_type: str) -> None:
    status = post(receiver, body, content_type)
    assert status in ANSWERS, (status, body[:200])
