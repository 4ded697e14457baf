"""Configuration an operator can trust: refused at start-up when wrong, checked against each provider.

- `validate_config()` builds every settings model (the process-wide `Settings` and each
  provider's config) and raises one `SettingsError` naming every bad variable and its rule.
  `clientsync serve`, `worker` and `run` call it before starting anything.
- `clientsync check` makes one authenticated, read-only call (the first page of clients)
  to each enabled provider and says per provider: ok / wrong credentials (which variable) /
  unreachable.
- `env_template()` is `.env.example`: every `CLIENTSYNC_*` setting, derived from the models.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings

from worker.errors import AuthError, ProviderError, TransientError
from worker.providers import REGISTRY, adapter_class
from worker.providers.base import ProviderAdapter, ProviderConfig
from worker.settings import Settings, SettingsError, describe_errors, env_name


def settings_models() -> dict[str, type[BaseSettings]]:
    """Every settings model: the process-wide one, then one per registered provider."""
    models: dict[str, type[BaseSettings]] = {"clientsync": Settings}
    for name in REGISTRY:
        models[name] = adapter_class(name).settings_class
    return models


def setting_names() -> list[str]:
    """Every `CLIENTSYNC_*` variable the settings models read."""
    return [env_name(model, field) for model in settings_models().values() for field in model.model_fields]


def validate_config() -> tuple[Settings, dict[str, ProviderConfig]]:
    """Build every settings model from the environment, or raise naming each bad variable."""
    problems: list[str] = []
    built: dict[str, Any] = {}
    for name, model in settings_models().items():
        try:
            built[name] = model()
        except ValidationError as exc:
            problems += describe_errors(model, exc)
    if problems:
        raise SettingsError("invalid configuration:\n" + "\n".join(f"  {line}" for line in problems))
    settings = built.pop("clientsync")
    return settings, built


def credential_variables(config: ProviderConfig) -> list[str]:
    """The secret variables a provider's config has set (what to fix on a 401/403)."""
    model = type(config)
    return [env_name(model, field) for field, info in model.model_fields.items()
            if "SecretStr" in repr(info.annotation) and isinstance(getattr(config, field), SecretStr)]


def why_disabled(configs: dict[str, ProviderConfig]) -> dict[str, str]:
    """Disabled provider -> what to set to enable it."""
    return {name: cfg.missing() for name, cfg in configs.items() if not cfg.is_configured()}


# --- clientsync check -------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    provider: str
    verdict: Literal["ok", "wrong credentials", "unreachable", "error", "disabled"]
    detail: str = ""


async def check_provider(adapter: ProviderAdapter) -> CheckResult:
    """One authenticated, read-only call: the first page of the provider's clients."""
    pages = adapter.list(page_size=1)
    try:
        await anext(pages, None)
    except AuthError as exc:
        names = " or ".join(credential_variables(adapter.config)) or "the credentials"
        return CheckResult(adapter.name, "wrong credentials",
                           f"{adapter.base_url} answered {exc.status}: check {names}")
    except TransientError as exc:
        if exc.status is not None and exc.status < 500:
            return CheckResult(adapter.name, "ok", f"reachable, but answered {exc.status}: {exc}")
        return CheckResult(adapter.name, "unreachable", f"{adapter.base_url}: {exc}")
    except ProviderError as exc:
        return CheckResult(adapter.name, "error", f"{adapter.base_url} answered {exc.status}: {exc}")
    finally:
        await pages.aclose()  # type: ignore[attr-defined]
    return CheckResult(adapter.name, "ok", f"{adapter.base_url}: credentials accepted")


async def check_providers(configs: dict[str, ProviderConfig]) -> list[CheckResult]:
    """Check every enabled provider at once; disabled ones say what to set."""
    async with aiohttp.ClientSession(headers={"User-Agent": "clientsync-check"}) as session:
        enabled = {n: c for n, c in configs.items() if c.is_configured()}
        checked = await asyncio.gather(*(check_provider(adapter_class(n)(c, session)) for n, c in enabled.items()))
    by_name = {r.provider: r for r in checked}
    for name, why in why_disabled(configs).items():
        by_name[name] = CheckResult(name, "disabled", why)
    return [by_name[name] for name in configs]


def cmd_check(args: argparse.Namespace) -> int:
    _, configs = validate_config()
    if args.provider:
        configs = {args.provider: configs[args.provider]}
    results = asyncio.run(check_providers(configs))
    for result in results:
        print(f"{result.provider:16} {result.verdict:18} {result.detail}")
    sys.stdout.flush()
    bad = [r for r in results if r.verdict not in ("ok", "disabled")]
    enabled = [r for r in results if r.verdict != "disabled"]
    return 1 if bad or not enabled else 0


def register(sub: Any) -> None:
    from worker.cli import add_provider_argument

    p = sub.add_parser("check", help="validate the configuration and call each enabled provider once (read-only)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_provider_argument(p, "--provider", help="check only this provider")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("env-template", help="print .env.example: every CLIENTSYNC_* setting with its default")
    p.set_defaults(func=lambda _args: print(env_template()) or 0)


# --- .env.example -----------------------------------------------------------------------------
def _default(model: type[BaseModel], field: str) -> str:
    info = model.model_fields[field]
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def env_template() -> str:
    """`.env.example`: every setting, empty (= its default), with its description and default."""
    out = [
        "# clientsync settings for docker compose (`cp .env.example .env`, then fill in what you need).",
        "# Generated from the settings models (worker/check.py: env_template); a test keeps it in sync.",
        "# An empty value means unset: the default applies, and no provider is enabled by an empty value.",
        "# Any variable can instead be read from a file: CLIENTSYNC_<NAME>_FILE=/run/secrets/<name>.",
        "# CLIENTSYNC_REDIS_URL, _WEBHOOK_SECRET and _MONITOR_TOKEN are set by docker-compose.yml.",
        "",
    ]
    for name, model in settings_models().items():
        title = "process-wide" if model is Settings else f"provider {name}"
        out.append(f"# --- {title} ---")
        if model is not Settings:
            probe = model.model_construct()  # defaults only, whatever this shell's environment holds
            assert isinstance(probe, ProviderConfig)
            out.append(f"# Enabled when: {probe.missing()}")
        for field, info in model.model_fields.items():
            description = (info.description or "").strip()
            note = f"{description} " if description else ""
            out.append(f"# {note}(default: {_default(model, field)})")
            out.append(f"{env_name(model, field)}=")
        out.append("")
    return "\n".join(out)
