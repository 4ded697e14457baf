"""docker-compose.yml cannot run here (no Docker engine); check it against the real entry points."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path
from typing import Any

import yaml

from worker.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_redis_persists_with_aof_on_a_volume() -> None:
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_receiver_worker_and_sandbox_exist_with_the_sandbox_under_a_profile() -> None:
    services = compose()["services"]
    assert {"redis", "receiver", "worker", "sandbox"} <= set(services)
    assert services["sandbox"]["profiles"] == ["sandbox"]
    for name in ("receiver", "worker", "sandbox"):
        assert services[name]["image"] == "clientsync:latest" and services[name]["build"] == "."


def test_every_clientsync_command_parses_with_the_real_cli() -> None:
    for name, service in compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "clientsync":
            continue
        args = build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown option
        assert callable(args.func), name


def test_the_flower_service_points_at_the_real_celery_app() -> None:
    command = compose()["services"]["flower"]["command"]
    assert command[:3] == ["celery", "-A", "tasks.app"] and "flower" in command
    module = importlib.import_module("tasks.app")
    assert module.app.main == "clientsync"


def test_services_share_the_redis_url_and_the_required_secrets() -> None:
    services = compose()["services"]
    for name in ("receiver", "worker"):
        env = services[name]["environment"]
        assert env["CLIENTSYNC_REDIS_URL"] == "redis://redis:6379/0"
        assert "CLIENTSYNC_WEBHOOK_SECRET" in env and "CLIENTSYNC_MONITOR_TOKEN" in env


def test_the_dockerfile_default_command_is_a_real_entry_point() -> None:
    cmd_line = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("CMD"))
    argv = yaml.safe_load(cmd_line[len("CMD"):])
    assert argv[0] == "clientsync"
    build_parser().parse_args(argv[1:])
    assert shlex.join(argv)
