"""Invoice Ninja v5 adapter against its simulator, over real HTTP on loopback."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from openapi_schema_validator import OAS30Validator, OAS30WriteValidator

from tests.helpers import ENDINGS
from tests.providers.conftest import StartSandbox, make_adapter, resent, unclear_write
from worker.errors import (
    AuthError,
    LocalValidationError,
    NotFound,
    PermanentError,
    ProviderValidationError,
)
from worker.identity import exact_matches
from worker.models import Address, Client, Contact
from worker.providers.invoice_ninja import InvoiceNinja
from worker.sandbox.invoice_ninja import InvoiceNinjaSandbox
from worker.sandbox.server import RunningSandbox

NAME = "invoice_ninja"
# a copy of Invoice Ninja's published spec kept in the repo (tests/data/invoiceninja-openapi/PROVENANCE.md)
SPEC = Path(__file__).resolve().parents[1] / "data" / "invoiceninja-openapi" / "api-docs.yaml"

ADA = Contact(first_name="Ada", last_name="Lovelace", email="ada@engines.example", phone="+44 1")
BOB = Contact(first_name="Bob", last_name="Babbage", email="bob@engines.example")


def rich(**changes: Any) -> Client:
    base: dict[str, Any] = {
        "id": "engines",
        "kind": "company",
        "name": "Analytical Engines Ltd",
        "email": "ada@engines.example",
        "phone": "+39 02 1234 5678",
        "website": "https://engines.example",
        "vat_number": "IT12345678901",
        "tax_id": "RSSMRA80A01F205X",
        "billing_address": Address(
            line1="Via Dante 1",
            line2="Scala B",
            city="Milano",
            region="MI",
            postal_code="20121",
            country="IT",
        ),
        "shipping_address": Address(line1="Hauptstraße 5", city="Berlin", postal_code="10115", country="DE"),
        "currency": "EUR",
        "notes": "Prefers email.",
        "contacts": (ADA, BOB),
    }
    return Client.model_validate({**base, **changes})


@pytest.fixture
async def sandbox(start: StartSandbox) -> RunningSandbox:
    return await start([NAME])


@pytest.fixture
def sim(sandbox: RunningSandbox) -> InvoiceNinjaSandbox:
    simulator = sandbox.simulators[NAME]
    assert isinstance(simulator, InvoiceNinjaSandbox)
    return simulator


@pytest.fixture
def adapter(sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> InvoiceNinja:
    made = make_adapter(NAME, sandbox, session, monkeypatch)
    assert isinstance(made, InvoiceNinja)
    return made


def contact_ids(sim: InvoiceNinjaSandbox, remote_id: str) -> dict[str, str]:
    return {c["email"]: c["id"] for c in sim.clients[remote_id]["contacts"]}


def bulk_calls(sim: InvoiceNinjaSandbox) -> list[Any]:
    return [body for method, path, body in sim.bodies if path.endswith("/clients/bulk")]


# --- contacts ---------------------------------------------------------------------------------
async def test_update_keeps_contact_ids_matched_by_email(adapter: InvoiceNinja, sim: InvoiceNinjaSandbox) -> None:
    remote = await adapter.create(rich())
    before = contact_ids(sim, remote.id)
    carol = Contact(first_name="Carol", email="carol@engines.example")
    moved = BOB.model_copy(update={"phone": "+44 2"})

    await adapter.update(remote.id, rich(contacts=(ADA, carol, moved)))

    after = contact_ids(sim, remote.id)
    assert after["ada@engines.example"] == before["ada@engines.example"]
    assert after["bob@engines.example"] == before["bob@engines.example"], "Bob was deleted and recreated"
    assert after["carol@engines.example"] not in before.values()
    bob = next(c for c in sim.clients[remote.id]["contacts"] if c["email"] == "bob@engines.example")
    assert bob["phone"] == "+44 2"


async def test_update_drops_only_the_contacts_no_longer_wanted(adapter: InvoiceNinja, sim: InvoiceNinjaSandbox) -> None:
    remote = await adapter.create(rich())
    before = contact_ids(sim, remote.id)
    await adapter.update(remote.id, rich(contacts=(BOB,)))
    assert contact_ids(sim, remote.id) == {"bob@engines.example": before["bob@engines.example"]}
    assert sim.clients[remote.id]["contacts"][0]["is_primary"]


async def test_client_without_contacts_sends_one_and_keeps_its_id_when_email_changes(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    person = Client(id="p1", kind="individual", first_name="Zoë", last_name="Łukasz", email="zoe@example.com")
    remote = await adapter.create(person)
    [first] = sim.clients[remote.id]["contacts"]
    assert (first["first_name"], first["email"]) == ("Zoë", "zoe@example.com")

    await adapter.update(remote.id, person.model_copy(update={"email": "zoe@new.example"}))
    [second] = sim.clients[remote.id]["contacts"]
    assert second["id"] == first["id"]
    assert second["email"] == "zoe@new.example"


# --- status ------------------------------------------------------------------------------------
async def test_archive_and_restore_go_through_bulk_only_when_the_state_differs(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    remote = await adapter.create(rich(status="archived"))
    assert sim.clients[remote.id]["archived_at"]
    assert bulk_calls(sim) == [{"action": "archive", "ids": [remote.id]}]
    assert adapter.from_wire((await adapter.get(remote.id)).data).status == "archived"

    await adapter.update(remote.id, rich(status="archived"))
    assert len(bulk_calls(sim)) == 1, "already archived: no second archive"

    restored = await adapter.update(remote.id, rich(status="active"))
    assert bulk_calls(sim)[-1] == {"action": "restore", "ids": [remote.id]}
    assert not sim.clients[remote.id]["archived_at"]
    assert adapter.from_wire(restored.data).status == "active"


async def test_delete_is_soft_and_a_deleted_client_is_neither_got_listed_nor_found(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    client = rich()
    remote = await adapter.create(client)
    await adapter.delete(remote.id)
    assert sim.clients[remote.id]["is_deleted"] is True
    with pytest.raises(NotFound):
        await adapter.get(remote.id)
    assert [r.id async for r in adapter.list()] == []
    assert await exact_matches(adapter, client) == []


async def test_restore_brings_a_deleted_client_back(adapter: InvoiceNinja, sim: InvoiceNinjaSandbox) -> None:
    remote = await adapter.create(rich())
    await adapter.delete(remote.id)
    restored = await adapter.restore(remote.id)
    assert restored.id == remote.id
    assert bulk_calls(sim)[-1] == {"action": "restore", "ids": [remote.id]}
    assert (await adapter.get(remote.id)).id == remote.id
    with pytest.raises(NotFound):
        await adapter.restore("Zz9Qq1Ww3E")


# --- identity ------------------------------------------------------------------------------------
async def test_the_source_id_is_stamped_into_number_on_create_and_update_and_not_read_back(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    remote = await adapter.create(rich())
    assert sim.clients[remote.id]["number"] == "cs:engines"  # prefixed: IN numbers clients itself
    sim.clients[remote.id]["number"] = "0042"  # someone renumbers it in the UI
    assert adapter.stamped(await adapter.get(remote.id)) is None  # IN's own numbers are nobody's stamp
    await adapter.update(remote.id, rich(phone="+39 1"))
    assert sim.clients[remote.id]["number"] == "cs:engines"
    record = await adapter.get(remote.id)
    assert adapter.stamped(record) == "engines"
    assert "engines" not in adapter.from_wire(record.data).model_dump().values()


async def test_search_by_stamp_tax_id_email_and_name_is_exact_across_pages(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    for i in range(103):  # more than a page of 100 share the email and part of the name
        await adapter.create(rich(id=f"c{i}", tax_id=f"TAX-{i}", name=f"Engines {i}"))
    assert [r.data["number"] for r in await adapter.search("stamp", "c7")] == ["cs:c7"]
    assert [r.data["id_number"] for r in await adapter.search("tax_id", "TAX-1")] == ["TAX-1"]
    assert len(await adapter.search("email", "ADA@engines.example")) == 103
    assert [r.data["name"] for r in await adapter.search("name", "Engines 10")] == ["Engines 10"]
    lists = [c.path for c in sim.calls if c.method == "GET" and "email=" in c.path]
    assert len(lists) == 2, "103 matches at 100 a page take two pages"
    assert await adapter.search("stamp", "c") == []


async def test_a_custom_value_stamp_is_searched_through_filter_and_rechecked(
    sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch, id_field="custom_value2")
    assert isinstance(adapter, InvoiceNinja)
    a = await adapter.create(rich(id="src-1", tax_id="T1"))
    await adapter.create(rich(id="src-10", tax_id="T10"))
    assert a.data["custom_value2"] == "cs:src-1"
    assert [r.id for r in await adapter.search("stamp", "src-1")] == [a.id]
    assert [r.id for r in await exact_matches(adapter, rich(id="src-1", tax_id="T1"))] == [a.id]


async def test_a_stamp_field_that_cannot_be_searched_is_a_permanent_error(
    sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch, id_field="website")
    with pytest.raises(PermanentError, match="website"):
        await adapter.search("stamp", "x")


async def test_a_repeated_create_adopts_its_own_stamped_record_instead_of_a_second(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    first = await adapter.create(rich())
    again = await adapter.create(rich(phone="+39 9"))
    assert again.id == first.id
    assert len(sim.clients) == 1
    assert sim.clients[first.id]["phone"] == "+39 9"


async def test_a_create_after_a_delete_restores_the_stamped_record(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    first = await adapter.create(rich())
    await adapter.delete(first.id)
    again = await adapter.create(rich(name="Back Again Ltd"))
    assert again.id == first.id
    assert not sim.clients[first.id]["is_deleted"]
    assert sim.clients[first.id]["name"] == "Back Again Ltd"


async def test_a_taken_id_number_of_another_client_is_not_adopted(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    await adapter.create(rich(id="a", tax_id="TAX-A"))
    with pytest.raises(ProviderValidationError) as info:  # same id_number, another stamp
        await adapter.create(rich(id="b", tax_id="TAX-A"))
    assert "id_number" in info.value.field_errors
    assert len(sim.clients) == 1


# --- errors ----------------------------------------------------------------------------------------
async def test_unknown_id_answered_400_is_not_found(adapter: InvoiceNinja) -> None:
    for call in (
        adapter.get("Zz9Qq1Ww3E"),
        adapter.update("Zz9Qq1Ww3E", rich()),
        adapter.delete("Zz9Qq1Ww3E"),
    ):
        with pytest.raises(NotFound) as info:
            await call
        assert info.value.status in (400, None)


async def test_invalid_token_403_is_auth_error(
    sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch, token="not-the-token")
    with pytest.raises(AuthError) as info:
        await adapter.get("Zz9Qq1Ww3E")
    assert (info.value.status, info.value.message) == (403, "Invalid token")


async def test_422_field_errors_are_kept(adapter: InvoiceNinja) -> None:
    await adapter.create(rich(id="a"))
    with pytest.raises(ProviderValidationError) as info:
        await adapter.create(rich(id="b", email="other@example.com", contacts=()))  # same id_number
    assert info.value.status == 422
    assert info.value.message == "The given data was invalid."
    assert "id_number" in info.value.field_errors
    assert "id_number" in str(info.value)


@pytest.mark.parametrize(
    ("client", "field"),
    [
        (rich(contacts=(Contact(email=f"{'a' * 95}@x.example"),)), "contacts.0.email"),
        (rich(name="n" * 192), "name"),
        (rich(shipping_address=Address(city="c" * 192, country="DE")), "shipping_city"),
        (rich(currency="XDR"), "currency"),
    ],
)
async def test_validate_rejects_locally_naming_field_and_rule(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox, client: Client, field: str
) -> None:
    with pytest.raises(LocalValidationError) as info:
        await adapter.create(client)
    assert list(info.value.field_errors) == [field]
    assert sim.calls == [], "nothing may reach the provider"


# --- mapping -----------------------------------------------------------------------------------------
async def test_countries_are_iso_numeric_and_map_back(adapter: InvoiceNinja, sim: InvoiceNinjaSandbox) -> None:
    remote = await adapter.create(rich())
    [(_, _, body)] = sim.bodies
    assert (body["country_id"], body["shipping_country_id"]) == (380, 276)
    assert (sim.clients[remote.id]["country_id"], sim.clients[remote.id]["shipping_country_id"]) == (
        "380",
        "276",
    )
    got = adapter.from_wire((await adapter.get(remote.id)).data)
    assert got.billing_address == rich().billing_address
    assert got.shipping_address == rich().shipping_address


async def test_currency_goes_to_settings_and_an_update_keeps_other_overrides(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    remote = await adapter.create(rich())
    assert sim.clients[remote.id]["settings"] == {"currency_id": "3"}
    sim.clients[remote.id]["settings"]["language_id"] = "7"  # set by someone in the IN UI
    await adapter.update(remote.id, rich(currency="USD"))
    assert sim.clients[remote.id]["settings"] == {"currency_id": "1", "language_id": "7"}


async def test_removed_scalar_is_sent_as_empty_string(adapter: InvoiceNinja, sim: InvoiceNinjaSandbox) -> None:
    remote = await adapter.create(rich())
    await adapter.update(remote.id, rich(website=None, vat_number=None))
    assert (sim.clients[remote.id]["website"], sim.clients[remote.id]["vat_number"]) == ("", "")
    got = adapter.from_wire((await adapter.get(remote.id)).data)
    assert (got.website, got.vat_number) == (None, None)


# --- the wire against the published spec ---------------------------------------------------------
@lru_cache(maxsize=1)
def client_request_schema() -> dict[str, Any]:
    """`ClientRequest` with its `$ref`s resolvable: the spec's schemas ride along in the root."""
    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    return {
        "$ref": "#/components/schemas/ClientRequest",
        "components": {"schemas": spec["components"]["schemas"]},
    }


