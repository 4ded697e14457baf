"""Status tells the truth: a worker that stopped cleanly is gone from /readyz and the summary at once;
a killed one stops counting as live once its heartbeat is stale, and /readyz names it."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis

from tests.conftest import clean_env
from worker import keys
from worker.launcher import Stack


def readyz(url: str) -> int:
    return readyz_body(url)[0]


def readyz_body(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def test_a_cleanly_stopped_worker_removes_its_heartbeat_and_readyz_says_not_ready(
        fresh_redis_url: str, tmp_path: Path) -> None:
    stack = Stack(env=clean_env(CLIENTSYNC_REDIS_URL=fresh_redis_url), log_dir=tmp_path / "logs")
    client = redis.Redis.from_url(fresh_redis_url)
    try:
        stack.ensure_secrets()
        stack.start_receiver()
        worker = stack.start_worker("worker0", concurrency=2)
        deadline = time.monotonic() + 60
        while not client.hlen(keys.HEARTBEATS) or readyz(stack.receiver_url) != 200:
            assert time.monotonic() < deadline, "the worker never became ready"
            time.sleep(0.1)
        os.killpg(worker.pid, signal.SIGTERM)  # a clean stop (Celery's warm shutdown)
        assert worker.wait(60) == 0
        # The process is gone: its heartbeat is gone with it (not 30 s later).
        assert client.hlen(keys.HEARTBEATS) == 0
        assert readyz(stack.receiver_url) == 503
    finally:
        client.close()
        stack.stop()


def test_a_killed_worker_stops_counting_once_its_heartbeat_is_stale_and_readyz_names_it(
        fresh_redis_url: str, tmp_path: Path) -> None:
    # one heartbeat a second: live within 2 s (the bound comes from the setting, not from the key's TTL)
    stack = Stack(env=clean_env(CLIENTSYNC_REDIS_URL=fresh_redis_url, CLIENTSYNC_HEARTBEAT_SECONDS="1"),
                  log_dir=tmp_path / "logs")
    client = redis.Redis.from_url(fresh_redis_url)
    try:
        stack.ensure_secrets()
        stack.start_receiver()
        worker = stack.start_worker("worker0", concurrency=2)
        deadline = time.monotonic() + 60
        while (answer := readyz_body(stack.receiver_url))[0] != 200:
            assert time.monotonic() < deadline, f"the worker never became ready: {answer}"
            time.sleep(0.1)
        [name] = answer[1]["workers"]  # host:pid:random of the worker process
        assert name.split(":")[1] == str(worker.pid)
        [beat] = answer[1]["heartbeats"]
        assert beat["worker"] == name and beat["live"] is True and beat["live_within_seconds"] == 2

        stack.kill("worker0")  # SIGKILL: nothing runs at exit, the heartbeat stays in Redis
        deadline = time.monotonic() + 60
        while (answer := readyz_body(stack.receiver_url))[0] != 503:
            assert time.monotonic() < deadline, f"a killed worker still counts as live: {answer}"
            time.sleep(0.2)
        body = answer[1]
        assert body["workers"] == [] and body["redis"] == "ok"
        [missing] = body["missing"]
        assert name in missing and "last heartbeat" in missing
        # stale, not expired: the heartbeat is still there, listed as not live
        assert [(b["worker"], b["live"]) for b in body["heartbeats"]] == [(name, False)]
        assert body["heartbeats"][0]["age_seconds"] >= 2
        assert client.hexists(keys.HEARTBEATS, name)
    finally:
        client.close()
        stack.stop()


def test_flower_sees_readable_arguments_with_emails_masked() -> None:
    import base64
    import json

    from worker.producer import task_message

    change = {"event_id": "evt-flower-1", "client": {"id": "c-1", "email": "jane.doe@example.com"}}
    message = json.loads(task_message("clientsync.sync_client", [change], {"attempt": 2}, queue="celery",
                                      task_id="t-1"))
    headers = message["headers"]
    assert "evt-flower-1" in headers["argsrepr"] and "c-1" in headers["argsrepr"]
    assert "jane.doe@example.com" not in headers["argsrepr"] and "@" in headers["argsrepr"]
    assert json.loads(headers["kwargsrepr"]) == {"attempt": 2}
    # the body (what the worker runs) keeps the real change
    body = json.loads(base64.b64decode(message["body"]))
    assert body[0] == [change]


def test_flower_arguments_mask_emails_wherever_they_are_in_the_arguments() -> None:
    import json

    from worker.producer import task_message

    change = {"client": {"notes": "call jane.doe@example.com\nor bob@example.net"},
              "by.email@example.com": ["x", 1, 2.5, None, True, ["tom@example.io"]]}
    message = json.loads(task_message("clientsync.sync_client", [change], {"by": "ann.lee@example.org"},
                                      queue="celery", task_id="t-2"))
    shown = message["headers"]["argsrepr"] + message["headers"]["kwargsrepr"]
    for email in ("jane.doe@example.com", "bob@example.net", "by.email@example.com", "tom@example.io",
                  "ann.lee@example.org"):
        assert email not in shown
    assert json.loads(message["headers"]["argsrepr"]) == [{
        "client": {"notes": "call j***@e***.com\nor b***@e***.net"},
        "b***@e***.com": ["x", 1, 2.5, None, True, ["t***@e***.io"]]}]
