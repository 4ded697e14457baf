"""LSP.expert adapter against its simulator over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.helpers import ENDINGS
from tests.providers.conftest import StartSandbox, make_adapter, unclear_write
from worker.errors import (
    AuthError,
    LocalValidationError,
    NotFound,
    PermanentError,
    ProviderValidationError,
    RateLimitedError,
    TransientError,
)
from worker.identity import lookalikes, namesakes
from worker.models import Address, Client, Contact
from worker.providers.base import RemoteClient
from worker.providers.lsp_expert import LSPExpert
from worker.sandbox.base import Faults
from worker.sandbox.lsp_expert import _CREATE_FIELDS, _UPDATE_ONLY, LSPExpertSandbox
from worker.sandbox.server import RunningSandbox

Setup = tuple[LSPExpert, LSPExpertSandbox]


@pytest.fixture
async def sandbox(start: StartSandbox) -> RunningSandbox:
    return await start(["lsp_expert"])


@pytest.fixture
async def lsp(sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> Setup:
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


def writes(sim: LSPExpertSandbox, remote_id: str) -> list[str]:
    """The write calls made so far, as "METHOD /suffix" after /v2/clients/<id>."""
    prefix = f"/lsp_expert/v2/clients/{remote_id}"
    return [f"{c.method} {c.path.removeprefix(prefix)}" for c in sim.calls if c.method != "GET"]


# --- auth and errors ------------------------------------------------------------------------
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


async def test_the_simulators_422_becomes_field_errors(lsp: Setup) -> None:
    adapter, _ = lsp
    with pytest.raises(ProviderValidationError) as info:
        await adapter.request("POST", "/v2/clients", json_body={"vatNumber": "X"})
    assert info.value.status == 422
    assert "name" in info.value.field_errors
    assert "required" in info.value.message


async def test_an_unknown_id_is_not_found_with_the_providers_message(lsp: Setup) -> None:
    adapter, _ = lsp
    with pytest.raises(NotFound) as info:
        await adapter.get("65af6f23014c1c7a227e890f")
    assert info.value.status == 404
    assert info.value.message == "Item not found"


async def test_a_429_is_rate_limited_with_retry_after(
    start: StartSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = await start(["lsp_expert"], faults={"lsp_expert": Faults(throttle_next=1, retry_after=2.0)})
    adapter = make_adapter("lsp_expert", sandbox, session, monkeypatch)
    with pytest.raises(RateLimitedError) as info:
        await adapter.get("65af6f23014c1c7a227e890f")
    assert info.value.retry_after == 2.0
    assert info.value.message == "Too many requests"


# --- the strict sandbox ---------------------------------------------------------------------
async def test_the_sandbox_refuses_update_only_and_unknown_fields_on_create(lsp: Setup) -> None:
    adapter, sim = lsp
    for body in ({"name": "X", "archived": False}, {"name": "X", "website": "https://x.example"}):
        with pytest.raises(ProviderValidationError) as info:
            await adapter.request("POST", "/v2/clients", json_body=body)
        assert set(info.value.field_errors) == set(body) - {"name"}
    assert sim.clients == {}
    sim.readings.unknown_fields = "ignore"  # the other reading: unknown fields dropped
    await adapter.request("POST", "/v2/clients", json_body={"name": "X", "website": "https://x.example"})
    assert [c["name"] for c in sim.clients.values()] == ["X"]


def test_the_create_and_update_bodies_hold_only_documented_parameters() -> None:
    adapter = LSPExpert.__new__(LSPExpert)  # mapping only: no config or session needed
    adapter.config = LSPExpert.settings_class(api_key="k")
    full = acme(status="archived", phone="+33 1", website="https://acme.example", tags=("vip",))
    create = adapter.to_wire(full)
    assert set(create) <= _CREATE_FIELDS
    assert "archived" not in create
    update = adapter.to_wire(full, existing=None or _existing())
    assert set(update) <= _CREATE_FIELDS | _UPDATE_ONLY
    assert update["archived"] is True
    cleared = adapter.to_wire(Client(id="c", name="Acme"), existing=_existing())
    assert cleared["vatNumber"] == "" and cleared["addressCountry"] == "" and "currency" not in cleared


def _existing() -> Any:
    from worker.providers.base import RemoteClient

    return RemoteClient(id="x")


# --- create ---------------------------------------------------------------------------------
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
    assert record["details"] == "Net 30"
    assert [(c["fullName"], c["email"]) for c in record["contacts"]] == [
        ("Acme SARL", "billing@acme.example"),
        ("Jane Doe", "jane@acme.example"),
    ]
    back = adapter.from_wire(remote.data)
    assert back.name == "Acme SARL"
    assert back.billing_address == acme().billing_address
    assert back.email == "billing@acme.example"
    assert writes(sim, remote.id) == ["POST /lsp_expert/v2/clients", "POST /contacts", "POST /contacts"]


async def test_an_archived_client_is_created_then_archived_by_one_put(lsp: Setup) -> None:
    """`archived` is update-only: the old adapter sent it on create and the strict API refused it."""
    adapter, sim = lsp
    remote = await adapter.create(acme(status="archived", contacts=(), email=None))
    assert sim.clients[remote.id]["archived"] is True
    assert adapter.from_wire(remote.data).status == "archived"
    assert writes(sim, remote.id) == ["POST /lsp_expert/v2/clients", "PUT "]


async def test_a_client_without_contacts_is_created_in_one_call(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(Client(id="c", name="Solo"))
    assert len(sim.calls) == 1
    assert remote.data["name"] == "Solo"


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


# --- update ---------------------------------------------------------------------------------
async def test_an_update_without_contact_changes_is_one_put(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    sim.calls.clear()
    updated = await adapter.update(remote.id, acme(vat_number="FR99", notes="Net 45"))
    assert [(c.method, c.path) for c in sim.calls] == [("PUT", f"/lsp_expert/v2/clients/{remote.id}")]
    assert updated.data["vatNumber"] == "FR99"
    assert adapter.from_wire(updated.data).notes == "Net 45"


async def test_update_with_every_field_changed_and_then_cleared(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme(phone="+33 1 23 45 67 89"))
    changed = acme(
        name="Acme Group", email="ap@acme-group.example", phone="+44 20 7946 0000", vat_number="GB123456789",
        tax_id="SIREN-9", currency="GBP", notes="Net 60", status="archived",
        billing_address=Address(line1="1 High St", line2="Floor 2", city="London", region="LDN",
                                postal_code="EC1A 1BB", country="GB"),
        contacts=(Contact(first_name="Max", last_name="Roe", email="max@acme-group.example", phone="+44 1"),),
    )  # fmt: skip
    got = adapter.from_wire((await adapter.update(remote.id, changed)).data)
    assert (got.name, got.email, got.phone, got.vat_number, got.tax_id) == (
        "Acme Group", "ap@acme-group.example", "+44 20 7946 0000", "GB123456789", "SIREN-9")
    assert (got.currency, got.notes, got.status, got.billing_address) == (
        "GBP", "Net 60", "archived", changed.billing_address)
    assert [(c.email, c.phone) for c in got.contacts] == [
        ("ap@acme-group.example", "+44 20 7946 0000"), ("max@acme-group.example", "+44 1")]

    cleared = Client(id="crm-1", name="Acme Group")
    got = adapter.from_wire((await adapter.update(remote.id, cleared)).data)
    assert (got.email, got.phone, got.vat_number, got.tax_id, got.notes, got.billing_address) == (None,) * 6
    assert got.contacts == ()
    assert got.status == "active"
    assert got.currency == "GBP", "field_map says a cleared currency is left as it was"
    assert sim.clients[remote.id]["contacts"] == []
    assert len(sim.clients) == 1


async def test_a_changed_email_updates_the_own_contact_in_place_and_never_reads_back_stale(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme(phone="+33 1 23 45 67 89"))
    own = sim.clients[remote.id]["contacts"][0]["id"]
    sim.calls.clear()
    updated = await adapter.update(remote.id, acme(email="ap@acme.example", phone=None))
    back = adapter.from_wire(updated.data)
    assert (back.email, back.phone) == ("ap@acme.example", None)
    assert [c["email"] for c in sim.clients[remote.id]["contacts"]] == ["ap@acme.example", "jane@acme.example"]
    assert writes(sim, remote.id) == ["PUT ", f"PUT /contacts/{own}"]  # the client, then only that contact


async def test_a_contact_the_source_dropped_is_deleted(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    jane = sim.clients[remote.id]["contacts"][1]["id"]
    sim.calls.clear()
    await adapter.update(remote.id, acme(contacts=()))
    assert [c["email"] for c in sim.clients[remote.id]["contacts"]] == ["billing@acme.example"]
    assert writes(sim, remote.id) == ["PUT ", f"DELETE /contacts/{jane}"]


async def test_update_adds_only_the_contacts_that_are_missing(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    more = (*acme().contacts, Contact(first_name="Max", last_name="Roe", email="max@acme.example"))
    await adapter.update(remote.id, acme(contacts=more))
    await adapter.update(remote.id, acme(contacts=more))
    emails = [c["email"] for c in sim.clients[remote.id]["contacts"]]
    assert emails == ["billing@acme.example", "jane@acme.example", "max@acme.example"]


async def test_a_contact_removed_meanwhile_in_the_app_is_posted_again(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    record = sim.clients[remote.id]
    held = [dict(c) for c in record["contacts"]]  # what the client PUT answered...
    record["contacts"].pop(0)  # ...then someone removed the contact in the app
    assert await adapter._sync_contacts(remote.id, acme(phone="+33 9"), held)
    assert [(c["email"], c["phone"]) for c in record["contacts"]] == [
        ("jane@acme.example", None), ("billing@acme.example", "+33 9")]


async def test_a_rename_leaves_the_own_contact_named_after_the_company_alone(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    sim.calls.clear()
    await adapter.update(remote.id, acme(name="Acme SAS"))
    assert writes(sim, remote.id) == ["PUT "]
    assert sim.clients[remote.id]["name"] == "Acme SAS"


@pytest.mark.parametrize("reading", ["inferred", "documented"])
async def test_contact_changes_under_both_readings_of_the_undocumented_contact_routes(
    lsp: Setup, reading: str
) -> None:
    """Docs show only GET/POST contacts. Where PUT/DELETE are missing, a contact change is a clear
    permanent error about the route, never "the client was deleted"; other updates still work."""
    adapter, sim = lsp
    sim.readings.contact_routes = reading  # type: ignore[assignment]
    remote = await adapter.create(acme())
    renamed = await adapter.update(remote.id, acme(name="Renamed", contacts=(*acme().contacts,
                                                   Contact(first_name="Max", email="max@acme.example"))))
    assert renamed.data["name"] == "Renamed"  # client fields and a new contact need no undocumented route
    changed = acme(name="Renamed again", email="new@acme.example")
    if reading == "inferred":
        got = adapter.from_wire((await adapter.update(remote.id, changed)).data)
        assert got.email == "new@acme.example"
        return
    with pytest.raises(PermanentError) as info:
        await adapter.update(remote.id, changed)
    assert not isinstance(info.value, NotFound)
    assert info.value.status == 404
    assert "contact route" in info.value.message and "client itself exists" in info.value.message
    assert "deleted" not in info.value.message
    assert sim.clients[remote.id]["name"] == "Renamed again"


async def test_an_update_of_a_client_deleted_there_is_not_found(lsp: Setup) -> None:
    adapter, sim = lsp
    remote = await adapter.create(acme())
    sim.clients.clear()
    with pytest.raises(NotFound):
        await adapter.update(remote.id, acme(email="new@acme.example"))


# --- list, search, delete -------------------------------------------------------------------
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
    paths = [c.path for c in sim.calls]  # pages after the first are read together: any order
    assert paths[0] == "/lsp_expert/v2/clients?page=1&pageSize=20"
    assert sorted(paths) == [f"/lsp_expert/v2/clients?page={p}&pageSize=20" for p in (1, 2, 3)]


async def test_list_reads_pages_after_the_first_a_few_at_a_time_and_yields_them_in_order(lsp: Setup) -> None:
    """An identity lookup reads every page (no list filter): after the first page (which says
    how many there are), `CLIENTSYNC_LSP_EXPERT_PAGE_READS` pages go at once. Proven with the
    sandbox holding every call: exactly that many wait together."""
    adapter, sim = lsp
    for n in range(230):  # 12 pages of 20
        await adapter.request("POST", "/v2/clients", json_body={"name": f"Client {n:03d}"})
    adapter.config = adapter.config.model_copy(update={"page_reads": 5})
    sim.calls.clear()
    sim.faults.hold = True
    sim._hold(True)
    sim.peak_in_flight = 0
    listing = asyncio.create_task(_names(adapter.list(page_size=20)))
    done = 0
    for batch in (1, 5, 5, 1):  # page 1; pages 2-6; 7-11; 12
        await _until(lambda: sim.in_flight == batch)  # noqa: B023 - read at once, in this iteration
        # Release exactly the held calls (asyncio.Event wakes the waiters it has; a clear in the
        # same step holds whatever comes next), then wait for their answers.
        sim._hold(False)
        sim._hold(True)
        done += batch
        await _until(lambda: len(sim.calls) == done)  # noqa: B023
    sim.faults.hold = False
    sim._hold(False)
    assert await listing == [f"Client {n:03d}" for n in range(230)]
    assert sim.peak_in_flight == 5, "at most page_reads pages at once, and that many together"
    assert sorted(c.path for c in sim.calls) == sorted(
        f"/lsp_expert/v2/clients?page={p}&pageSize=20" for p in range(1, 13))


async def test_list_follows_has_next_page_when_the_account_grew_during_the_read(lsp: Setup) -> None:
    adapter, _ = lsp
    for n in range(40):  # 2 pages of 20 when the first page is read
        await adapter.request("POST", "/v2/clients", json_body={"name": f"Client {n:03d}"})
    listing = adapter.list(page_size=20)
    names = [(await anext(listing)).data["name"] for _ in range(20)]  # page 1 read: totalPages 2
    for n in range(40, 65):  # 25 more: pages 2, 3 and 4 now
        await adapter.request("POST", "/v2/clients", json_body={"name": f"Client {n:03d}"})
    names += await _names(listing)
    assert names == [f"Client {n:03d}" for n in range(65)]


async def test_a_failed_page_fails_the_whole_read(lsp: Setup) -> None:
    adapter, sim = lsp
    for n in range(70):
        await adapter.request("POST", "/v2/clients", json_body={"name": f"Client {n:03d}"})
    listing = adapter.list(page_size=20)
    assert (await anext(listing)).data["name"] == "Client 000"
    sim.faults.fail_next = 1  # one of pages 2-4, read together
    with pytest.raises(TransientError):
        await _names(listing)


async def _until(condition: Callable[[], bool], deadline: float = 30.0) -> None:
    """Poll the in-process sandbox until `condition` holds (the deadline only guards a hang)."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "the sandbox never reached the expected state"
        await asyncio.sleep(0.005)


