"""The `clientsync` command as a user runs it: a real subprocess, real Redis."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import REPO, clean_env
from worker.models import ClientChange


def clientsync(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], input=stdin, capture_output=True, text=True,
                          env=clean_env(**env), timeout=60, cwd=REPO)


def test_schema_prints_the_published_json_schema() -> None:
    out = clientsync("schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["title"] == "ClientChange"
    assert set(schema["required"]) == {"event_id", "occurred_at", "action", "client"}
    assert schema["properties"]["action"]["enum"] == ["upsert", "delete"]


def test_the_readme_example_is_a_valid_change() -> None:
    ClientChange.model_validate_json((REPO / "examples" / "change.json").read_text())


def test_send_enqueues_a_valid_change_once(fresh_redis_url: str) -> None:
    first = clientsync("send", "examples/change.json", CLIENTSYNC_REDIS_URL=fresh_redis_url)
    again = clientsync("send", "-", stdin=(REPO / "examples" / "change.json").read_text(),
                       CLIENTSYNC_REDIS_URL=fresh_redis_url)
    assert (first.returncode, again.returncode) == (0, 0), first.stderr
    assert first.stdout.strip().endswith("queued") and again.stdout.strip().endswith("duplicate")
    [message] = redis.Redis.from_url(fresh_redis_url).lrange("celery", 0, -1)
    args = json.loads(base64.b64decode(json.loads(message)["body"]))[0]
    assert args[0]["event_id"] == "evt-2026-11-21-0001"


def test_send_names_every_invalid_field_and_exits_2(tmp_path: Path, fresh_redis_url: str) -> None:
    bad = json.loads((REPO / "examples" / "change.json").read_text())
    bad["occurred_at"] = "2026-11-21T09:30:00"  # no offset
    bad["client"]["billing_address"]["country"] = "France"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    out = clientsync("send", str(path), CLIENTSYNC_REDIS_URL=fresh_redis_url)
    assert out.returncode == 2
    assert "occurred_at" in out.stderr and "timezone" in out.stderr
    assert "client.billing_address.country" in out.stderr and "alpha-2" in out.stderr
    assert "Traceback" not in out.stderr
    assert redis.Redis.from_url(fresh_redis_url).llen("celery") == 0


def test_send_reports_unreadable_and_non_json_input(tmp_path: Path, fresh_redis_url: str) -> None:
    missing = clientsync("send", str(tmp_path / "nope.json"), CLIENTSYNC_REDIS_URL=fresh_redis_url)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    garbage = clientsync("send", "-", stdin="{oops", CLIENTSYNC_REDIS_URL=fresh_redis_url)
    assert garbage.returncode == 2 and "not valid JSON" in garbage.stderr


def test_commands_that_need_redis_say_which_setting_is_missing() -> None:
    out = clientsync("send", "examples/change.json")
    assert out.returncode == 2 and "CLIENTSYNC_REDIS_URL" in out.stderr


def test_a_bad_setting_is_named_with_its_env_var() -> None:
    out = clientsync("send", "examples/change.json", CLIENTSYNC_REDIS_URL="redis://x", CLIENTSYNC_PORT="http")
    assert out.returncode == 2 and "CLIENTSYNC_PORT" in out.stderr


def test_version_and_provider_names_validated_against_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    from worker.cli import build_parser
    from worker.models import PROVIDER_NAMES

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"clientsync {importlib.metadata.version('clientsync')}"
    for argv in (["jobs", "--provider", "quonto"], ["replay", "--all-dead", "--provider", "quonto"],
                 ["provider", "pause", "quonto"], ["check", "--provider", "quonto"], ["link", "--provider", "quonto"]):
        with pytest.raises(SystemExit) as bad:
            build_parser().parse_args(argv)
        assert bad.value.code == 2
        err = capsys.readouterr().err
        assert "invalid choice: 'quonto'" in err and all(name in err for name in PROVIDER_NAMES), argv
    assert build_parser().parse_args(["jobs", "--provider", "qonto"]).provider == "qonto"
    # dead letters are the provider `intake` (README, "Poison-proof intake")
    assert build_parser().parse_args(["jobs", "--provider", "intake"]).provider == "intake"
