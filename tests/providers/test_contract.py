"""The contract every provider adapter passes, over real HTTP to its sandbox simulator.

Generic on purpose: only the `ProviderAdapter` interface and the sandbox control API
(`/_sandbox/clients`, `/_sandbox/faults`, `/_sandbox/calls`) are used. A provider joins by
adding its name to `PROVIDERS`; the few per-provider facts live in the small tables below.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.helpers import ENDINGS
from tests.providers.conftest import StartSandbox, make_adapter
from worker.errors import (
    AuthError,
    LocalValidationError,
    NotFound,
    ProviderUnavailable,
    ProviderValidationError,
    RateLimitedError,
    Unsupported,
)
from worker.models import Address, Client
from worker.providers import adapter_class
from worker.providers.base import ProviderAdapter
from worker.sandbox.server import RunningSandbox

PROVIDERS = [
    "request_finance",
    "grow_crm",
    "invoice_ninja",
    "lsp_expert",
    "qonto",
]

#: fields (beyond name/email) a provider holds and gives back unchanged; keep it minimal
EXTRA_FIELDS: dict[str, tuple[str, ...]] = {
    "invoice_ninja": ("kind", "phone", "vat_number", "billing_address", "currency"),
    "request_finance": ("kind", "phone", "vat_number", "billing_address"),
    "grow_crm": ("phone", "vat_number", "billing_address"),
    "lsp_expert": ("phone", "vat_number", "billing_address", "currency"),
    "qonto": ("kind", "vat_number", "billing_address", "currency"),
}
#: an optional field that, once removed from the canonical client, must be gone at the provider
CLEARABLE_FIELD: dict[str, str] = {}  # default "phone"


def rejected_client() -> Client:
    """A client every provider must refuse (locally or remotely): every text field far too long."""
    long = "x" * 255
    return sample(name=long, first_name=long, last_name=long, phone=long, website=long, vat_number=long)


#: provider -> a client it rejects, when the default above is accepted by that provider
REJECTED: dict[str, Callable[[], Client]] = {
    # Neither documents length limits; each refuses a client missing a field it requires.
    "request_finance": lambda: sample(email=None),
    "grow_crm": lambda: sample(last_name=None),
    # LSP.expert documents no length limits; `name` (here: no company or person name) is required.
    "lsp_expert": lambda: Client(id=f"src-{uuid.uuid4().hex[:8]}", email="nameless@example.com"),
}
#: provider -> round-trip cases it refuses by design (it must say so with LocalValidationError)
REFUSED: dict[str, set[str]] = {
    "grow_crm": {"only_name_and_email"},  # create needs first_name + last_name for the owner user
}


def sample(kind: str = "company", **fields: Any) -> Client:
    """A valid client with a unique id and email; every provider's required fields are present."""
    tag = uuid.uuid4().hex[:10]
    base: dict[str, Any] = {
        "id": f"src-{tag}",
        "kind": kind,
        "first_name": "Ada",
        "last_name": "Lovelace",
        "email": f"ada.{tag}@example.com",
    }
    if kind == "company":
        base["name"] = f"Analytical Engines {tag}"
    return Client.model_validate({**base, **fields})


def assert_core_survives(provider: str, sent: Client, got: Client) -> None:
    """The canonical field set every provider holds (name or person, email), plus its extras."""
    if sent.name:
        assert sent.name in (got.name, got.display_name)
    else:
        assert (got.first_name, got.last_name) == (sent.first_name, sent.last_name) or (
            got.display_name == sent.display_name
        )
    assert (got.email or "").casefold() == (sent.email or "").casefold()
    for field in EXTRA_FIELDS.get(provider, ()):
        assert getattr(got, field) == getattr(sent, field), field


@dataclass
class Env:
    name: str
    sandbox: RunningSandbox
    adapter: ProviderAdapter
    session: aiohttp.ClientSession

    @property
    def control(self) -> str:
        return f"{self.sandbox.base_url(self.name)}/_sandbox"

    async def faults(self, **knobs: Any) -> None:
        async with self.session.post(f"{self.control}/faults", json=knobs) as resp:
            assert resp.status == 200, await resp.text()

    async def stored(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.control}/clients") as resp:
            body: dict[str, list[dict[str, Any]]] = await resp.json()
        return body["clients"]

    async def calls(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.control}/calls") as resp:
            body: dict[str, list[dict[str, Any]]] = await resp.json()
        return body["calls"]

    async def round_trip(self, client: Client) -> Client:
        """to_wire -> provider -> get -> from_wire."""
        remote = await self.adapter.create(client)
        return self.adapter.from_wire((await self.adapter.get(remote.id)).data)


