"""The CLI and logs as operators expect them: help with defaults and choices on every subcommand,
tables that wrap instead of cutting, `send --webhook` signing with the configured secret, the
README's signing snippets working as printed, and `CLIENTSYNC_LOG_FORMAT=json`."""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import REPO, clean_env, running_stack, uid
from tests.helpers import change, post_webhook, wait_jobs
from worker import keys
from worker.cli import build_parser, main
from worker.launcher import Stack
from worker.logjson import JsonFormatter
from worker.logsafe import Masker
from worker.monitor_cli import table

README = (REPO / "README.md").read_text()


def subparsers(parser: argparse.ArgumentParser,
               path: str = "clientsync") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield f"{path} {name}", child
                yield from subparsers(child, f"{path} {name}")


# --- help ---------------------------------------------------------------------------------------------
def test_every_subcommand_documents_every_option_and_shows_its_default() -> None:
    found = list(subparsers(build_parser()))
    assert len(found) >= 15
    for name, parser in found:
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in help_text, (name, action.dest)


def test_help_shows_defaults_and_choices_and_bad_choices_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 8080)" in out and "{auto,always,never}" in out and "(default: auto)" in out
    with pytest.raises(SystemExit) as done:
        main(["jobs", "--state", "deadish"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--state" in err and "needs_attention" in err


# --- tables -------------------------------------------------------------------------------------------
def test_tables_wrap_long_cells_to_the_width_and_keep_every_character() -> None:
    message = "validation: " + " ".join(f"field{i} must be a valid value" for i in range(12))
    job = "lsp_expert:" + "e" * 90
    out = table(["job", "state", "last error"], [(job, "dead", message), ("qonto:e2", "succeeded", "created")],
                width=80)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in out
    state_at, error_at = lines[0].index("STATE"), lines[0].index("LAST ERROR")
    body = lines[2:]
    second = next(i for i, line in enumerate(body) if line.startswith("qonto:e2"))
    first_row = body[:second]
    assert len(first_row) > 1  # the long cells went onto more lines, not cut
    # each column keeps its offset on every line of the row, and all its text
    assert "".join(line[:state_at].strip() for line in first_row) == job
    assert first_row[0][state_at:error_at].strip() == "dead"
    assert " ".join(line[error_at:].strip() for line in first_row if line[error_at:].strip()) == message
    assert body[second].split() == ["qonto:e2", "succeeded", "created"]


# --- send --webhook ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def receiver(redis_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis.Redis.from_url(redis_server_url).flushdb()
    stack = Stack(env=clean_env(CLIENTSYNC_REDIS_URL=redis_server_url), log_dir=tmp_path_factory.mktemp("logs"))
    try:
        stack.ensure_secrets()
        stack.start_receiver()
        yield stack
    finally:
        stack.stop()


def _change_file(tmp_path: Path, event_id: str) -> Path:
    path = tmp_path / "change.json"
    path.write_text(json.dumps(change(event_id, uid("client-"), email="jane.doe@example.com")))
    return path


def test_send_webhook_signs_with_the_configured_secret_posts_and_prints_the_answer(
        receiver: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CLIENTSYNC_WEBHOOK_SECRET", receiver.env["CLIENTSYNC_WEBHOOK_SECRET"])
    monkeypatch.delenv("CLIENTSYNC_REDIS_URL", raising=False)  # the webhook path needs no Redis of its own
    event_id = uid("evt-")
    path = _change_file(tmp_path, event_id)
    assert main(["send", "--webhook", receiver.receiver_url, str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{event_id}: HTTP 202") and '"queued"' in out
    assert redis.Redis.from_url(receiver.redis_url).exists(keys.event(event_id))
    # the same change again: the receiver's answer, printed as is
    assert main(["send", "--webhook", f"{receiver.receiver_url}/webhooks/clients", str(path)]) == 0
    assert "HTTP 200" in capsys.readouterr().out


def test_send_webhook_with_a_wrong_secret_prints_the_401_and_fails(
        receiver: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CLIENTSYNC_WEBHOOK_SECRET", "whsec_d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA==")
    event_id = uid("evt-")
    assert main(["send", "--webhook", receiver.receiver_url, str(_change_file(tmp_path, event_id))]) == 1
    assert "HTTP 401" in capsys.readouterr().out
    assert not redis.Redis.from_url(receiver.redis_url).exists(keys.event(event_id))


def test_send_webhook_refuses_a_bad_url_a_missing_secret_and_an_invalid_change_before_posting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = _change_file(tmp_path, uid("evt-"))
    monkeypatch.delenv("CLIENTSYNC_WEBHOOK_SECRET", raising=False)
    assert main(["send", "--webhook", "http://127.0.0.1:9", str(path)]) == 2
    assert "CLIENTSYNC_WEBHOOK_SECRET is not set" in capsys.readouterr().err
    monkeypatch.setenv("CLIENTSYNC_WEBHOOK_SECRET", "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
    assert main(["send", "--webhook", "127.0.0.1:8080", str(path)]) == 2
    assert "--webhook: must be an http(s) URL" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"event_id": "e1", "action": "upsert", "client": {"id": "c1", "name": "x"}}))
    assert main(["send", "--webhook", "http://127.0.0.1:9", str(bad)]) == 2
    assert "occurred_at" in capsys.readouterr().err


# --- the README's signing snippets ---------------------------------------------------------------------
def _block(language: str, marker: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, re.S)
    return next(b for b in blocks if marker in b)


def _sent_by_snippet(code: str, receiver: Stack, runner: list[str], *, secret_line: str) -> str:
    secret = receiver.env["CLIENTSYNC_WEBHOOK_SECRET"]
    event_id = uid("evt-")
    code = code.replace(secret_line, secret_line.replace("whsec_...", secret))
    code = code.replace("http://127.0.0.1:8080", receiver.receiver_url)
    code = re.sub(r"evt-(python|curl)-0001", event_id, code)
    assert secret in code and receiver.receiver_url in code and event_id in code
    result = subprocess.run([*runner, code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert redis.Redis.from_url(receiver.redis_url).exists(keys.event(event_id))
    return result.stdout


def test_the_readmes_python_signing_example_is_accepted_by_the_receiver(receiver: Stack) -> None:
    out = _sent_by_snippet(_block("python", 'SECRET = "whsec_..."'), receiver, [sys.executable, "-c"],
                           secret_line='SECRET = "whsec_..."')
    assert out.startswith("202") and '"queued"' in out


def test_the_readmes_curl_and_openssl_signing_example_is_accepted_by_the_receiver(receiver: Stack) -> None:
    out = _sent_by_snippet(_block("sh", "SECRET='whsec_...'"), receiver, ["bash", "-c"],
                           secret_line="SECRET='whsec_...'")
    assert '"queued"' in out


def test_the_readme_example_and_examples_change_json_have_distinct_event_ids() -> None:
    example = json.loads((REPO / "examples" / "change.json").read_text())["event_id"]
    readme = json.loads(_block("json", '"event_id"'))["event_id"]
    assert example != readme


# --- JSON logs -----------------------------------------------------------------------------------------
def test_the_json_formatter_writes_one_object_with_the_bound_fields_masked() -> None:
    formatter = JsonFormatter(Masker(["s3cr3t-token-value"]))
    fields = {"outcome": "dead", "event_id": "e1", "provider": "qonto", "attempt": 3, "client": "c1",
              "email": "jane.doe@example.com", "message": "token s3cr3t-token-value refused", "level": "x"}
    record = logging.LogRecord("clientsync.jobs", logging.ERROR, __file__, 1, "%s %s", ("dead", fields), None)
    record.fields = fields
    try:
        raise ValueError("boom for jane.doe@example.com")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "error" and data["logger"] == "clientsync.jobs" and data["time"].endswith("Z")
    assert (data["outcome"], data["event_id"], data["provider"], data["attempt"], data["client"]) == (
        "dead", "e1", "qonto", 3, "c1")
    assert data["field_level"] == "x"  # a field never overwrites the record's own keys
    assert "jane.doe@example.com" not in line and data["email"].startswith("j***@")
    assert "s3cr3t-token-value" not in line and "ValueError" in data["exc"]


def test_with_log_format_json_the_worker_and_receiver_write_json_lines_with_event_provider_and_attempt(
        redis_server_url: str) -> None:
    import asyncio

    import aiohttp

    provider = "lsp_expert"
    with running_stack(redis_server_url, providers=[provider], CLIENTSYNC_LOG_FORMAT="json") as stack:
        event_id, client_id = uid("evt-"), uid("client-")

        async def go() -> None:
            async with aiohttp.ClientSession() as http:
                assert await post_webhook(http, stack.receiver_url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"],
                                          change(event_id, client_id, email="jane.doe@example.com")) == 202
            job_id = keys.job_id(provider, event_id)
            assert (await wait_jobs(stack.redis_url, [job_id], timeout=60))[job_id]["state"] == "succeeded"

        asyncio.run(go())
        log_file = stack.log_dir / "worker0.log"
        deadline = time.monotonic() + 30
        applied: list[dict[str, object]] = []
        while not applied and time.monotonic() < deadline:
            lines = [json.loads(line) for line in log_file.read_text().splitlines()
                     if line.startswith("{") and event_id in line]
            applied = [d for d in lines if d.get("outcome") == "applied"]
            time.sleep(0.2)
        assert applied, log_file.read_text()[-2000:]
        line = applied[0]
        assert (line["event_id"], line["provider"], line["attempt"], line["client"]) == (
            event_id, provider, 1, client_id)
        assert line["email"] == "j***@e***.com" and line["logger"] == "clientsync.jobs"
        worker_text = log_file.read_text()
        assert "jane.doe@example.com" not in worker_text
        # no log record in the text format (Celery's start-up banner is printed, not logged)
        assert not re.search(r"^\[\d{4}-\d\d-\d\d [^]]*: (INFO|WARNING|ERROR)/", worker_text, re.M)
        received = [json.loads(line) for line in (stack.log_dir / "receiver.log").read_text().splitlines()
                    if event_id in line]
        assert received and all(d["logger"].startswith("clientsync") for d in received)
