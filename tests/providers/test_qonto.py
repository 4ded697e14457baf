"""Qonto adapter against its strict simulator over real HTTP on loopback (and a real Redis for OAuth)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pycountry
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.helpers import ENDINGS
from tests.providers.conftest import StartSandbox, make_adapter, unclear_write
from worker import keys
from worker.errors import (
    AuthError,
    LocalValidationError,
    NotFound,
    PermanentError,
    ProviderUnavailable,
    ProviderValidationError,
    RateLimitedError,
    TransientError,
)
from worker.identity import lookalikes
from worker.models import Address, Client, Contact
from worker.providers.base import RemoteClient
from worker.providers.qonto import IT_PROVINCES, Qonto, QontoConfig
from worker.providers.qonto_auth import RedisTokenStore
from worker.sandbox.base import Faults
from worker.sandbox.qonto import UPDATE_FIELDS, QontoSandbox
from worker.sandbox.server import RunningSandbox

Setup = tuple[Qonto, QontoSandbox]
NOWHERE = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
async def qonto(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> Setup:
    sandbox = await start(["qonto"])
    adapter = make_adapter("qonto", sandbox, session, monkeypatch)
    assert isinstance(adapter, Qonto)
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    return adapter, sim


def oauth_adapter(
    sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> Qonto:
    """A Qonto adapter configured for OAuth (client id/secret + refresh token) from the env."""
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    for key in ("CLIENTSYNC_QONTO_LOGIN", "CLIENTSYNC_QONTO_SECRET_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in sim.oauth_env(sandbox.base_url("qonto")).items():
        monkeypatch.setenv(key, value)
    config = QontoConfig(**overrides)
    assert config.mode() == "oauth", config.missing()
    return Qonto(config, session)


def token_calls(sim: QontoSandbox) -> list[int]:
    return [c.status for c in sim.calls if c.path.endswith("/oauth2/token")]


def lille(**changes: Any) -> Address:
    return Address.model_validate({"line1": "74 rue des Arts", "city": "Lille", "postal_code": "59000",
                                   "country": "FR", **changes})  # fmt: skip


def company(**changes: Any) -> Client:
    data: dict[str, Any] = {
        "id": "crm-1", "kind": "company", "name": "Acme SAS", "email": "billing@acme.example",
        "vat_number": "FR65827999616", "tax_id": "32878178601143", "currency": "EUR",
        "locale": "fr_FR", "phone": "+33 6 12 34 56 78", "billing_address": lille(),
    }  # fmt: skip
    return Client.model_validate({**data, **changes})


def person(**changes: Any) -> Client:
    data = {"id": "crm-2", "kind": "individual", "first_name": "Ada", "last_name": "Lovelace"}
    return Client.model_validate({**data, **changes})


def milan(**changes: Any) -> Address:
    data = {"line1": "Via Roma 1", "city": "Milano", "region": "MI", "postal_code": "20121", "country": "IT"}
    return Address.model_validate({**data, **changes})


# --- configuration and API-key auth --------------------------------------------------------
def test_the_default_rate_limit_is_the_published_one() -> None:
    config = QontoConfig()
    assert (config.rate_limit, config.rate_period) == (1000, 10.0)


def test_missing_credentials_name_both_ways_to_authenticate(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LOGIN", "SECRET_KEY", "CLIENT_ID", "CLIENT_SECRET", "REFRESH_TOKEN", "TOKEN"):
        monkeypatch.delenv(f"CLIENTSYNC_QONTO_{key}", raising=False)
    config = QontoConfig()
    assert not config.is_configured()
    assert "CLIENTSYNC_QONTO_SECRET_KEY" in config.missing()
    assert "CLIENTSYNC_QONTO_REFRESH_TOKEN" in config.missing()
    assert QontoConfig(login="acme", secret_key="k").mode() == "api_key"
    assert QontoConfig(login="acme", secret_key="k", client_id="c", client_secret="s",
                       refresh_token="r").mode() == "oauth"  # fmt: skip
    assert QontoConfig(login="acme", secret_key="k", client_id="c", client_secret="s", refresh_token="r",
                       auth="api_key").mode() == "api_key"  # fmt: skip


async def test_api_key_auth_sends_login_colon_secret_key_and_the_staging_token(qonto: Setup) -> None:
    adapter, sim = qonto
    headers = adapter.auth_headers()
    assert headers["Authorization"] == f"{sim.credentials['login']}:{sim.credentials['secret_key']}"
    assert headers["X-Qonto-Staging-Token"] == sim.credentials["staging_token"]  # exact capitalisation
    # the simulator checks both (the staging header case-sensitively), so this call proves them
    await adapter.create(company())
    assert token_calls(sim) == []


async def test_a_wrong_secret_key_is_an_auth_error(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"])
    adapter = make_adapter("qonto", sandbox, session, monkeypatch, secret_key="wrong")
    with pytest.raises(AuthError) as info:
        await adapter.get(NOWHERE)
    assert info.value.status == 401


async def test_without_the_staging_token_the_sandbox_answers_401(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"])
    monkeypatch.setenv("CLIENTSYNC_QONTO_STAGING_TOKEN", "")
    adapter = make_adapter("qonto", sandbox, session, monkeypatch, staging_token=None)
    with pytest.raises(AuthError) as info:
        await adapter.get(NOWHERE)
    assert info.value.status == 401
    assert "X-Qonto-Staging-Token" in info.value.message


async def test_a_staging_token_header_in_another_case_is_refused(
    start: StartSandbox, session: aiohttp.ClientSession
) -> None:
    sandbox = await start(["qonto"])
    creds = sandbox.simulators["qonto"].credentials
    headers = {"Authorization": f"{creds['login']}:{creds['secret_key']}",
               "x-qonto-staging-token": creds["staging_token"]}  # fmt: skip
    async with session.get(f"{sandbox.base_url('qonto')}/v2/clients", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["errors"][0]["code"] == "unauthorized"


# --- OAuth 2 with refresh tokens ----------------------------------------------------------
async def test_oauth_gets_a_token_from_the_token_endpoint_once_and_reuses_it(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"])
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    adapter = oauth_adapter(sandbox, session, monkeypatch)
    remote = await adapter.create(company())
    await adapter.get(remote.id)
    assert token_calls(sim) == [200]
    assert sim.last_access_token in sim.access_tokens
    assert adapter.auth_headers()["Authorization"] == f"Bearer {sim.last_access_token}"


async def test_oauth_refreshes_shortly_before_expiry_with_the_rotated_refresh_token(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"])
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    # tokens live 303 s; the adapter refreshes 300 s early: after ~3 s the token is "about to expire"
    sim.readings.access_token_ttl, sim.readings.refresh_grace = 303, 0
    adapter = oauth_adapter(sandbox, session, monkeypatch, refresh_leeway=300)
    await adapter.create(company())
    first = sim.last_access_token
    assert adapter.oauth is not None
    stored = await adapter.oauth.store.load()
    while time.time() < int(stored["expires_at"]) - 300 + 1:  # until inside the refresh window
        await asyncio.sleep(0.1)
    assert sim.access_tokens[str(first)] > time.time() + 250, "the old token is still valid at Qonto"
    await adapter.create(company(id="crm-3"))
    assert token_calls(sim) == [200, 200], "one refresh, before expiry"
    assert sim.last_access_token != first
    assert [c.status for c in sim.calls if "/v2/" in c.path] == [201, 201], "no call was refused"
    # the seed refresh token is dead now (grace 0): the refresh used the rotated one
    assert (await adapter.oauth.store.load())["refresh_token"] != sim.credentials["refresh_token"]


async def test_an_expired_access_token_gets_qontos_401_and_the_adapter_replaces_it(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"])
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    adapter = oauth_adapter(sandbox, session, monkeypatch, refresh_leeway=0)
    await adapter.create(company())
    old = str(sim.last_access_token)
    sim.access_tokens[old] = time.time() - 1  # expired at Qonto earlier than the adapter expected
    headers = {"Authorization": f"Bearer {old}", "X-Qonto-Staging-Token": sim.credentials["staging_token"]}
    async with session.get(f"{sandbox.base_url('qonto')}/v2/clients", headers=headers) as resp:
        body = await resp.json()
    assert resp.status == 401
    assert body["errors"][0]["code"] == "unauthorized" and "expired" in body["errors"][0]["detail"]
    assert "trace_id" in body
    listed = [r async for r in adapter.list()]  # 401, one forced refresh, one repeat
    assert len(listed) == 1
    assert token_calls(sim) == [200, 200]
    assert sim.last_access_token != old


async def test_a_refused_refresh_is_an_auth_error_naming_the_variable_and_is_not_retried(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"])
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    adapter = oauth_adapter(sandbox, session, monkeypatch, refresh_token="ory_rt_revoked")
    for _ in range(3):
        with pytest.raises(AuthError) as info:
            await adapter.create(company())
        assert "CLIENTSYNC_QONTO_REFRESH_TOKEN" in info.value.message
        assert "invalid_grant" in info.value.message
        assert not info.value.retryable
    assert token_calls(sim) == [400], "the dead refresh token is spent once, not per job"
    assert sim.clients == {}
    # an operator sets a working refresh token: the new seed wins over the recorded refusal
    store = adapter.token_store
    fixed = oauth_adapter(sandbox, session, monkeypatch)
    assert store is not None
    fixed.token_store = store
    await fixed.create(company())
    assert token_calls(sim) == [400, 200]


async def test_a_token_endpoint_outage_is_transient_and_recorded_nowhere(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"], faults={"qonto": Faults(fail_next=1)})
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    adapter = oauth_adapter(sandbox, session, monkeypatch)
    with pytest.raises(ProviderUnavailable):
        await adapter.create(company())
    await adapter.create(company())
    assert token_calls(sim) == [503, 200]


@pytest.fixture
async def shared_redis(fresh_redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    """Two separate Redis clients (as two worker processes would have) on one real server."""
    clients = [aioredis.Redis.from_url(fresh_redis_url) for _ in range(2)]
    yield clients
    for client in clients:
        await client.aclose()


async def test_two_workers_sharing_redis_refresh_once_and_use_the_same_token(
    start: StartSandbox, monkeypatch: pytest.MonkeyPatch, shared_redis: list[aioredis.Redis]
) -> None:
    sandbox = await start(["qonto"], faults={"qonto": Faults(latency_ms=100)})  # a slow token call
    sim = sandbox.simulators["qonto"]
    assert isinstance(sim, QontoSandbox)
    sim.readings.refresh_grace = 0  # a second refresh with the same refresh token would be refused
    async with aiohttp.ClientSession() as one, aiohttp.ClientSession() as two:
        workers = [oauth_adapter(sandbox, s, monkeypatch) for s in (one, two)]
        for worker, redis in zip(workers, shared_redis, strict=True):
            worker.token_store = RedisTokenStore(redis)
        record = {"id": NOWHERE, "kind": "company", "name": "Acme SAS"}
        sim.clients[NOWHERE] = record  # nobody has a token yet
        await asyncio.gather(*(workers[n % 2].get(NOWHERE) for n in range(20)))
        assert token_calls(sim) == [200], "twenty concurrent calls in two workers: one refresh"
        stored = await shared_redis[1].hgetall(keys.oauth_token("qonto"))
        assert 0 < await shared_redis[1].ttl(keys.oauth_token("qonto")) <= keys.OAUTH_TOKEN_TTL_SECONDS
        # the stale token everyone shares: again exactly one refresh
        await shared_redis[0].hset(keys.oauth_token("qonto"), "expires_at", str(int(time.time())))
        await asyncio.gather(*(workers[n % 2].get(NOWHERE) for n in range(20)))
        assert token_calls(sim) == [200, 200]
        assert (await shared_redis[0].hget(keys.oauth_token("qonto"), "access_token")) != stored[b"access_token"]
        assert not await shared_redis[0].exists(keys.oauth_refresh_lock("qonto"))


# --- kind and names ------------------------------------------------------------------------
async def test_a_company_is_created_with_its_name_and_billing_address_object(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company())
    record = sim.clients[remote.id]
    assert record["kind"] == "company"
    assert record["name"] == "Acme SAS"
    assert record["billing_address"] == {
        "street_address": "74 rue des Arts", "city": "Lille", "zip_code": "59000", "country_code": "FR",
    }  # fmt: skip
    assert record["locale"] == "fr"
    assert record["phone"] == {"country_code": "+33", "number": "612345678"}
    assert not {"address", "city", "zip_code", "country_code"} & set(record)
    back = adapter.from_wire(remote.data)
    assert (back.name, back.email, back.billing_address) == ("Acme SAS", "billing@acme.example", lille())
    assert back.phone == "+33 612345678"
    assert [c.method for c in sim.calls] == ["POST"], "a create is one call"


@pytest.mark.parametrize(("phone", "wire"), [
    ("+33612345678", {"country_code": "+33", "number": "612345678"}),
    ("+39 02 1234 5678", {"country_code": "+39", "number": "0212345678"}),
    ("+1 (415) 555-0100", {"country_code": "+1", "number": "4155550100"}),
])  # fmt: skip
async def test_international_phones_are_split_into_country_code_and_number(
    qonto: Setup, phone: str, wire: dict[str, str]
) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company(phone=phone))
    assert sim.clients[remote.id]["phone"] == wire


async def test_a_phone_without_country_code_is_reported_not_dropped_silently(qonto: Setup) -> None:
    adapter, sim = qonto
    client = company(phone="06 12 34 56 78")
    assert "phone" in adapter.unsupported_fields(client)
    remote = await adapter.create(client)
    assert "phone" not in sim.clients[remote.id]


async def test_a_company_without_a_name_is_rejected_locally(qonto: Setup) -> None:
    adapter, sim = qonto
    with pytest.raises(LocalValidationError) as info:
        await adapter.create(Client(id="c", kind="company", email="x@example.com"))
    assert "name" in info.value.field_errors
    assert sim.calls == []


async def test_an_individual_is_created_with_first_and_last_name(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(person())
    record = sim.clients[remote.id]
    assert (record["kind"], record["first_name"], record["last_name"]) == ("individual", "Ada", "Lovelace")
    assert adapter.from_wire(remote.data).kind == "individual"


@pytest.mark.parametrize("missing", ["first_name", "last_name"])
async def test_an_individual_needs_both_names(qonto: Setup, missing: str) -> None:
    adapter, sim = qonto
    with pytest.raises(LocalValidationError) as info:
        await adapter.create(person(**{missing: None}, name="Ada Lovelace"))
    assert list(info.value.field_errors) == [missing]
    assert sim.calls == []


# --- update: no kind, and a kind change is never a silent success -------------------------
async def test_an_update_never_sends_kind_and_the_sandbox_refuses_kind_on_update(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company())
    assert "kind" not in adapter.to_wire(company(), existing=remote)
    await adapter.update(remote.id, company(name="Acme Group"))
    assert sim.clients[remote.id]["name"] == "Acme Group"
    with pytest.raises(ProviderValidationError) as info:  # the documented PATCH body has no kind
        await adapter.request("PATCH", f"/v2/clients/{remote.id}", json_body={"kind": "individual"})
    assert "kind" in info.value.field_errors
    assert sim.clients[remote.id]["kind"] == "company", "not applied"


@pytest.mark.parametrize("reading", ["reject", "ignore"])
@pytest.mark.parametrize(("before", "after"), [
    (company(), person(id="crm-1")),
    (person(id="crm-1"), company()),
])  # fmt: skip
async def test_a_kind_change_by_update_is_a_permanent_error_naming_kind(
    qonto: Setup, reading: str, before: Client, after: Client
) -> None:
    adapter, sim = qonto
    sim.readings.unknown_fields = reading  # type: ignore[assignment]
    remote = await adapter.create(before)
    with pytest.raises(PermanentError) as info:
        await adapter.update(remote.id, after)
    assert "kind" in info.value.field_errors
    assert "cannot change it by update" in info.value.message
    assert sim.clients[remote.id]["kind"] == before.kind


@pytest.mark.parametrize("reading", ["reject", "ignore"])
async def test_unknown_fields_on_update_under_both_readings_never_apply(qonto: Setup, reading: str) -> None:
    adapter, sim = qonto
    sim.readings.unknown_fields = reading  # type: ignore[assignment]
    remote = await adapter.create(company())
    body = {"kind": "individual", "website": "https://acme.example", "name": "Acme Group"}
    if reading == "reject":
        with pytest.raises(ProviderValidationError) as info:
            await adapter.request("PATCH", f"/v2/clients/{remote.id}", json_body=body)
        assert {"kind", "website"} <= set(info.value.field_errors)
        assert sim.clients[remote.id]["name"] == "Acme SAS"
    else:
        await adapter.request("PATCH", f"/v2/clients/{remote.id}", json_body=body)
        assert sim.clients[remote.id]["name"] == "Acme Group"
    assert sim.clients[remote.id]["kind"] == "company"
    assert "website" not in sim.clients[remote.id]


async def test_update_with_every_field_changed_then_cleared(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company())
    changed = company(
        name="Acme Group", first_name="Jane", last_name="Roe", email="ap@acme.example", phone="+39 06 1234 5678",
        vat_number="FR40303265045", tax_id="30326504500020", currency="USD", locale="en",
        billing_address=milan(), shipping_address=lille(line1="1 quai Nord"),
        contacts=[Contact(email="ceo@acme.example"), Contact(email="ap@acme.example")],
    )  # fmt: skip
    sim.calls.clear()
    await adapter.update(remote.id, changed)
    assert [c.method for c in sim.calls] == ["PATCH"], "an update is one call"
    got = adapter.from_wire(sim.clients[remote.id])
    for field in ("name", "first_name", "last_name", "email", "vat_number", "tax_id", "currency", "locale",
                  "billing_address"):  # fmt: skip
        assert getattr(got, field) == getattr(changed, field), field
    assert got.phone == "+39 0612345678"
    assert got.shipping_address == lille(line1="1 quai Nord")
    assert sim.clients[remote.id]["extra_emails"] == ["ceo@acme.example"]
    cleared = Client(id="crm-1", kind="company", name="Acme Group", currency="USD", locale="en",
                     billing_address=milan())  # fmt: skip
    body = adapter.to_wire(cleared, existing=remote)
    assert set(body) <= UPDATE_FIELDS, "every field sent is in the documented PATCH body"
    await adapter.update(remote.id, cleared)
    record = sim.clients[remote.id]
    for field in ("first_name", "last_name", "email", "phone", "vat_number", "tax_identification_number",
                  "delivery_address"):  # fmt: skip
        assert record[field] is None, field
    assert record["extra_emails"] == []
    assert (record["currency"], record["locale"], record["billing_address"]["province_code"]) == ("USD", "en", "MI")


# --- Italy and France ----------------------------------------------------------------------
def test_the_province_list_is_iso_3166_2_it_plus_aosta() -> None:
    subdivisions = pycountry.subdivisions.get(country_code="IT")
    iso = {s.code[3:] for s in subdivisions if len(s.code) == 5 and s.code[3:].isalpha()}
    assert iso | {"AO"} == IT_PROVINCES


async def test_an_italian_client_with_a_listed_province_and_five_character_zip_is_accepted(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company(billing_address=milan(region="mi")))
    assert sim.clients[remote.id]["billing_address"]["province_code"] == "MI"


async def test_province_code_is_sent_for_italy_only(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company(billing_address=lille(region="Hauts-de-France")))
    assert "province_code" not in sim.clients[remote.id]["billing_address"]


@pytest.mark.parametrize(
    ("address", "field", "rule"),
    [
        ({"region": None}, "billing_address.region", "province code from Qonto's list"),
        ({"region": "Milano"}, "billing_address.region", "province code from Qonto's list"),
        ({"region": "XX"}, "billing_address.region", "province code from Qonto's list"),
        ({"postal_code": "2012"}, "billing_address.postal_code", "exactly 5"),
        ({"postal_code": None}, "billing_address.postal_code", "exactly 5"),
    ],
)
async def test_italian_rules_are_checked_before_any_call(
    qonto: Setup, address: dict[str, Any], field: str, rule: str
) -> None:
    adapter, sim = qonto
    with pytest.raises(LocalValidationError) as info:
        await adapter.create(company(billing_address=milan(**address)))
    assert rule in " ".join(info.value.field_errors[field])
    assert field in str(info.value)
    assert sim.calls == []


async def test_the_sandbox_refuses_a_province_outside_the_list(qonto: Setup) -> None:
    adapter, _ = qonto
    address = {"street_address": "Via Roma 1", "city": "Milano", "zip_code": "20121", "province_code": "XX",
               "country_code": "IT"}  # fmt: skip
    with pytest.raises(ProviderValidationError) as info:
        await adapter.request("POST", "/v2/clients", json_body={"kind": "company", "name": "X",
                                                                 "billing_address": address})  # fmt: skip
    assert "billing_address.province_code" in info.value.field_errors


@pytest.mark.parametrize("vat", ["FR123", "FR6582799961", "FRIO827999616X", "fr65-827999616"])
async def test_a_malformed_french_vat_number_is_a_local_error(qonto: Setup, vat: str) -> None:
    adapter, sim = qonto
    with pytest.raises(LocalValidationError) as info:
        await adapter.create(company(vat_number=vat))
    assert "FR + a 2-character key + the 9-digit SIREN" in info.value.field_errors["vat_number"][0]
    assert sim.calls == []
    with pytest.raises(ProviderValidationError) as remote:  # and Qonto (the sandbox) says the same
        await adapter.request("POST", "/v2/clients", json_body={"kind": "company", "name": "X",
                                                                 "vat_number": vat.upper()})  # fmt: skip
    assert "vat_number" in remote.value.field_errors


async def test_well_formed_french_and_other_vat_numbers_are_accepted(qonto: Setup) -> None:
    adapter, sim = qonto
    for n, vat in enumerate(["FR65827999616", "fr40303265045", "FRA1234567890", "DE123456789"]):
        remote = await adapter.create(company(id=f"v{n}", vat_number=vat))
        assert sim.clients[remote.id]["vat_number"] == vat.upper()


# --- length limits -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("client", "field", "limit"),
    [
        (company(name="N" * 251), "name", 250),
        (person(first_name="F" * 61), "first_name", 60),
        (person(last_name="L" * 61), "last_name", 60),
        (company(vat_number="V" * 21), "vat_number", 20),
        (company(tax_id="T" * 21), "tax_id", 20),
        (company(billing_address=lille(city="C" * 51)), "billing_address.city", 50),
        (company(billing_address=lille(postal_code="Z" * 21)), "billing_address.postal_code", 20),
        (
            company(billing_address=lille(line1="S" * 200, line2="S" * 60)),
            "billing_address.street (line1, line2)",
            250,
        ),
        (company(shipping_address=lille(city="C" * 51)), "shipping_address.city", 50),
    ],
)
async def test_each_length_limit_is_a_local_error_naming_the_field_with_no_call(
    qonto: Setup, client: Client, field: str, limit: int
) -> None:
    adapter, sim = qonto
    for operation in (adapter.create(client), adapter.update(NOWHERE, client)):
        with pytest.raises(LocalValidationError) as info:
            await operation
        assert f"at most {limit} characters" in info.value.field_errors[field][0]
    assert sim.calls == []


async def test_values_at_the_limits_are_accepted(qonto: Setup) -> None:
    adapter, _ = qonto
    address = lille(line1="S" * 250, city="C" * 50, postal_code="Z" * 20)
    at_limits = company(name="N" * 250, vat_number="V" * 20, tax_id="T" * 20, billing_address=address)
    await adapter.create(at_limits)
    await adapter.create(person(first_name="F" * 60, last_name="L" * 60))


# --- nothing dropped silently ----------------------------------------------------------------
def test_the_field_map_declares_every_canonical_field() -> None:
    assert set(Qonto.field_map) == set(Client.model_fields)
    for field, rule in Qonto.field_map.items():
        assert rule.startswith(("sent as ", "not supported", "derived")), field


def test_unsupported_fields_lists_what_qonto_cannot_take(qonto: Setup) -> None:
    adapter, _ = qonto
    assert adapter.unsupported_fields(company()) == []
    rich = company(website="https://acme.example", notes="VIP", tags=["a"], status="archived", locale="nl_NL",
                   contacts=[Contact(first_name="Jane", email="jane@acme.example")])  # fmt: skip
    assert sorted(adapter.unsupported_fields(rich)) == ["contacts", "locale", "notes", "status", "tags", "website"]
    assert adapter.unsupported_fields(company(contacts=[Contact(email="ap@acme.example")])) == []


async def test_contacts_emails_become_extra_emails_and_the_primary_email_fills_in(qonto: Setup) -> None:
    adapter, sim = qonto
    client = company(email=None, contacts=[Contact(email="ap@acme.example"), Contact(email="ceo@acme.example")])
    remote = await adapter.create(client)
    record = sim.clients[remote.id]
    assert (record["email"], record["extra_emails"]) == ("ap@acme.example", ["ceo@acme.example"])
    assert adapter.same_payload(remote, client)


# --- errors, delete, search, list ----------------------------------------------------------
async def test_a_json_api_422_becomes_a_message_and_field_errors(qonto: Setup) -> None:
    adapter, _ = qonto
    body = {"kind": "individual", "first_name": "Ada", "billing_address": {"country_code": "IT"}}
    with pytest.raises(ProviderValidationError) as info:
        await adapter.request("POST", "/v2/clients", json_body=body)
    errors = info.value.field_errors
    assert info.value.status == 422
    assert set(errors) == {"last_name", "billing_address.province_code", "billing_address.zip_code"}
    assert "last_name is required" in info.value.message


async def test_the_deprecated_root_level_address_is_refused_by_the_simulator(qonto: Setup) -> None:
    adapter, _ = qonto
    with pytest.raises(ProviderValidationError) as info:
        await adapter.request("POST", "/v2/clients", json_body={"kind": "company", "name": "X", "city": "Lille"})
    assert "city" in info.value.field_errors


async def test_delete_answers_204_then_get_is_not_found(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company())
    sim.calls.clear()
    await adapter.delete(remote.id)
    assert [(c.method, c.status) for c in sim.calls] == [("DELETE", 204)], "a delete is one call"
    with pytest.raises(NotFound) as info:
        await adapter.get(remote.id)
    assert info.value.message == "Client not found"


@pytest.mark.parametrize("reading", ["substring", "exact"])
async def test_search_rechecks_each_filter_exactly_under_both_name_filter_readings(
    qonto: Setup, reading: str
) -> None:
    adapter, sim = qonto
    sim.readings.name_filter = reading  # type: ignore[assignment]
    acme = await adapter.create(company())
    await adapter.create(company(id="b", name="Acme SAS Holding", email="other@example.com",
                                 vat_number="FR40303265045", tax_id="1"))  # fmt: skip
    sim.calls.clear()
    assert [r.id for r in await adapter.search("email", "BILLING@acme.example")] == [acme.id]
    assert "filter%5Bemail%5D=BILLING@acme.example" in sim.calls[0].path
    assert [r.id for r in await adapter.search("name", "Acme SAS")] == [acme.id]
    assert [r.id for r in await adapter.search("vat_number", "FR65827999616")] == [acme.id]
    assert [r.id for r in await adapter.search("tax_id", "32878178601143")] == [acme.id]
    assert await adapter.search("email", "nobody@example.com") == []
    with pytest.raises(PermanentError):
        await adapter.search("website", "x")


async def test_search_reads_every_page(qonto: Setup) -> None:
    adapter, sim = qonto
    for n in range(130):  # more than one page of 100 share the email
        sim.clients[f"id-{n}"] = {"id": f"id-{n}", "kind": "company", "name": f"N{n}", "email": "same@example.com"}
    found = await adapter.search("email", "same@example.com")
    assert len(found) == 130
    assert len([c for c in sim.calls if "filter" in c.path]) == 2


async def test_list_follows_meta_next_page(qonto: Setup) -> None:
    adapter, sim = qonto
    for n in range(5):
        await adapter.create(company(name=f"Client {n}"))
    sim.calls.clear()
    names = [c.data["name"] async for c in adapter.list(page_size=2)]
    assert names == [f"Client {n}" for n in range(5)]
    assert len(sim.calls) == 3


@pytest.fixture
async def odd_server() -> AsyncIterator[str]:
    """A loopback server answering list and client calls in shapes Qonto does not document."""

    async def odd(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "x"}], "pagination": {}})

    app = web.Application()
    app.router.add_get("/v2/clients", odd)
    app.router.add_get("/v2/clients/{id}", odd)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_an_unknown_answer_shape_is_a_permanent_error_naming_it(
    odd_server: str, session: aiohttp.ClientSession
) -> None:
    adapter = Qonto(QontoConfig(url=odd_server, login="a", secret_key="b"), session)
    with pytest.raises(PermanentError) as info:
        [r async for r in adapter.list()]
    assert "unknown shape" in info.value.message and "data" in info.value.message
    with pytest.raises(PermanentError):
        await adapter.search("email", "x@example.com")
    with pytest.raises(PermanentError) as one:
        await adapter.get("x")
    assert "{client: {...}}" in one.value.message


async def test_a_429_is_rate_limited_with_the_json_api_detail(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"], faults={"qonto": Faults(throttle_next=1, retry_after=None)})
    adapter = make_adapter("qonto", sandbox, session, monkeypatch)
    with pytest.raises(RateLimitedError) as info:
        await adapter.get(NOWHERE)
    assert info.value.message == "Rate limit exceeded"
    assert info.value.retry_after is None


# --- identity and the three unclear endings of each write -----------------------------------
async def test_records_carry_their_creation_time(qonto: Setup) -> None:
    adapter, _ = qonto
    before = time.time()
    remote = await adapter.create(company())
    created = adapter.created_at(remote)
    assert created is not None and before - 2 <= created <= time.time() + 2


async def _with_a_client(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> tuple[Qonto, QontoSandbox, RemoteClient]:
    """A sandbox of its own, an adapter with a short timeout (the late write outlasts it), one client."""
    sandbox = await start(["qonto"])
    adapter = make_adapter("qonto", sandbox, session, monkeypatch, timeout=0.5)
    sim = sandbox.simulators["qonto"]
    assert isinstance(adapter, Qonto) and isinstance(sim, QontoSandbox)
    return adapter, sim, await adapter.create(company())


@pytest.mark.parametrize("ending", ENDINGS)
async def test_an_unclear_create_leaves_one_record_that_the_lookalike_search_finds(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    adapter, sim, _ = await _with_a_client(start, session, monkeypatch)
    intent = time.time()
    client = company(id="crm-9", name="Unclear Ltd", email=None, vat_number=None, tax_id=None)
    outcome = await unclear_write(sim, ending, "POST /qonto/v2/clients", lambda: adapter.create(client),
                                  lambda: any(c.get("name") == "Unclear Ltd" for c in sim.clients.values()))
    assert isinstance(outcome, TransientError) and outcome.unclear, "a POST is never re-sent: no clear answer"
    found = await lookalikes(adapter, client, since=intent)
    assert len(found) == 1, "the retry adopts the one record instead of creating another"
    assert sum(c.get("name") == "Unclear Ltd" for c in sim.clients.values()) == 1


@pytest.mark.parametrize("ending", ENDINGS)
async def test_an_unclear_update_is_transient_and_its_repeat_converges(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    adapter, sim, remote = await _with_a_client(start, session, monkeypatch)
    newer = company(name="Acme Group", contacts=[Contact(email="ceo@acme.example")])
    outcome = await unclear_write(sim, ending, "PATCH", lambda: adapter.update(remote.id, newer),
                                  lambda: sim.clients[remote.id]["name"] == "Acme Group")
    assert isinstance(outcome, TransientError) and outcome.unclear, "a PATCH is never re-sent: no clear answer"
    await adapter.update(remote.id, newer)
    record = sim.clients[remote.id]
    assert (len(sim.clients), record["name"], record["extra_emails"]) == (1, "Acme Group", ["ceo@acme.example"])


@pytest.mark.parametrize("ending", ENDINGS)
async def test_an_unclear_delete_is_transient_and_its_repeat_finds_it_gone(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    adapter, sim, remote = await _with_a_client(start, session, monkeypatch)
    # aiohttp re-sends an idempotent DELETE once when a reused connection drops, so after a dropped
    # answer the caller may already see the 404 of the re-send, which counts as deleted
    outcome = await unclear_write(sim, ending, "DELETE", lambda: adapter.delete(remote.id),
                                  lambda: remote.id not in sim.clients)
    assert isinstance(outcome, NotFound) or (isinstance(outcome, TransientError) and outcome.unclear)
    with pytest.raises(NotFound):  # the caller counts a 404 on delete as deleted
        await adapter.delete(remote.id)