@pytest.fixture(params=PROVIDERS)
async def env(
    request: pytest.FixtureRequest,
    start: StartSandbox,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> Env:
    name: str = request.param
    sandbox = await start([name])
    return Env(name, sandbox, make_adapter(name, sandbox, session, monkeypatch), session)


# --- the Clients API ------------------------------------------------------------------------
async def test_create_get_find_update_delete_lifecycle(env: Env) -> None:
    clearable = CLEARABLE_FIELD.get(env.name, "phone")
    client = sample(**{clearable: "+39 02 1234 5678"} if clearable == "phone" else {})
    remote = await env.adapter.create(client)
    assert len(await env.stored()) == 1

    got = env.adapter.from_wire((await env.adapter.get(remote.id)).data)
    assert_core_survives(env.name, client, got)
    assert getattr(got, clearable) is not None, f"{clearable} must be held before it can be removed"

    from worker.identity import exact_matches, lookalikes

    found_all = await exact_matches(env.adapter, client) or await lookalikes(env.adapter, client, since=None)
    assert [r.id for r in found_all] == [remote.id]

    changed = client.model_copy(update={"name": "Renamed Engines", clearable: None})
    await env.adapter.update(remote.id, changed)
    got = env.adapter.from_wire((await env.adapter.get(remote.id)).data)
    assert_core_survives(env.name, changed, got)
    assert getattr(got, clearable) is None, f"{clearable} was removed but the provider still has it"
    assert len(await env.stored()) == 1, "an update must not create a second client"

    try:
        await env.adapter.delete(remote.id)
    except Unsupported:
        return  # the documented outcome for providers without a delete (e.g. Request Finance)
    with pytest.raises(NotFound):
        await env.adapter.get(remote.id)


async def test_list_pages_through_every_client_once(env: Env) -> None:
    created = {(await env.adapter.create(sample())).id for _ in range(7)}
    before = len(await env.calls())
    seen = [remote.id async for remote in env.adapter.list(page_size=3)]
    assert len(seen) == len(set(seen)), "a client was listed twice"
    assert created <= set(seen)
    assert len(await env.calls()) - before >= 3, "7 clients at 3 a page take at least 3 requests"


# --- error mapping ------------------------------------------------------------------------
async def test_wrong_credentials_raise_auth_error(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.sandbox.env().items():
        if not key.endswith("_URL") and not value.replace(".", "").isdigit():
            monkeypatch.setenv(key, f"wrong-{value}")
    cls = adapter_class(env.name)
    adapter = cls(cls.settings_class(), env.session)
    with pytest.raises(AuthError) as info:
        await adapter.create(sample())
    assert not info.value.retryable
    assert await env.stored() == []


async def test_unknown_id_raises_not_found(env: Env) -> None:
    with pytest.raises(NotFound):
        await env.adapter.get(str(uuid.uuid4()))


async def test_rejected_client_raises_validation_error_with_field_info(env: Env) -> None:
    client = REJECTED.get(env.name, rejected_client)()
    with pytest.raises((ProviderValidationError, LocalValidationError)) as info:
        await env.adapter.create(client)
    assert info.value.field_errors, "the error must say which field was rejected"
    assert not info.value.retryable
    assert await env.stored() == []


async def test_429_raises_rate_limited_with_retry_after(env: Env) -> None:
    remote = await env.adapter.create(sample())
    await env.faults(throttle_next=1, retry_after=7)
    with pytest.raises(RateLimitedError) as info:
        await env.adapter.get(remote.id)
    assert info.value.retryable
    assert info.value.retry_after == pytest.approx(7)


async def test_5xx_raises_transient_provider_unavailable(env: Env) -> None:
    remote = await env.adapter.create(sample())
    await env.faults(fail_next=1, error_status=503)
    with pytest.raises(ProviderUnavailable) as info:
        await env.adapter.get(remote.id)
    assert info.value.retryable
    assert info.value.status == 503


async def test_hang_beyond_timeout_raises_provider_unavailable(
    env: Env, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter(env.name, env.sandbox, session, monkeypatch, timeout=0.5)
    remote = await adapter.create(sample())
    await env.faults(hang_next=1, hang_seconds=2)
    with pytest.raises(ProviderUnavailable) as info:
        await adapter.get(remote.id)
    assert info.value.retryable


# --- mapping round trips --------------------------------------------------------------------
ROUND_TRIPS: dict[str, Callable[[], Client]] = {
    "unicode": lambda: sample(name="Zoë Łukasz 東京 Ltd", first_name="Zoë", last_name="Łukasz"),
    "only_name_and_email": lambda: Client(
        id=f"src-{uuid.uuid4().hex[:8]}", name="Bare Minimum", email=f"{uuid.uuid4().hex[:8]}@example.com"
    ),
    "company": lambda: sample("company", phone="+44 20 7946 0000", vat_number="GB123456789", currency="GBP"),
    "individual": lambda: sample("individual", first_name="Zoë", last_name="Łukasz"),
    "italian_address": lambda: sample(
        billing_address=Address(
            line1="Via Dante 1", city="Milano", region="MI", postal_code="20121", country="IT"
        ),
        currency="EUR",
    ),
    "long_fields": lambda: sample(name="N" * 150, first_name="F" * 60, last_name="L" * 60, phone="1" * 30),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
async def test_mapping_round_trip_keeps_what_the_provider_holds(env: Env, case: str) -> None:
    client = ROUND_TRIPS[case]()
    if case in REFUSED.get(env.name, set()):
        with pytest.raises(LocalValidationError) as info:
            await env.round_trip(client)
        assert info.value.field_errors
        return
    assert_core_survives(env.name, client, await env.round_trip(client))


@pytest.mark.parametrize("ending", ENDINGS)
async def test_the_three_unclear_endings_of_a_create_apply_it_and_raise_transient(
    env: Env, ending: str, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox's write faults: the provider applies the write, the caller learns nothing clear."""
    adapter = make_adapter(env.name, env.sandbox, session, monkeypatch, timeout=0.5)
    await env.faults(**{ending: 1}, hang_seconds=1.0)
    client = sample()
    with pytest.raises(ProviderUnavailable):
        await adapter.create(client)
    # The write lands (at once, or after the hang for the late one) exactly once.
    for _ in range(200):
        held = [c for c in await env.stored() if client.name and client.name in str(c)]
        if held:
            break
        await asyncio.sleep(0.05)
    assert len(held) == 1


# --- identity (worker.identity over each adapter's `Identity` declaration) -----------------
async def test_identity_declaration_finds_a_created_client_exactly_and_nobody_else(env: Env) -> None:
    """Every provider declares at least one way to find a client again, and it finds the right one."""
    from worker.identity import exact_matches, lookalikes

    ident = env.adapter.identity
    assert ident.notes, "the identity declaration cites its evidence"
    assert env.adapter.stamp_field or ident.unique or ident.similar
    before = time.time()
    mine, other = sample(), sample()
    created = await env.adapter.create(mine)
    await env.adapter.create(other)
    if env.adapter.stamp_field:
        assert env.adapter.stamped(await env.adapter.get(created.id)) == mine.id
    if env.adapter.stamp_field or ident.unique:
        assert [r.id for r in await exact_matches(env.adapter, mine)] == [created.id]
    if ident.similar:
        found = await lookalikes(env.adapter, mine, since=before)
        assert [r.id for r in found] == [created.id]
    record = await env.adapter.get(created.id)
    assert env.adapter.same_payload(record, mine)
    assert not env.adapter.same_payload(record, other)
    stamp = env.adapter.created_at(record)
    assert stamp is None or stamp >= before - 5


async def test_identity_search_never_answers_for_a_deleted_or_unknown_client(env: Env) -> None:
    from worker.identity import exact_matches

    gone = sample()
    remote = await env.adapter.create(gone)
    try:
        await env.adapter.delete(remote.id)
    except Unsupported:
        return  # Request Finance: no delete; the search of a live record is checked above
    assert await exact_matches(env.adapter, gone) == []
    assert await exact_matches(env.adapter, sample()) == []


async def test_every_sandbox_switches_its_readings_through_one_control_route(env: Env) -> None:
    """GET/POST `/_sandbox/settings` (the base's): bad bodies are 400, never 500; reset restores."""
    sim = env.sandbox.simulators[env.name]
    assert sim.readings_class is not None, "each sandbox declares the readings its provider's docs leave open"
    async with env.session.get(f"{env.control}/settings") as resp:
        defaults = await resp.json()
    for bad in (b"not json", b"[]", b"{}", b'{"no_such_reading": 1}'):
        async with env.session.post(f"{env.control}/settings", data=bad,
                                    headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, bad
    name = next(iter(defaults))
    async with env.session.post(f"{env.control}/settings", json={name: "changed"}) as resp:
        assert resp.status == 200 and (await resp.json())[name] == "changed"
    async with env.session.post(f"{env.control}/reset") as resp:
        assert resp.status == 200
    async with env.session.get(f"{env.control}/settings") as resp:
        assert await resp.json() == defaults


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"id": "7", "name": "\\u00e9t\\u00e9"}', {"id": "7", "name": "été"}),
    # what orjson refuses, the standard library still reads
    (b'{"balance": NaN}', {"balance": float("nan")}),
    (b'{"id": 123456789012345678901234567890}', {"id": 123456789012345678901234567890}),
    # not JSON at all: the text, for the error message
    (b"<html>Bad gateway</html>", "<html>Bad gateway</html>"),
])
def test_a_providers_answer_is_decoded_as_the_standard_library_would(raw: bytes, expected: Any) -> None:
    from worker.providers.base import _decode

    got = _decode(raw)
    if isinstance(expected, dict) and "balance" in expected:
        assert math.isnan(got["balance"])
    else:
        assert got == expected