async def _names(records: AsyncIterator[RemoteClient]) -> list[str]:
    return [str(r.data["name"]) async for r in records]


async def test_list_still_walks_every_page_when_the_server_ignores_page_size(lsp: Setup) -> None:
    adapter, sim = lsp
    sim.readings.honour_page_size = False
    for n in range(25):
        await adapter.request("POST", "/v2/clients", json_body={"name": f"Client {n:02d}"})
    sim.calls.clear()
    assert len([c async for c in adapter.list(page_size=100)]) == 25
    assert len(sim.calls) == 2


async def test_search_matches_exactly_across_every_page_and_never_by_substring(lsp: Setup) -> None:
    adapter, sim = lsp
    sim.readings.honour_page_size = False  # pages of 20: the match sits on the last page
    for n in range(41):
        await adapter.create(Client(id=f"f{n}", name=f"Filler {n}", email=f"f{n}@acme.example"))
    wanted = await adapter.create(acme(name="Acme"))
    await adapter.create(acme(id="other", name="Acme SARL", email="billing@acme.example.org", contacts=()))
    assert [r.id for r in await adapter.search("email", "BILLING@acme.example")] == [wanted.id]
    assert [r.id for r in await adapter.search("email", "jane@acme.example")] == [wanted.id]
    assert [r.id for r in await adapter.search("name", "Acme")] == [wanted.id]
    assert await adapter.search("email", "acme.example") == []
    assert await adapter.search("stamp", "crm-1") == []  # no stamp field by default