async def test_every_request_body_validates_against_client_request(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    remote = await adapter.create(rich())
    carol = Contact(first_name="Carol", email="carol@engines.example", is_primary=True)
    await adapter.update(remote.id, rich(contacts=(ADA, carol), phone=None, shipping_address=None))
    await adapter.update(remote.id, rich(billing_address=None, currency=None, status="archived"))
    await adapter.create(Client(id="bare", name="Bare Minimum", email="bare@example.com"))
    writes = [(method, body) for method, path, body in sim.bodies if not path.endswith("/bulk")]
    assert [method for method, _ in writes] == ["POST", "PUT", "PUT", "POST"]
    *bodies, bare = [body for _, body in writes]

    schema = client_request_schema()
    # With no address at all the company's country is sent (the spec requires country_id).
    assert bare["country_id"] == 840
    for body in [*bodies, bare]:
        errors = [e.message for e in OAS30Validator(schema).iter_errors(body)]
        assert errors == [], (errors, body)
        # The spec marks a contact's `id` readOnly, yet the server matches contacts by it on PUT
        # (ClientContactRepository); that is the only write-side objection allowed.
        write_errors = list(OAS30WriteValidator(schema).iter_errors(body))
        assert all(list(e.absolute_path)[:1] == ["contacts"] and "read-only" in e.message for e in write_errors)
    bulk = {**schema, "$ref": "#/components/schemas/GenericBulkAction"}
    assert bulk_calls(sim) == [{"action": "archive", "ids": [remote.id]}]
    assert [e.message for e in OAS30Validator(bulk).iter_errors(bulk_calls(sim)[0])] == []
    put = bodies[1]
    assert any("id" in c for c in put["contacts"]), "the update must reuse existing contact ids"


async def test_the_client_email_rides_on_a_primary_contact_that_has_none_so_find_works(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = await start(["invoice_ninja"])
    adapter = make_adapter("invoice_ninja", sb, session, monkeypatch)
    client = Client(
        id="c-mail",
        name="Mail Carrier SA",
        email="billing@carrier.example",
        contacts=(Contact(first_name="Ana", last_name="Lima"),),
    )
    created = await adapter.create(client)
    assert [r.id for r in await adapter.search("email", "billing@carrier.example")] == [created.id]
    assert created.data["contacts"][0]["email"] == "billing@carrier.example"


# --- country_id, which the spec requires on every write ----------------------------------------------
async def test_a_client_without_an_address_gets_the_companys_country_read_once(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    sim.readings.company_countries = [380]
    for i in range(2):
        await adapter.create(Client(id=f"bare-{i}", name=f"Bare {i}", email=f"bare{i}@example.com"))
    assert [body["country_id"] for _, _, body in sim.bodies] == [380, 380]
    assert [c.path for c in sim.calls].count("/invoice_ninja/api/v1/companies") == 1


async def test_the_country_setting_saves_the_companies_call(
    sandbox: RunningSandbox,
    sim: InvoiceNinjaSandbox,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch, country="CH")
    await adapter.create(Client(id="bare", name="Bare", email="bare@example.com"))
    assert sim.bodies[0][2]["country_id"] == 756
    assert [c.method for c in sim.calls] == ["POST"]


async def test_several_companies_without_the_setting_is_a_permanent_error_naming_it(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    sim.readings.company_countries = [840, 276]
    with pytest.raises(PermanentError, match="CLIENTSYNC_INVOICE_NINJA_COUNTRY"):
        await adapter.create(Client(id="bare", name="Bare", email="bare@example.com"))
    assert sim.clients == {}


async def test_an_update_that_drops_the_address_keeps_a_country(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    remote = await adapter.create(rich())
    await adapter.update(remote.id, rich(billing_address=None))
    assert sim.bodies[-1][2]["country_id"] == 380, "the record's country is resent"
    assert sim.clients[remote.id]["address1"] == ""


# --- the strict sandbox and the readings the docs leave open --------------------------------------------
async def test_the_strict_sandbox_refuses_unknown_read_only_and_missing_required_fields(
    adapter: InvoiceNinja, sim: InvoiceNinjaSandbox
) -> None:
    body = {"name": "X", "contacts": [{"email": "x@example.com", "is_primary": True}], "tags": ["a"],
            "is_deleted": False}  # fmt: skip
    with pytest.raises(ProviderValidationError) as info:
        await adapter.request("POST", "/api/v1/clients", json_body=body)
    assert set(info.value.field_errors) == {"tags", "is_deleted", "contacts.0.is_primary", "country_id"}
    with pytest.raises(ProviderValidationError) as info:
        await adapter.request("POST", "/api/v1/clients", json_body={"country_id": "840", "contacts": []})
    assert set(info.value.field_errors) == {"country_id"}, "the spec types country_id as a number"
    assert sim.clients == {}


@pytest.mark.parametrize(
    "reading",
    [
        {"unknown_fields": "reject", "spec_required": True},
        {"unknown_fields": "ignore", "spec_required": False},
    ],
    ids=["strict-spec", "lenient-server"],
)
async def test_the_adapter_works_under_each_reading(
    adapter: InvoiceNinja,
    sim: InvoiceNinjaSandbox,
    session: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    reading: dict[str, Any],
) -> None:
    async with session.post(f"{sandbox.base_url(NAME)}/_sandbox/settings", json=reading) as resp:
        assert resp.status == 200
    remote = await adapter.create(rich(status="archived"))
    await adapter.update(remote.id, rich(phone=None, contacts=(BOB,)))
    bare = await adapter.create(Client(id="bare", name="Bare", email="bare@example.com"))
    got = adapter.from_wire((await adapter.get(remote.id)).data)
    assert (got.phone, got.status, got.email) == (None, "active", "bob@engines.example")
    assert [r.id for r in await exact_matches(adapter, rich())] == [remote.id]
    assert adapter.from_wire((await adapter.get(bare.id)).data).name == "Bare"
    await adapter.delete(remote.id)
    with pytest.raises(NotFound):
        await adapter.get(remote.id)


# --- every field changed, then cleared -------------------------------------------------------------------
async def test_update_with_every_field_changed_then_cleared(adapter: InvoiceNinja, sim: InvoiceNinjaSandbox) -> None:
    remote = await adapter.create(rich())
    changed = rich(
        kind="individual", name="Other Name", phone="+1 2", website="https://other.example",
        vat_number="DE999", tax_id="OTHER-TAX", notes="Changed.", currency="USD", status="archived",
        billing_address=Address(line1="1 Main St", city="Boston", region="MA", postal_code="02110", country="US"),
        shipping_address=Address(line1="2 Side St", city="Lyon", postal_code="69001", country="FR"),
        contacts=(Contact(first_name="Carol", last_name="Jones", email="carol@other.example", phone="+1 3"),),
    )  # fmt: skip
    await adapter.update(remote.id, changed)
    got = adapter.from_wire((await adapter.get(remote.id)).data)
    expected = changed.model_copy(update={"id": remote.id, "first_name": "Carol", "last_name": "Jones",
                                          "email": "carol@other.example"})  # fmt: skip
    assert got.model_dump(exclude={"contacts"}) == expected.model_dump(exclude={"contacts"})
    assert [(c.email, c.phone) for c in got.contacts] == [("carol@other.example", "+1 3")]

    cleared = Client(id="engines", name="Only A Name")
    await adapter.update(remote.id, cleared)
    got = adapter.from_wire((await adapter.get(remote.id)).data)
    # A removed currency stays: the spec's ClientSettings requires currency_id (see field_map).
    assert got == cleared.model_copy(update={"id": remote.id, "currency": "USD"})
    assert adapter.unsupported_fields(cleared) == []


# --- the three unclear endings of every write path --------------------------------------------------------
@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("path", ["create", "update", "archive", "delete"])
async def test_an_unclear_write_raises_unclear_and_its_repeat_converges(
    sandbox: RunningSandbox,
    sim: InvoiceNinjaSandbox,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
    path: str,
) -> None:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch, timeout=0.5)
    assert isinstance(adapter, InvoiceNinja)
    remote = None if path == "create" else await adapter.create(rich())
    match = {"create": "POST /invoice_ninja/api/v1/clients", "update": "PUT ", "archive": "/bulk",
             "delete": "DELETE"}[path]  # fmt: skip

    async def act() -> None:
        if path == "create":
            await adapter.create(rich())
        elif path == "delete":
            assert remote is not None
            await adapter.delete(remote.id)
        else:
            assert remote is not None
            await adapter.update(remote.id, rich(phone="+39 7", status="archived" if path == "archive" else "active"))

    outcome = await unclear_write(sim, ending, match, act, lambda: getattr(sim.faults, ending) == 0 and (
        path != "create" or len(sim.clients) == 1) and (
        path != "delete" or any(c["is_deleted"] for c in sim.clients.values())) and (
        path != "archive" or any(c["archived_at"] for c in sim.clients.values())))  # fmt: skip
    # The delete is soft: a re-sent DELETE still finds the record and answers 200, never 404.
    assert not isinstance(outcome, NotFound) and resent(sim, "DELETE") != 404
    await act()  # the repeat (what the retry does after settling) converges
    [record] = sim.clients.values()
    if path == "delete":
        assert record["is_deleted"]
    else:
        assert (record["phone"], record["number"]) == ("+39 7" if path != "create" else rich().phone, "cs:engines")
        assert bool(record["archived_at"]) == (path == "archive")


# --- nothing dropped silently -----------------------------------------------------------------------------
def test_the_field_map_covers_every_canonical_field() -> None:
    assert list(InvoiceNinja.field_map) == list(Client.model_fields)
    assert all(v.startswith(("sent as ", "not supported", "derived")) for v in InvoiceNinja.field_map.values())


async def test_unsupported_fields_names_what_invoice_ninja_cannot_hold(
    sandbox: RunningSandbox,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    adapter: InvoiceNinja,
) -> None:
    assert adapter.unsupported_fields(rich()) == []
    assert adapter.unsupported_fields(rich(tags=("vip",), locale="it_IT")) == ["locale", "tags"]
    by_id_number = make_adapter(NAME, sandbox, session, monkeypatch, id_field="id_number")
    assert isinstance(by_id_number, InvoiceNinja)
    assert by_id_number.unsupported_fields(rich()) == ["tax_id"]


async def test_a_lookup_by_several_non_unique_keys_sends_its_searches_at_once(
        adapter: InvoiceNinja, sim: InvoiceNinjaSandbox) -> None:
    """`search_any` (namesakes, lookalikes) sends one search per key together, so a first create
    waits for the slowest, not their sum. Proven with the sandbox holding every call: both
    searches are in flight before either is answered. The answer is the same as one by one."""
    import asyncio
    import time

    from worker.identity import field_value

    client = Client(id="c-any", name="Acme Any", email="any@acme.test")
    one = (await adapter.create(Client(id="c-one", name="Acme Any", email="one@acme.test"))).id
    two = (await adapter.create(Client(id="c-two", name="Other", email="any@acme.test"))).id
    searches = [(key, value) for key in adapter.identity.similar if (value := field_value(client, key))]
    assert len(searches) == 2
    sim.faults.hold = True
    sim._hold(True)
    try:
        lookup = asyncio.create_task(adapter.search_any(searches))
        deadline = time.monotonic() + 30  # guards a hang only
        while sim.in_flight < 2:
            assert not lookup.done() and time.monotonic() < deadline, "the searches were not sent together"
            await asyncio.sleep(0.005)
    finally:
        sim.faults.hold = False
        sim._hold(False)
    found = [r.id for r in await lookup]
    one_by_one = [r.id for key, value in searches for r in await adapter.search(key, value)]
    assert sorted(found) == sorted({one, two}) and found == list(dict.fromkeys(one_by_one))
