"""A corpus of malformed queue entries, pushed raw onto the Redis list of real Celery workers.

Each bad entry is followed by a good change. Afterwards: the worker is the same process and
alive, every good change was applied at the sandbox, every bad entry is a dead letter with
the reason it broke, and the worker's log shows no full email address from any of them.
The first six entries each killed a worker on Celery/kombu 5.7 before `tasks.intake`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import redis

from tests.conftest import running_stack, uid
from tests.helpers import change, sandbox_clients, wait_jobs
from worker import keys
from worker.launcher import Stack
from worker.parking import TASK_KEY_LUA, apply_message, new_task_key
from worker.producer import task_message

IN = "invoice_ninja"
APPLY = "clientsync.apply_change"
SYNC = "clientsync.sync_client"


def good_envelope(task: str = SYNC, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None,
                  task_id: str | None = None) -> dict[str, Any]:
    """What the receiver pushes (Celery protocol v2), as a dict to break."""
    task_id = task_id or str(uuid.uuid4())
    return dict(json.loads(task_message(task, args if args is not None else [leaky()], kwargs or {},
                                        queue="celery", task_id=task_id)))


def leaky() -> dict[str, Any]:
    """A change carrying an email that must never reach a log line in full."""
    return change(uid("e-"), uid("c-"), email=f"leak.{uid()}@example.com")


def encode_body(payload: Any) -> str:
    return base64.b64encode(json.dumps(payload).encode()).decode()


def with_(mutate: Any, **env: Any) -> bytes:
    message = good_envelope(**env)
    mutate(message)
    return json.dumps(message).encode()


def header(name: str, value: Any) -> bytes:
    return with_(lambda m: m["headers"].__setitem__(name, value))


def without_header(name: str) -> bytes:
    return with_(lambda m: m["headers"].pop(name))


def prop(name: str, value: Any) -> bytes:
    return with_(lambda m: m["properties"].__setitem__(name, value))


def body(payload: Any) -> bytes:
    return with_(lambda m: m.__setitem__("body", encode_body(payload)))


DUPLICATE_ID = str(uuid.uuid4())


def corpus(task_key: bytes, known_job: tuple[str, dict[str, Any]]) -> list[tuple[str, bytes, str]]:
    """(name, raw entry, expected dead-letter reason)."""
    c = leaky()
    nested = "[" * 10_000 + "]" * 10_000
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    forged_job = keys.job_id(IN, c["event_id"])
    marked_unknown = json.loads(apply_message(forged_job, c, IN, 1, queue="celery", key=task_key))
    wrong_mark = json.loads(apply_message(forged_job, c, IN, 1, queue="celery", key=b"not the key"))
    known_id, known_change = known_job
    tampered = json.loads(apply_message(known_id, known_change, IN, 1, queue="celery", key=task_key))
    tampered["body"] = encode_body([[{**known_change, "client": {**known_change["client"], "name": "Evil"}}, IN],
                                    {"attempt": 1}, {}])
    return [
        # the six that killed a worker before
        ("body is a 2-element list", body([[c], {}]), "bad_body"),
        ("body is a 5-element list of garbage", body([1, "x", None, {}, []]), "bad_body"),
        ("timelimit not numeric", header("timelimit", ["soon", "later"]), "bad_header"),
        ("body not base64", with_(lambda m: m.__setitem__("body", "%%% not base64 leak.x@example.com %%%")),
         "bad_body"),
        ("entry is a JSON list", json.dumps([good_envelope()]).encode(), "bad_envelope"),
        ("entry is not JSON", b"hello leak.plain@example.com, not json", "not_json"),
        # the other findings of the issue
        ("envelope without properties", with_(lambda m: m.pop("properties")), "bad_envelope"),
        ("apply_change for an unknown provider", json.dumps(good_envelope(APPLY, [c, "evil"])).encode(),
         "unknown_provider"),
        # entries and encodings
        ("empty entry", b"", "not_json"),
        ("whitespace entry", b"   \n ", "not_json"),
        ("huge entry", json.dumps({**good_envelope(), "pad": "x" * 1_200_000}).encode(), "too_large"),
        ("latin-1 entry", "{\"body\": \"caf\u00e9\"}".encode("latin-1"), "bad_encoding"),
        ("utf-16 entry", json.dumps(good_envelope()).encode("utf-16"), "bad_encoding"),
        ("body is base64 of latin-1", with_(lambda m: m.__setitem__(
            "body", base64.b64encode("[[\"caf\u00e9\"], {}, {}]".encode("latin-1")).decode())), "bad_body"),
        ("body nested 10,000 levels", with_(lambda m: m.__setitem__(
            "body", base64.b64encode(nested.encode()).decode())), "bad_body"),
        ("content type pickle", with_(lambda m: m.__setitem__("content-type", "application/x-python-serialize")),
         "content_type"),
        ("content type yaml", with_(lambda m: m.__setitem__("content-type", "application/x-yaml")), "content_type"),
        ("content type missing", with_(lambda m: m.pop("content-type")), "content_type"),
        ("content encoding binary", with_(lambda m: m.__setitem__("content-encoding", "binary")), "bad_envelope"),
        # headers
        ("unknown task", header("task", "os.system"), "unknown_task"),
        ("task header missing", without_header("task"), "bad_header"),
        ("task header a number", header("task", 42), "bad_header"),
        ("id header missing", without_header("id"), "bad_header"),
        ("id header null", header("id", None), "bad_header"),
        ("headers a list", with_(lambda m: m.__setitem__("headers", [["task", SYNC]])), "bad_header"),
        ("retries a string (duplicate id 1)", with_(lambda m: m["headers"].update(retries="x", id=DUPLICATE_ID)),
         "bad_header"),
        ("eta not a time (duplicate id 2)", with_(lambda m: m["headers"].update(eta="tomorrow", id=DUPLICATE_ID)),
         "bad_header"),
        ("expires a number", header("expires", 12345), "bad_header"),
        ("timelimit of one element", header("timelimit", [1]), "bad_header"),
        ("ignore_result a string", header("ignore_result", "yes"), "bad_header"),
        ("group_index a string", header("group_index", "1"), "bad_header"),
        ("root_id a number", header("root_id", 7), "bad_header"),
        ("argsrepr an object", header("argsrepr", {"a": 1}), "bad_header"),
        ("header overwriting the request", header("is_eager", True), "bad_header"),
        ("expired message", header("expires", past), "expired"),
        # properties
        ("properties a string", with_(lambda m: m.__setitem__("properties", "x")), "bad_properties"),
        ("delivery_tag missing", with_(lambda m: m["properties"].pop("delivery_tag")), "bad_properties"),
        ("delivery_info missing", with_(lambda m: m["properties"].pop("delivery_info")), "bad_properties"),
        ("body_encoding plain", prop("body_encoding", "plain"), "bad_properties"),
        ("priority a string", prop("priority", "high"), "bad_properties"),
        # body shapes and arguments
        ("args an object", body([{"x": 1}, {}, {}]), "bad_body"),
        ("embed with callbacks", body([[c], {}, {"callbacks": [{"task": APPLY}]}]), "bad_body"),
        ("received_at a string", body([[c], {"received_at": "now"}, {}]), "bad_arguments"),
        ("apply_change of one argument", json.dumps(good_envelope(APPLY, [c])).encode(), "bad_arguments"),
        # internal tasks cannot be forged
        ("apply_change without a mark", json.dumps(good_envelope(APPLY, [c, IN])).encode(), "forged"),
        ("apply_change with a wrong mark", json.dumps(wrong_mark).encode(), "forged"),
        ("apply_change with a tampered change", json.dumps(tampered).encode(), "forged"),
        ("apply_change marked for a job not in the ledger", json.dumps(marked_unknown).encode(), "unknown_job"),
    ]


@pytest.fixture(scope="module")
def stack(redis_server_url: str) -> Iterator[Stack]:
    with running_stack(redis_server_url, providers=[IN], workers=1, concurrency=4) as s:
        yield s


def intake_dead_letters(client: redis.Redis) -> list[dict[str, str]]:
    ids = client.zrange(keys.jobs_of_provider_in_state("intake", "dead"), 0, -1)
    return [{k.decode(): v.decode() for k, v in client.hgetall(keys.job(i.decode())).items()} for i in ids]


async def test_no_queue_entry_kills_a_worker_and_each_bad_one_is_a_dead_letter(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    key = client.eval(TASK_KEY_LUA, 1, keys.TASK_KEY, new_task_key())
    # A job the ledger knows, so a tampered copy of its message is refused for its mark alone.
    known = change(uid("e-"), uid("c-"), name=uid("Known "))
    client.lpush("celery", task_message(SYNC, [{**known, "providers": [IN]}], {}, queue="celery",
                                        task_id=str(uuid.uuid4())))
    await wait_jobs(stack.redis_url, [keys.job_id(IN, known["event_id"])])
    worker = stack.procs["worker0"]
    pid = worker.pid

    cases = corpus(key, (keys.job_id(IN, known["event_id"]), {**known, "providers": [IN]}))
    assert len(cases) >= 30
    goods = []
    for _, entry, _ in cases:
        good = change(uid("e-"), uid("c-"), name=uid("After bad "))
        goods.append(good)
        # LPUSH, BRPOP: first in, first out; each bad entry is immediately followed by a good one.
        client.lpush("celery", entry, task_message(SYNC, [good], {}, queue="celery", task_id=str(uuid.uuid4())))

    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, g["event_id"]) for g in goods], timeout=180)
    assert {r["state"] for r in records.values()} == {"succeeded"}
    names = {c["name"] for c in await sandbox_clients(http, f"http://127.0.0.1:{stack.sandbox_port}/{IN}")}
    assert {g["client"]["name"] for g in goods} <= names

    deadline = time.monotonic() + 60
    while len(letters := intake_dead_letters(client)) < len(cases):
        assert time.monotonic() < deadline, f"{len(letters)} dead letters for {len(cases)} bad entries"
        time.sleep(0.2)
    assert Counter(letter["reason"] for letter in letters) == Counter(reason for _, _, reason in cases)
    for letter in letters:
        assert letter["state"] == "dead" and letter["provider"] == "intake"
        assert letter["last_error_class"] == letter["reason"] and letter["stage"] in letter["last_error"]
        assert not re.search(r"leak\.[0-9a-f]+@example\.com", letter["raw"])
    duplicates = [letter for letter in letters if letter.get("task_id") == DUPLICATE_ID]
    assert len(duplicates) == 2  # two entries with one id: two dead letters, neither lost
    counted = {k.decode(): int(v) for k, v in client.hgetall(keys.DEAD_LETTERS).items()}
    assert counted == dict(Counter(reason for _, _, reason in cases))

    # The same worker process ran all of it, and is still alive.
    assert worker.poll() is None and stack.procs["worker0"].pid == pid
    os.kill(pid, 0)
    log = (stack.log_dir / "worker0.log").read_text(errors="replace")  # type: ignore[operator]
    assert "Unrecoverable error" not in log
    assert not re.findall(r"leak\.[0-9a-f]+@example\.com", log)
    assert "leak.x@example.com" not in log and "leak.plain@example.com" not in log
    assert not re.findall(r"c-[0-9a-f]{12}@example\.com", log)  # nor the good changes' emails
    assert "c***@e***.com" in log  # (they are logged, masked)
