"""Fixtures for adapter tests: a real sandbox server on loopback and adapters pointed at it, and
`unclear_write`, which ends one write unclearly and waits until it has landed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tests.helpers import wait_for
from worker.errors import NotFound, ProviderError, ProviderUnavailable
from worker.providers import adapter_class
from worker.providers.base import ProviderAdapter
from worker.sandbox.base import Faults, SandboxProvider
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


# --- the three unclear endings of a write (tests.helpers.ENDINGS) ----------------------------
def resent(sim: SandboxProvider, method: str) -> int | None:
    """aiohttp re-sends an idempotent request (PUT, DELETE) once when a reused keep-alive
    connection drops (RFC 9112 section 9.3.1.1). If the one dropped write (status 0 in the call
    log) was a `method` and exactly one copy of it (same method and path) followed, the status
    that copy got; else None."""
    dropped = [i for i, c in enumerate(sim.calls) if c.status == 0]
    if len(dropped) != 1 or sim.calls[dropped[0]].method != method:
        return None
    first = sim.calls[dropped[0]]
    copies = [c for c in sim.calls[dropped[0] + 1 :] if c.method == method and c.path == first.path]
    return copies[0].status if len(copies) == 1 else None


async def unclear_write(
    sim: SandboxProvider,
    ending: str,
    match: str,
    call: Callable[[], Awaitable[object]],
    landed: Callable[[], bool],
) -> ProviderError | None:
    """Arm `ending` (one of ENDINGS) on the next write whose "METHOD /path" contains `match`, run
    `call`, then wait until `landed()` says the write is there (at once, or late).

    The call ends in one of these, anything else fails the test:
    - a ProviderUnavailable that is `.unclear` (the 5xx, the dropped connection, the timeout);
    - only for drop_after_commit_next, when the call log shows aiohttp re-sent the dropped
      request (`resent`): a clear answer (the copy of a PUT got 200; of a DELETE, 200, or 404
      that the adapter counts as done, e.g. a contact already gone), or NotFound (the copy of
      a DELETE found the record gone: 404).
    Returns the error raised (None for a clear answer), for tests that accept less."""
    sim.faults.hang_seconds = 1.0
    sim.faults.write_match = match
    setattr(sim.faults, ending, 1)
    outcome: ProviderError | None = None
    try:
        await call()
    except (ProviderUnavailable, NotFound) as exc:
        outcome = exc
    if isinstance(outcome, ProviderUnavailable):
        assert outcome.unclear, "a 5xx/drop/timeout after a write is unclear"
    elif isinstance(outcome, NotFound):
        assert ending == "drop_after_commit_next" and resent(sim, "DELETE") == 404, (
            f"NotFound only from a re-sent DELETE that found the record gone; calls: {sim.calls}")
    else:
        assert ending == "drop_after_commit_next" and (
            resent(sim, "PUT") == 200 or resent(sim, "DELETE") in (200, 404)
        ), f"a clear answer only from aiohttp's re-send of a dropped PUT/DELETE; calls: {sim.calls}"
    await wait_for(landed, "the unclear write to land")
    sim.faults.write_match = ""
    return outcome
