"""Qonto adapter against its simulator over real HTTP on loopback."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.providers.conftest import StartSandbox, make_adapter
from worker.errors import (
    AuthError,
    LocalValidationError,
    NotFound,
    ProviderValidationError,
    RateLimitedError,
)
from worker.models import Address, Client
from worker.providers.qonto import Qonto, QontoConfig
from worker.sandbox.base import Faults
from worker.sandbox.qonto import QontoSandbox

Setup = tuple[Qonto, QontoSandbox]


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


def paris(**changes: Any) -> Address:
    return Address.model_validate({"line1": "74 rue des Arts", "city": "Lille", "postal_code": "59000",
                                   "country": "FR", **changes})  # fmt: skip


def company(**changes: Any) -> Client:
    data: dict[str, Any] = {
        "id": "crm-1", "kind": "company", "name": "Acme SAS", "email": "billing@acme.example",
        "vat_number": "FR65827999616", "tax_id": "32878178601143", "currency": "EUR",
        "locale": "fr_FR", "phone": "+33 6 12 34 56 78", "billing_address": paris(),
    }  # fmt: skip
    return Client.model_validate({**data, **changes})


def person(**changes: Any) -> Client:
    data = {"id": "crm-2", "kind": "individual", "first_name": "Ada", "last_name": "Lovelace"}
    return Client.model_validate({**data, **changes})


def milan(**changes: Any) -> Address:
    data = {"line1": "Via Roma 1", "city": "Milano", "region": "MI", "postal_code": "20121", "country": "IT"}
    return Address.model_validate({**data, **changes})


# --- configuration and auth ----------------------------------------------------------------
def test_the_default_rate_limit_is_the_published_one() -> None:
    config = QontoConfig()
    assert (config.rate_limit, config.rate_period) == (1000, 10.0)


async def test_bearer_and_staging_token_headers_are_sent(qonto: Setup) -> None:
    adapter, sim = qonto
    headers = adapter.auth_headers()
    assert headers["Authorization"] == f"Bearer {sim.credentials['token']}"
    assert "X-Qonto-Staging-Token" in headers  # exact capitalisation
    assert headers["X-Qonto-Staging-Token"] == sim.credentials["staging_token"]
    # the simulator matches the raw header name case-sensitively, so this call proves it
    await adapter.create(company())


async def test_without_the_staging_token_the_sandbox_answers_401(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"])
    monkeypatch.setenv("CLIENTSYNC_QONTO_STAGING_TOKEN", "")
    adapter = make_adapter("qonto", sandbox, session, monkeypatch, staging_token=None)
    with pytest.raises(AuthError) as info:
        await adapter.get("00000000-0000-4000-8000-000000000000")
    assert info.value.status == 401
    assert "X-Qonto-Staging-Token" in info.value.message


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
    assert (back.name, back.email, back.billing_address) == ("Acme SAS", "billing@acme.example", paris())
    assert back.phone == "+33 612345678"


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


# --- Italy ---------------------------------------------------------------------------------
async def test_an_italian_client_with_province_and_five_character_zip_is_accepted(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company(billing_address=milan(region="mi")))
    assert sim.clients[remote.id]["billing_address"]["province_code"] == "MI"


async def test_province_code_is_sent_for_italy_only(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company(billing_address=paris(region="Hauts-de-France")))
    assert "province_code" not in sim.clients[remote.id]["billing_address"]


@pytest.mark.parametrize(
    ("address", "field", "rule"),
    [
        ({"region": None}, "billing_address.region", "2-letter province"),
        ({"region": "Milano"}, "billing_address.region", "2-letter province"),
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


# --- length limits -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("client", "field", "limit"),
    [
        (company(name="N" * 251), "name", 250),
        (person(first_name="F" * 61), "first_name", 60),
        (person(last_name="L" * 61), "last_name", 60),
        (company(vat_number="V" * 21), "vat_number", 20),
        (company(tax_id="T" * 21), "tax_id", 20),
        (company(billing_address=paris(city="C" * 51)), "billing_address.city", 50),
        (company(billing_address=paris(postal_code="Z" * 21)), "billing_address.postal_code", 20),
        (
            company(billing_address=paris(line1="S" * 200, line2="S" * 60)),
            "billing_address.street (line1, line2)",
            250,
        ),
        (company(shipping_address=paris(city="C" * 51)), "shipping_address.city", 50),
    ],
)
async def test_each_length_limit_is_a_local_error_naming_the_field_with_no_call(
    qonto: Setup, client: Client, field: str, limit: int
) -> None:
    adapter, sim = qonto
    for operation in (adapter.create(client), adapter.update("00000000-0000-4000-8000-000000000000", client)):
        with pytest.raises(LocalValidationError) as info:
            await operation
        assert f"at most {limit} characters" in info.value.field_errors[field][0]
    assert sim.calls == []


async def test_values_at_the_limits_are_accepted(qonto: Setup) -> None:
    adapter, _ = qonto
    address = paris(line1="S" * 250, city="C" * 50, postal_code="Z" * 20)
    at_limits = company(name="N" * 250, vat_number="V" * 20, tax_id="T" * 20, billing_address=address)
    await adapter.create(at_limits)
    await adapter.create(person(first_name="F" * 60, last_name="L" * 60))


# --- errors, update, delete, find, list ----------------------------------------------------
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
        await adapter.request(
            "POST", "/v2/clients", json_body={"kind": "company", "name": "X", "city": "Lille"}
        )
    assert "city" in info.value.field_errors


async def test_patch_is_partial_and_a_cleared_field_is_sent_as_null(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company())
    await adapter.request("PATCH", f"/v2/clients/{remote.id}", json_body={"currency": "USD"})
    assert sim.clients[remote.id]["vat_number"] == "FR65827999616"  # omitted, so kept
    updated = await adapter.update(remote.id, company(name="Acme Group", vat_number=None, phone=None))
    assert updated.data["name"] == "Acme Group"
    assert updated.data["currency"] == "EUR"
    assert (updated.data["vat_number"], updated.data["phone"]) == (None, None)
    assert updated.data["email"] == "billing@acme.example"
    assert [c.method for c in sim.calls] == ["POST", "PATCH", "PATCH"]


async def test_delete_answers_204_then_get_is_not_found(qonto: Setup) -> None:
    adapter, sim = qonto
    remote = await adapter.create(company())
    await adapter.delete(remote.id)
    assert sim.calls[-1].status == 204
    with pytest.raises(NotFound) as info:
        await adapter.get(remote.id)
    assert info.value.message == "Client not found"


async def test_find_uses_the_email_filter_then_vat_then_tax_id(qonto: Setup) -> None:
    adapter, sim = qonto
    await adapter.create(
        company(id="a", name="Other", email="other@example.com", vat_number=None, tax_id=None)
    )
    acme = await adapter.create(company())
    sim.calls.clear()
    found = await adapter.find(company(email="BILLING@acme.example"))
    assert found is not None
    assert found.id == acme.id
    assert "filter%5Bemail%5D=BILLING@acme.example" in sim.calls[0].path
    by_vat = await adapter.find(company(email="new@acme.example"))
    assert by_vat is not None
    assert by_vat.id == acme.id
    assert await adapter.find(company(email="nobody@example.com", vat_number="X", tax_id="Y")) is None


async def test_list_follows_meta_next_page(qonto: Setup) -> None:
    adapter, sim = qonto
    for n in range(5):
        await adapter.create(company(name=f"Client {n}"))
    sim.calls.clear()
    names = [c.data["name"] async for c in adapter.list(page_size=2)]
    assert names == [f"Client {n}" for n in range(5)]
    assert len(sim.calls) == 3


async def test_a_429_is_rate_limited_with_the_json_api_detail(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["qonto"], faults={"qonto": Faults(throttle_next=1, retry_after=None)})
    adapter = make_adapter("qonto", sandbox, session, monkeypatch)
    with pytest.raises(RateLimitedError) as info:
        await adapter.get("00000000-0000-4000-8000-000000000000")
    assert info.value.message == "Rate limit exceeded"
    assert info.value.retry_after is None


async def test_a_staging_token_header_in_another_case_is_refused(
    start: StartSandbox, session: aiohttp.ClientSession
) -> None:
    sandbox = await start(["qonto"])
    creds = sandbox.simulators["qonto"].credentials
    headers = {"Authorization": f"Bearer {creds['token']}", "x-qonto-staging-token": creds["staging_token"]}
    async with session.get(f"{sandbox.base_url('qonto')}/v2/clients", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["errors"][0]["code"] == "unauthorized"