async def test_a_configured_stamp_field_is_written_and_searched_and_not_leaked(
    sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter("lsp_expert", sandbox, session, monkeypatch, id_field="details")
    remote = await adapter.create(acme(id="crm-42"))
    await adapter.create(acme(id="crm-43", name="Other"))
    assert adapter.stamped(await adapter.get(remote.id)) == "crm-42"
    assert [r.id for r in await adapter.search("stamp", "crm-42")] == [remote.id]
    assert adapter.from_wire(remote.data).notes is None  # the stamp is not the client's notes
    await adapter.update(remote.id, acme(id="crm-42", notes=None))
    assert adapter.stamped(await adapter.get(remote.id)) == "crm-42"


async def test_created_at_is_the_records_creation_time(lsp: Setup) -> None:
    adapter, _ = lsp
    before = time.time()
    remote = await adapter.create(acme())
    created = adapter.created_at(remote)
    assert created is not None and before - 2 <= created <= time.time() + 1


async def test_delete_removes_the_client(lsp: Setup) -> None:
    adapter, _ = lsp
    remote = await adapter.create(acme())
    await adapter.delete(remote.id)
    with pytest.raises(NotFound):
        await adapter.get(remote.id)
    with pytest.raises(NotFound):
        await adapter.delete(remote.id)


# --- field mapping --------------------------------------------------------------------------
def test_field_map_declares_every_canonical_field() -> None:
    assert set(LSPExpert.field_map) == set(Client.model_fields)
    assert all(v.startswith(("sent as ", "not supported", "derived")) for v in LSPExpert.field_map.values())


def test_unsupported_fields_names_what_lsp_expert_cannot_take() -> None:
    adapter = LSPExpert.__new__(LSPExpert)
    client = acme(website="https://acme.example", tags=("vip",), locale="fr",
                  shipping_address=Address(country="FR"), kind="individual")  # fmt: skip
    assert adapter.unsupported_fields(client) == ["kind", "website", "shipping_address", "locale", "tags"]
    assert adapter.unsupported_fields(acme()) == []


# --- the three unclear endings, on every write path ----------------------------------------
@pytest.fixture
async def quick(sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> Setup:
    adapter = make_adapter("lsp_expert", sandbox, session, monkeypatch, timeout=0.5)
    assert isinstance(adapter, LSPExpert)
    sim = sandbox.simulators["lsp_expert"]
    assert isinstance(sim, LSPExpertSandbox)
    return adapter, sim


Record = dict[str, Any]
#: write path -> (what the fault matches, the change, "it landed" on the record)
UPDATE_PATHS: dict[str, tuple[str, Callable[[Client], Client], Callable[[Record], bool]]] = {
    "the client PUT": ("PUT /lsp_expert/v2/clients/", lambda c: c.model_copy(update={"name": "Renamed"}),
                       lambda r: r["name"] == "Renamed"),
    "a contact POST": ("POST /lsp_expert/v2/clients/",
                       lambda c: c.model_copy(update={"contacts": (*c.contacts, Contact(email="max@a.example"))}),
                       lambda r: len(r["contacts"]) == 3),
    "a contact PUT": ("/contacts/", lambda c: c.model_copy(update={"phone": "+33 9"}),
                      lambda r: r["contacts"][0]["phone"] == "+33 9"),
    "a contact DELETE": ("DELETE /lsp_expert/v2/clients/", lambda c: c.model_copy(update={"contacts": ()}),
                         lambda r: len(r["contacts"]) == 1),
}  # fmt: skip


@pytest.mark.parametrize("path", list(UPDATE_PATHS))
@pytest.mark.parametrize("ending", ENDINGS)
async def test_every_update_write_under_the_three_unclear_endings_converges_on_repeat(
    quick: Setup, ending: str, path: str
) -> None:
    adapter, sim = quick
    remote = await adapter.create(acme())
    match, change, landed = UPDATE_PATHS[path]
    wanted = change(acme())
    await unclear_write(sim, ending, match, lambda: adapter.update(remote.id, wanted),
                        lambda: landed(sim.clients[remote.id]))
    again = await adapter.update(remote.id, wanted)
    sim.calls.clear()
    repeat = await adapter.update(remote.id, wanted)
    assert [c.method for c in sim.calls] == ["PUT"], "settled: the repeat changes no contact"
    got = adapter.from_wire(repeat.data)
    assert got == adapter.from_wire(again.data)
    assert [(c.email, c.phone) for c in got.contacts] == [
        (c["email"] or None, c["phone"] or None) for c in adapter.contacts_to_wire(wanted)]
    assert got.name == wanted.name
    assert len(sim.clients) == 1


@pytest.mark.parametrize("ending", ENDINGS)
async def test_a_delete_under_the_three_unclear_endings_is_gone_and_a_repeat_is_not_found(
    quick: Setup, ending: str
) -> None:
    adapter, sim = quick
    remote = await adapter.create(acme())
    await unclear_write(sim, ending, "DELETE", lambda: adapter.delete(remote.id), lambda: sim.clients == {})
    with pytest.raises(NotFound):  # the sync layer counts a 404 on delete as deleted
        await adapter.delete(remote.id)


#: create write -> (what the fault matches, "it landed" over every record)
CREATE_PATHS: dict[str, tuple[str, Callable[[list[Record]], bool]]] = {
    "the client POST": ("POST /lsp_expert/v2/clients", lambda rs: len(rs) == 2),
    "a contact POST": ("POST /lsp_expert/v2/clients/", lambda rs: len(rs) == 2 and len(rs[1]["contacts"]) == 1),
    "the archiving PUT": ("PUT /lsp_expert/v2/clients/", lambda rs: len(rs) == 2 and rs[1]["archived"]),
}


@pytest.mark.parametrize("path", list(CREATE_PATHS))
@pytest.mark.parametrize("ending", ENDINGS)
async def test_every_create_write_under_the_three_unclear_endings_leaves_one_record_the_lookalike_finds(
    quick: Setup, ending: str, path: str
) -> None:
    """The client POST, a contact POST, or the archiving PUT ends unclearly: one record exists,
    `lookalikes` (whole payload, created after the intent, by email or name) finds exactly it,
    and an update then converges it."""
    adapter, sim = quick
    await adapter.create(acme(id="x", name="Someone else", email="other@else.example", contacts=()))
    client = acme(status="archived")
    since = time.time()
    match, landed = CREATE_PATHS[path]
    await unclear_write(sim, ending, match, lambda: adapter.create(client), lambda: landed(list(sim.clients.values())))
    found = await lookalikes(adapter, client, since=since)
    assert len(found) == 1
    assert len(sim.clients) == 2
    got = adapter.from_wire((await adapter.update(found[0].id, client)).data)
    assert (got.status, got.email, len(got.contacts)) == ("archived", client.email, 2)


async def test_a_lookup_by_email_and_name_reads_each_page_once(lsp: Setup) -> None:
    """No list filter exists, so every search reads the whole account: the similar-key lookup
    (`worker.identity`) asks for email and name together and the adapter makes one pass."""
    adapter, sim = lsp
    by_email = acme(id="e", name="Other Name", email="shared@acme.example")
    by_name = acme(id="n", name="Shared Name", email="someone@else.example")
    await adapter.create(by_email)
    await adapter.create(by_name)
    for i in range(150):  # two pages of 100
        sim.clients[f"filler{i}"] = {**next(iter(sim.clients.values())), "id": f"filler{i}", "name": f"F {i}",
                                     "contacts": []}
    sim.calls.clear()
    wanted = acme(id="w", name="Shared Name", email="shared@acme.example")
    found = await namesakes(adapter, wanted, before=time.time() + 60)
    assert sorted(adapter.from_wire(r.data).display_name or "" for r in found) == ["Other Name", "Shared Name"]
    pages = [c.path for c in sim.calls if c.method == "GET"]
    assert len(pages) == 2 and len(set(pages)) == 2, pages  # page 1 and page 2, once each


async def test_concurrent_lookups_share_passes_over_the_pages_and_each_gets_its_own_namesakes(lsp: Setup) -> None:
    """Thirty creates' namesake lookups in flight at once (the loop pool runs hundreds): they
    share passes over the pages (`worker.providers.shared`) instead of each reading them all,
    and each gets exactly its own records. Over real HTTP, with the sandbox holding every call
    until all thirty have asked."""
    adapter, sim = lsp
    await adapter.create(acme(id="seed", name="Seed", email="seed@acme.example", contacts=()))
    template = next(iter(sim.clients.values()))
    for i in range(250):  # three pages of 100
        sim.clients[f"c{i}"] = {**template, "id": f"c{i}", "name": f"Client {i}",
                                "contacts": [{"id": f"k{i}", "fullName": f"P {i}", "email": f"p{i}@ex.example"}]}
    sim.calls.clear()
    sim.faults.hold = True
    sim._hold(True)  # the control route's own switch, without the HTTP round trip
    wanted = [acme(id=f"w{i}", name=f"Client {i * 8}", email=f"p{i * 8 + 1}@ex.example", contacts=())
              for i in range(30)]
    lookups = [asyncio.create_task(namesakes(adapter, w, before=time.time() + 60)) for w in wanted]
    while sim.in_flight < 1:
        await asyncio.sleep(0.01)
    sim.faults.hold = False
    sim._hold(False)
    results = await asyncio.gather(*lookups)
    assert [sorted(r.id for r in found) for found in results] == [
        sorted([f"c{i * 8}", f"c{i * 8 + 1}"]) for i in range(30)
    ]
    pages = [c.path for c in sim.calls if c.method == "GET"]
    passes = pages.count(pages[0])
    assert len(pages) == 3 * passes and passes <= 2, pages  # thirty lookups alone would read 90 pages
