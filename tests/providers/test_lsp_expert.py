"""LSP.expert adapter against its simulator over real HTTP on loopback."""

from __future__ import annotations

import base64

import aiohttp
import pytest

from tests.providers.conftest import StartSandbox, make_adapter
from worker.errors import AuthError, LocalValidationError, NotFound, ProviderValidationError, RateLimitedError
from worker.models import Address, Client, Contact
from worker.providers.lsp_expert import LSPExpert
from worker.sandbox.base import Faults
from worker.sandbox.lsp_expert import LSPExpertSandbox

Setup = tuple[LSPExpert, LSPExpertSandbox]


@pytest.fixture
async def lsp(start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> Setup:
    sandbox = await start(["lsp_expert"])
    adapter = make_adapter("lsp_expert", sandbox, session, monkeypatch)
    assert isinstance(adapter, LSPExpert)
    sim = sandbox.simulators["lsp_expert"]
    assert isinstance(sim, LSPExpertSandbox)
    return adapter, sim


def acme(**changes: object) -> Client:
    data: dict[str, object] = {
        "id": "crm-1",
        "name": "Acme SARL",
        "email": "billing@acme.example",
        "vat_number": "FR12345678901",
        "tax_id": "12345678900011",
        "currency": "EUR",
        "notes": "Net 30",
        "billing_address": Address(line1="1 rue de la Paix", city="Paris", postal_code="75002", country="FR"),
        "contacts": (Contact(first_name="Jane", last_name="Doe", email="jane@acme.example"),),
    }
    data.update(changes)
    return Client.model_validate(data)


async def test_auth_is_basic_with_the_key_as_user_and_an_empty_password(lsp: Setup) -> None:
    adapter, sim = lsp
    scheme, _, token = adapter.auth_headers()["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode() == f"{sim.credentials['api_key']}:"
    # the simulator accepts only that exact form, so a successful call proves it went over the wire
    assert [c async for c in adapter.list()] == []


async def test_a_wrong_key_is_an_auth_error_with_the_providers_message(lsp: Setup) -> None:
    adapter, sim = lsp
    sim.credentials["api_key"] = "another-key"
    with pytest.raises(AuthError) as info:
        await adapter.get("0" * 24)
    assert info.value.status == 401
    assert info.value.message == "Unauthorized"


async def test_create_sends_the_client_then_its_contacts_and_the_clients_own_email(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    assert len(remote.id) == 24
    int(remote.id, 16)
    record = sim.clients[remote.id]
    assert record["name"] == "Acme SARL"
    assert record["vatNumber"] == "FR12345678901"
    assert record["nationalIdentificationNumber"] == "12345678900011"
    assert record["address"]["country"] == "FR"
    assert record["invoice"]["currency"]["code"] == "EUR"
    assert [(c["fullName"], c["email"]) for c in record["contacts"]] == [
        ("Acme SARL", "billing@acme.example"),
        ("Jane Doe", "jane@acme.example"),
    ]
    back = adapter.from_wire(remote.data)
    assert back.name == "Acme SARL"
    assert back.billing_address == acme().billing_address
    assert back.email == "billing@acme.example"


async def test_an_individual_without_a_company_name_is_named_first_last(lsp: Setup) -> None:
    adapter, sim = lsp
    person = Client(id="p1", kind="individual", first_name="Ada", last_name="Lovelace")
    remote = await adapter.create(person)
    assert sim.clients[remote.id]["name"] == "Ada Lovelace"


async def test_a_client_without_any_name_is_rejected_locally_before_any_call(lsp: Setup) -> None:
    adapter, sim = lsp
    with pytest.raises(LocalValidationError) as info:
        await adapter.create(Client(id="x", email="who@example.com"))
    assert "name" in info.value.field_errors
    assert sim.calls == []


async def test_the_simulators_422_becomes_field_errors(lsp: Setup) -> None:
    adapter, _ = lsp
    with pytest.raises(ProviderValidationError) as info:
        await adapter.request("POST", "/v2/clients", json_body={"vatNumber": "X"})
    assert info.value.status == 422
    assert "name" in info.value.field_errors
    assert "required" in info.value.message


async def test_put_is_partial_and_leaves_omitted_fields_unchanged(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    await adapter.request("PUT", f"/v2/clients/{remote.id}", json_body={"details": "Net 45"})
    record = sim.clients[remote.id]
    assert record["details"] == "Net 45"
    assert record["vatNumber"] == "FR12345678901"
    assert record["name"] == "Acme SARL"
    updated = await adapter.update(remote.id, acme(name="Acme SAS", vat_number=None, status="archived"))
    assert updated.data["name"] == "Acme SAS"
    assert updated.data["archived"] is True
    # a field cleared at the source is sent as "" so the partial PUT empties it
    assert updated.data["vatNumber"] == ""
    assert adapter.from_wire(updated.data).vat_number is None
    assert adapter.from_wire(updated.data).status == "archived"


async def test_a_changed_phone_updates_the_clients_own_contact_in_place(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme(phone="+33 1 23 45 67 89"))
    assert adapter.from_wire(remote.data).phone == "+33 1 23 45 67 89"
    sim.calls.clear()
    updated = await adapter.update(remote.id, acme(phone=None))
    assert adapter.from_wire(updated.data).phone is None
    assert len(sim.clients[remote.id]["contacts"]) == 2
    puts = [
        c.path.removeprefix(f"/lsp_expert/v2/clients/{remote.id}") for c in sim.calls if c.method == "PUT"
    ]
    own = sim.clients[remote.id]["contacts"][0]["id"]
    assert puts == ["", f"/contacts/{own}"]  # the client, then only the contact that changed


async def test_update_adds_only_the_contacts_that_are_missing(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    more = (*acme().contacts, Contact(first_name="Max", last_name="Roe", email="max@acme.example"))
    await adapter.update(remote.id, acme(contacts=more))
    await adapter.update(remote.id, acme(contacts=more))
    emails = [c["email"] for c in sim.clients[remote.id]["contacts"]]
    assert emails == ["billing@acme.example", "jane@acme.example", "max@acme.example"]


async def test_list_walks_every_page_by_has_next_page(lsp: Setup) -> None:
    adapter, sim = lsp
    for n in range(45):
        await adapter.request("POST", "/v2/clients", json_body={"name": f"Client {n:02d}"})
    first = await adapter.request("GET", "/v2/clients")
    assert (first["pageSize"], first["totalPages"], first["totalItems"]) == (20, 3, 45)
    assert (first["hasNextPage"], first["hasPreviousPage"]) == (True, False)
    sim.calls.clear()
    names = [c.data["name"] async for c in adapter.list(page_size=20)]
    assert names == [f"Client {n:02d}" for n in range(45)]
    assert [c.path for c in sim.calls] == [f"/lsp_expert/v2/clients?page={p}&pageSize=20" for p in (1, 2, 3)]


async def test_list_still_walks_every_page_when_the_server_ignores_page_size(lsp: Setup) -> None:
    adapter, sim = lsp
    sim.honour_page_size = False
    for n in range(25):
        await adapter.request("POST", "/v2/clients", json_body={"name": f"Client {n:02d}"})
    sim.calls.clear()
    assert len([c async for c in adapter.list(page_size=100)]) == 25
    assert len(sim.calls) == 2


async def test_an_unknown_id_is_not_found_with_the_providers_message(lsp: Setup) -> None:
    adapter, _ = lsp
    with pytest.raises(NotFound) as info:
        await adapter.get("65af6f23014c1c7a227e890f")
    assert info.value.status == 404
    assert info.value.message == "Item not found"


async def test_delete_removes_the_client(lsp: Setup) -> None:
    adapter, _ = lsp
    remote = await adapter.create(acme())
    await adapter.delete(remote.id)
    with pytest.raises(NotFound):
        await adapter.get(remote.id)
    with pytest.raises(NotFound):
        await adapter.delete(remote.id)


async def test_find_scans_for_vat_then_national_id_then_email_then_name(lsp: Setup) -> None:
    adapter, _ = lsp
    by_vat = await adapter.create(acme(name="Same Name"))
    other = acme(id="c2", name="Other", vat_number=None, tax_id="999", email="ops@other.example", contacts=())
    by_other = await adapter.create(other)

    async def found_id(client: Client) -> str | None:
        found = await adapter.find(client)
        return found.id if found else None

    assert await found_id(acme(name="Other")) == by_vat.id  # the VAT number outranks the name
    assert await found_id(Client(id="z", name="Nope", tax_id="999")) == by_other.id
    assert await found_id(Client(id="z", name="Nope", email="OPS@other.example")) == by_other.id
    assert await found_id(Client(id="z", name="Other")) == by_other.id
    assert await found_id(Client(id="z", name="Nobody", email="no@example.com")) is None


async def test_a_429_is_rate_limited_with_retry_after(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["lsp_expert"], faults={"lsp_expert": Faults(throttle_next=1, retry_after=2.0)})
    adapter = make_adapter("lsp_expert", sandbox, session, monkeypatch)
    with pytest.raises(RateLimitedError) as info:
        await adapter.get("65af6f23014c1c7a227e890f")
    assert info.value.retry_after == 2.0
    assert info.value.message == "Too many requests"
