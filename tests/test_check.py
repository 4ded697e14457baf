"""Bad configuration stops start-up naming the variable and rule; `clientsync check` calls each provider."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from tests.conftest import clean_env
from worker.check import check_providers, settings_models, validate_config
from worker.cli import main
from worker.sandbox.server import RunningSandbox, start_sandbox
from worker.settings import Settings, SettingsError, env_name

PROVIDER_MODELS = [m for m in settings_models().values() if m is not Settings]


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [k for k in os.environ if k.startswith("CLIENTSYNC_")]:
        monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("model", PROVIDER_MODELS, ids=lambda m: m.__name__)
def test_a_bad_per_provider_setting_is_refused_naming_the_variable_and_rule(
        model: type, no_settings: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    variable = env_name(model, "timeout")
    no_settings.setenv(variable, "-1")
    no_settings.setenv("CLIENTSYNC_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached
    for command in (["serve"], ["worker"], ["run"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{variable}: Input should be greater than 0 (got '-1')" in err, command


def test_every_bad_setting_is_listed_at_once_and_secrets_are_not_echoed(no_settings: pytest.MonkeyPatch) -> None:
    no_settings.setenv("CLIENTSYNC_PORT", "eighty")
    no_settings.setenv("CLIENTSYNC_WEBHOOK_SECRET", "not-a-whsec-secret")
    no_settings.setenv("CLIENTSYNC_GROW_CRM_RATE_LIMIT", "0")
    with pytest.raises(SettingsError) as caught:
        validate_config()
    text = str(caught.value)
    assert "CLIENTSYNC_PORT: Input should be a valid integer" in text
    assert "CLIENTSYNC_GROW_CRM_RATE_LIMIT: Input should be greater than or equal to 1 (got '0')" in text
    assert "CLIENTSYNC_WEBHOOK_SECRET: Value error, each secret must start with 'whsec_'" in text
    assert "not-a-whsec-secret" not in text


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_the_real_worker_and_receiver_processes_exit_non_zero_on_a_bad_setting(command: str) -> None:
    env = clean_env(CLIENTSYNC_QONTO_TIMEOUT="-1", CLIENTSYNC_QONTO_TOKEN="t",
                    CLIENTSYNC_REDIS_URL="redis://127.0.0.1:1/0")
    proc = subprocess.run([sys.executable, "-m", "worker", command], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    assert "CLIENTSYNC_QONTO_TIMEOUT: Input should be greater than 0 (got '-1')" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
async def sandbox(no_settings: pytest.MonkeyPatch) -> AsyncIterator[RunningSandbox]:
    sb = await start_sandbox()
    for key, value in sb.env().items():
        no_settings.setenv(key, value)
    yield sb
    await sb.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_check_says_ok_for_every_provider_with_the_sandbox_credentials(sandbox: RunningSandbox) -> None:
    _, configs = validate_config()
    results = await check_providers(configs)
    assert [(r.provider, r.verdict) for r in results] == [(name, "ok") for name in configs]
    # each check was one authenticated read at the provider
    for name, sim in sandbox.simulators.items():
        assert [(c.method, c.status) for c in sim.calls] == [("GET", 200)], name


async def test_check_names_the_wrong_credential_and_the_unreachable_provider(
        sandbox: RunningSandbox, no_settings: pytest.MonkeyPatch) -> None:
    no_settings.setenv("CLIENTSYNC_QONTO_SECRET_KEY", "wrong")
    no_settings.setenv("CLIENTSYNC_INVOICE_NINJA_TOKEN", "wrong")
    no_settings.setenv("CLIENTSYNC_GROW_CRM_URL", f"http://127.0.0.1:{_closed_port()}/grow_crm")
    no_settings.delenv("CLIENTSYNC_LSP_EXPERT_API_KEY")
    _, configs = validate_config()
    by_name = {r.provider: r for r in await check_providers(configs)}
    assert by_name["qonto"].verdict == "wrong credentials" and "CLIENTSYNC_QONTO_SECRET_KEY" in by_name["qonto"].detail
    assert by_name["invoice_ninja"].verdict == "wrong credentials"
    assert "CLIENTSYNC_INVOICE_NINJA_TOKEN" in by_name["invoice_ninja"].detail
    assert by_name["grow_crm"].verdict == "unreachable"
    assert by_name["request_finance"].verdict == "ok"
    assert by_name["lsp_expert"].verdict == "disabled"
    assert "CLIENTSYNC_LSP_EXPERT_API_KEY" in by_name["lsp_expert"].detail


async def test_the_check_command_exits_non_zero_when_a_provider_fails(
        sandbox: RunningSandbox, no_settings: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    assert await asyncio.to_thread(main, ["check"]) == 0
    assert capsys.readouterr().out.count(" ok ") == len(sandbox.simulators)
    no_settings.setenv("CLIENTSYNC_QONTO_SECRET_KEY", "wrong")
    assert await asyncio.to_thread(main, ["check", "--provider", "qonto"]) == 1
    out = capsys.readouterr().out
    assert "qonto" in out and "wrong credentials" in out and "CLIENTSYNC_QONTO_SECRET_KEY" in out
