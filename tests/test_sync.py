"""The use case without Celery: apply_change against sandboxes over HTTP and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.helpers import change, minutes_ago
from worker.errors import IdempotencyConflict, LocalValidationError, PermanentError
from worker.models import ClientChange
from worker.providers import adapter_class
from worker.providers.base import ProviderAdapter
from worker.sandbox.server import RunningSandbox, start_sandbox
from worker.store import SyncStore
from worker.sync import apply_change


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    sb = await start_sandbox(names=["invoice_ninja", "request_finance", "qonto"])
    yield sb
    await sb.stop()


@pytest.fixture
async def store(fresh_redis_url: str) -> AsyncIterator[SyncStore]:
    client = aioredis.from_url(fresh_redis_url)
    yield SyncStore(client, idempotency_ttl=3600, lease_seconds=5)
    await client.aclose()


@pytest.fixture
async def adapters(
    sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, ProviderAdapter]]:
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    async with aiohttp.ClientSession() as session:
        yield {n: adapter_class(n)(adapter_class(n).settings_class(), session) for n in sandbox.simulators}


def cc(**kw: object) -> ClientChange:
    return ClientChange.model_validate(change(**kw))  # type: ignore[arg-type]


async def run(c: ClientChange, adapter: ProviderAdapter, store: SyncStore, owner: str = "t") -> str:
    outcome = await apply_change(c, adapter, store, owner=owner, lock_wait=1)
    return f"{outcome.result}:{outcome.reason or ''}"


async def test_create_then_update_through_the_link(adapters: dict[str, ProviderAdapter], store: SyncStore,
                                                    sandbox: RunningSandbox) -> None:
    a = adapters["invoice_ninja"]
    assert await run(cc(event_id="e1", client_id="c1", name="One"), a, store) == "created:"
    assert await run(cc(event_id="e2", client_id="c1", name="One renamed"), a, store) == "updated:"
    records = list(sandbox.simulators["invoice_ninja"].clients.values())
    assert [r["name"] for r in records] == ["One renamed"]


async def test_a_completed_job_replays_its_outcome_without_calling_the_provider(
    adapters: dict[str, ProviderAdapter], store: SyncStore, sandbox: RunningSandbox
) -> None:
    a, sim = adapters["invoice_ninja"], sandbox.simulators["invoice_ninja"]
    c = cc(event_id="e1", client_id="c1")
    first = await apply_change(c, a, store, owner="w1", lock_wait=1)
    calls = len(sim.calls)
    again = await apply_change(c, a, store, owner="w2", lock_wait=1)
    assert again.replayed and again.provider_id == first.provider_id and len(sim.calls) == calls
    with pytest.raises(IdempotencyConflict):
        await apply_change(cc(event_id="e1", client_id="c1", name="Other"), a, store, owner="w3", lock_wait=1)


async def test_a_delete_where_the_provider_has_none_is_skipped_as_unsupported(
    adapters: dict[str, ProviderAdapter], store: SyncStore
) -> None:
    rf = adapters["request_finance"]
    assert await run(cc(event_id="e1", client_id="c1", at=minutes_ago(2)), rf, store) == "created:"
    assert await run(cc(event_id="e2", client_id="c1", action="delete", at=minutes_ago(1)), rf, store) == (
        "skipped:unsupported")
    # The tombstone still stops an older upsert.
    assert await run(cc(event_id="e3", client_id="c1", at=minutes_ago(1.5)), rf, store) == "skipped:stale"


async def test_a_delete_of_a_client_never_synced_is_skipped_and_leaves_a_tombstone(
    adapters: dict[str, ProviderAdapter], store: SyncStore, sandbox: RunningSandbox
) -> None:
    a = adapters["invoice_ninja"]
    assert await run(cc(event_id="e1", client_id="c9", action="delete", at=minutes_ago(1)), a, store) == (
        "skipped:not_linked")
    assert await run(cc(event_id="e2", client_id="c9", at=minutes_ago(3)), a, store) == "skipped:stale"
    assert sandbox.simulators["invoice_ninja"].clients == {}


async def test_a_newer_upsert_after_a_delete_creates_the_client_again(
    adapters: dict[str, ProviderAdapter], store: SyncStore
) -> None:
    a = adapters["invoice_ninja"]
    await run(cc(event_id="e1", client_id="c1", at=minutes_ago(3)), a, store)
    assert await run(cc(event_id="e2", client_id="c1", action="delete", at=minutes_ago(2)), a, store) == "deleted:"
    assert await run(cc(event_id="e3", client_id="c1", at=minutes_ago(1)), a, store) == "created:"


async def test_a_client_deleted_at_the_provider_is_a_permanent_error_not_a_silent_recreate(
    adapters: dict[str, ProviderAdapter], store: SyncStore, sandbox: RunningSandbox
) -> None:
    a = adapters["qonto"]
    await run(cc(event_id="e1", client_id="c1"), a, store)
    sandbox.simulators["qonto"].clients.clear()  # someone deleted it in Qonto's UI
    with pytest.raises(PermanentError, match="no longer exists"):
        await run(cc(event_id="e2", client_id="c1", name="Renamed"), a, store)


async def test_a_client_a_provider_refuses_fails_locally_without_a_call_and_releases_the_lock(
    adapters: dict[str, ProviderAdapter], store: SyncStore, sandbox: RunningSandbox
) -> None:
    q, sim = adapters["qonto"], sandbox.simulators["qonto"]
    italian = {"country": "IT", "city": "Milano", "postal_code": "20121"}
    with pytest.raises(LocalValidationError, match="region"):
        await run(cc(event_id="e1", client_id="c1", billing_address=italian), q, store)
    assert sim.calls == []
    fixed = {**italian, "region": "MI"}
    assert await run(cc(event_id="e2", client_id="c1", billing_address=fixed), q, store) == "created:"
