"""The receiver's faster encodings write exactly what the slower reference wrote.

- `fingerprint_of` takes orjson's bytes when they equal the canonical `json.dumps` form: claims and
  idempotency keys keep fingerprints for days, so one changed byte would turn a retry into a
  conflict.
- `argsrepr` masks emails in the JSON text's string literals only: the same bytes as masking the
  value string by string (`_masked`), then writing it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import orjson
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import change
from worker.models import ClientChange, fingerprint_of
from worker.producer import _masked, _masked_json, task_message, uuid4_text

# Strings that stress both: quotes, backslashes, control characters, DEL, non-ASCII, astral
# characters, and '@' in and around email-like text.
_ALPHABET = st.sampled_from(['"', "\\", "@", ".", " ", "\n", "\x00", "\x1f", "\x7f", "é", "\u2028", "😀",
                             "a", "b", "com", "x.org", "jane.doe@example.com", "<", ",", ":", "\\\"", "@@"])
_TEXT = st.lists(_ALPHABET, max_size=12).map("".join) | st.text(max_size=20)
_SCALAR = st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | _TEXT
_JSON = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                     max_leaves=20)


def _reference_fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@settings(max_examples=600, deadline=None)
@given(_JSON)
def test_the_fingerprint_is_the_canonical_json_form_whatever_the_strings(payload: Any) -> None:
    assert fingerprint_of(payload) == _reference_fingerprint(payload)


def test_the_fingerprint_of_values_orjson_refuses_or_writes_differently_is_the_canonical_form() -> None:
    for payload in ({"big": 2**70}, {"del": "a\x7fb"}, {"accent": "José"}, {1: "non-string key"},
                    {"lone": "\ud800"}, {"b": 1, "a": {"d": [None, True], "c": "x"}}):
        assert fingerprint_of(payload) == _reference_fingerprint(payload)  # type: ignore[arg-type]


def test_a_client_change_dumps_to_no_floats_the_fast_fingerprint_would_write_differently() -> None:
    # orjson writes some floats differently from json.dumps (1e-05 vs 0.00001): the fast path relies
    # on a ClientChange having no float field. A new one must change fingerprint_of first.
    numbers: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "number":
                numbers.append(path)
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(ClientChange.model_json_schema(), "$")
    assert numbers == []


def test_a_known_change_keeps_its_fingerprint() -> None:
    # Pinned: a fingerprint written by an earlier release must still match after an upgrade.
    payload = ClientChange.model_validate(change("e-pin", "c-pin", name="Acme", email="ap@acme.test")
                                          ).model_dump(mode="json")
    assert fingerprint_of(payload) == _reference_fingerprint(payload)
    assert ClientChange.model_validate(payload).fingerprint() == fingerprint_of(payload)


@settings(max_examples=600, deadline=None)
@given(_JSON)
def test_masking_the_json_text_equals_masking_the_value_string_by_string(value: Any) -> None:
    # Equal as JSON values: two keys of one object that mask to the same text both stay in the
    # text, where `_masked`'s dict keeps the last; JSON's reading keeps the last as well.
    assert json.loads(_masked_json(orjson.dumps(value))) == json.loads(orjson.dumps(_masked(value)))


def test_masking_a_change_is_byte_for_byte_what_masking_its_value_writes() -> None:
    payload = ClientChange.model_validate(change("e-mask", "c-mask", name="Acme <ap@acme.test>", email="ap@acme.test",
                                                 notes='"quoted" bob@example.net\\ and \n tom@example.io')
                                          ).model_dump(mode="json")
    assert _masked_json(orjson.dumps([payload])) == orjson.dumps(_masked([payload]))


def test_masking_the_json_text_keeps_it_json_around_escapes_and_keys() -> None:
    value = {"notes": 'say "hi" to\\jane@example.com\nor "bob@example.net"',
             "ann.lee@example.org": ["\\\\", "x@y", "plain"], "email": "tom@example.io"}
    shown = _masked_json(orjson.dumps(value))
    assert json.loads(shown) == _masked(value)
    for email in ("jane@example.com", "bob@example.net", "ann.lee@example.org", "tom@example.io"):
        assert email.encode() not in shown


def test_the_message_body_is_the_arguments_as_they_were_given() -> None:
    args = [{"event_id": "e1", "client": {"email": "jane@example.com", "notes": 'a "quote" \\ é 😀'}}, "p"]
    kwargs = {"received_at": 1.5, "big": 2**70}  # orjson refuses the big integer: the standard library writes it
    message = json.loads(task_message("t", args, kwargs, queue="q", task_id="id-1"))
    assert json.loads(base64.b64decode(message["body"])) == [
        args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert "jane@example.com" not in message["headers"]["argsrepr"]
    assert json.loads(message["headers"]["argsrepr"]) == _masked(args)
    assert json.loads(message["headers"]["kwargsrepr"]) == kwargs
    assert message["headers"]["origin"].split("@")[0].isdigit()


def test_a_forked_child_writes_its_own_pid_as_the_messages_origin() -> None:
    import multiprocessing
    import os

    def origin() -> str:
        return str(json.loads(task_message("t", [], {}, queue="q", task_id="id"))["headers"]["origin"])

    assert origin().startswith(f"{os.getpid()}@")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child_pid, child_origin = pool.apply(_pid_and_origin)
    assert child_pid != os.getpid() and child_origin.startswith(f"{child_pid}@")


def _pid_and_origin() -> tuple[int, str]:
    import os

    return os.getpid(), str(json.loads(task_message("t", [], {}, queue="q", task_id="id"))["headers"]["origin"])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_uuid4_text_is_what_the_uuid_module_writes(raw: bytes) -> None:
    import uuid

    assert uuid4_text(raw) == str(uuid.UUID(bytes=raw, version=4))


async def test_each_queued_message_has_its_own_task_id_and_delivery_tag(r: aioredis.Redis) -> None:
    import uuid

    from worker.producer import Producer

    producer = Producer(r, queue="celery", event_ttl=60)
    for i in range(50):
        queued = await producer.enqueue(ClientChange.model_validate(change(f"e{i}", f"c-{i}")), received_at=1.0)
        assert queued.status == "queued"
    envelopes = [json.loads(raw) for raw in await r.lrange("celery", 0, -1)]
    ids = [e["headers"]["id"] for e in envelopes]
    tags = [e["properties"]["delivery_tag"] for e in envelopes]
    assert len(set(ids) | set(tags)) == 100
    assert all(uuid.UUID(v).version == 4 for v in ids + tags)


_NUMBERS = (st.integers() | st.integers(min_value=2**63 - 5, max_value=2**64 + 5)
            | st.integers(max_value=-(2**63) + 5, min_value=-(2**63) - 5)
            | st.floats(allow_nan=False, allow_infinity=False))
_ANSWER = st.recursive(st.none() | st.booleans() | _NUMBERS | _TEXT,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                       max_leaves=20)


@settings(max_examples=600, deadline=None)
@given(_ANSWER, st.booleans())
def test_a_provider_answer_reads_as_the_standard_library_reads_it(value: Any, spaced: bool) -> None:
    from worker.providers.base import _decode

    raw = json.dumps(value, separators=(", ", ": ") if spaced else (",", ":")).encode()
    decoded = _decode(raw)
    # the same values and the same types (an integer past 64 bits must stay an integer)
    assert json.dumps(decoded) == json.dumps(json.loads(raw))


def test_answers_orjson_reads_differently_or_refuses_take_the_standard_library() -> None:
    from worker.providers.base import _decode

    for raw in (b'{"id": 18446744073709551616}', b'[-9223372036854775809]', b'{"id": 123456789012345678901234}',
                b'{"x": NaN}', b'["\\ud800"]', b"[1e400]", b'{"phone": "12345678901234567890", "n": 1}'):
        assert json.dumps(_decode(raw)) == json.dumps(json.loads(raw)), raw
    assert _decode(b"<html>502 Bad Gateway</html>") == "<html>502 Bad Gateway</html>"
