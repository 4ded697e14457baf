"""Fixtures for adapter tests: a real sandbox server on loopback and adapters pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from worker.providers import adapter_class
from worker.providers.base import ProviderAdapter
from worker.sandbox.base import Faults
from worker.sandbox.server import RunningSandbox, start_sandbox

StartSandbox = Callable[..., Awaitable[RunningSandbox]]


@pytest.fixture
async def start() -> AsyncIterator[StartSandbox]:
    """Factory: `await start(["qonto"], faults={"qonto": Faults(...)})` -> a running sandbox."""
    running: list[RunningSandbox] = []

    async def _start(names: list[str], faults: dict[str, Faults] | None = None) -> RunningSandbox:
        sb = await start_sandbox(names=names, faults=faults)
        running.append(sb)
        return sb

    yield _start
    for sb in running:
        await sb.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def make_adapter(
    name: str,
    sandbox: RunningSandbox,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    **overrides: object,
) -> ProviderAdapter:
    """The adapter for `name`, configured from the sandbox's env exactly as a user would."""
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    cls = adapter_class(name)
    config = cls.settings_class(**overrides)
    assert config.is_configured(), config.missing()
    return cls(config, session)
