"""Request Finance adapter against its simulator, over real HTTP on loopback."""

from __future__ import annotations

import time
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
    Unsupported,
)
from worker.identity import lookalikes
from worker.models import Address, Client, Contact
from worker.providers.request_finance import RequestFinance, RequestFinanceConfig
from worker.sandbox.request_finance import _ADDRESS_FIELDS, _FIELDS, RequestFinanceSandbox
from worker.sandbox.server import RunningSandbox

NAME = "request_finance"


def acme(**changes: object) -> Client:
    base: dict[str, object] = {
        "id": "acme",
        "kind": "company",
        "name": "Acme SAS",
        "email": "billing@acme.example",
        "phone": "+33 1 23 45 67 89",
        "vat_number": "FR40303265045",
        "billing_address": Address(line1="1 rue de la Paix", city="Paris", postal_code="75002", country="FR"),
        "contacts": (Contact(first_name="Jeanne", last_name="Martin", is_primary=True),),
    }
    base.update(changes)
    return Client.model_validate(base)


@pytest.fixture
async def sandbox(start: StartSandbox) -> RunningSandbox:
    return await start([NAME])


@pytest.fixture
def rf(
    sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> RequestFinance:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch)
    assert isinstance(adapter, RequestFinance)
    return adapter


def sim(sandbox: RunningSandbox) -> RequestFinanceSandbox:
    simulator = sandbox.simulators[NAME]
    assert isinstance(simulator, RequestFinanceSandbox)
    return simulator


async def test_create_sends_email_and_customer_contact_type_and_returns_the_new_id(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    remote = await rf.create(acme())
    stored = sim(sandbox).clients[remote.id]
    assert stored["email"] == "billing@acme.example"
    assert stored["contactType"] == ["customer"]
    assert stored["businessName"] == "Acme SAS"
    assert (stored["firstName"], stored["lastName"]) == ("Jeanne", "Martin")
    assert stored["address"] == {
        "streetAddress": "1 rue de la Paix",
        "city": "Paris",
        "postalCode": "75002",
        "country": "FR",
    }
    assert remote.data["createdById"]
    assert remote.data["createdDate"]


async def test_a_client_without_any_email_fails_locally_naming_client_email(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    with pytest.raises(LocalValidationError) as caught:
        await rf.create(acme(email=None))
    assert "client.email" in caught.value.field_errors
    assert sim(sandbox).calls == []


async def test_the_primary_contacts_email_is_used_when_the_client_has_none(rf: RequestFinance) -> None:
    client = acme(email=None, contacts=(Contact(first_name="Jo", email="jo@acme.example"),))
    remote = await rf.create(client)
    assert remote.data["email"] == "jo@acme.example"


async def test_the_sandbox_rejects_a_body_without_email_or_contact_type(rf: RequestFinance) -> None:
    with pytest.raises(ProviderValidationError) as caught:
        await rf.request("POST", "/clients", json_body={"contactType": "customer"})
    assert set(caught.value.field_errors) == {"email", "contactType"}
    assert caught.value.status == 400


async def test_update_puts_the_full_body_and_keeps_fields_clientsync_does_not_own(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    remote = await rf.create(acme())
    sim(sandbox).clients[remote.id]["jobTitle"] = "CFO"  # set by someone in the RF app
    updated = await rf.update(remote.id, acme(name="Acme Group", billing_address=None))
    assert updated.data["businessName"] == "Acme Group"
    assert updated.data["jobTitle"] == "CFO"
    assert "address" not in updated.data
    assert updated.data["createdDate"] == remote.data["createdDate"]
    assert [c.method for c in sim(sandbox).calls] == ["POST", "GET", "PUT"]


async def test_get_of_an_unknown_id_is_not_found(rf: RequestFinance) -> None:
    with pytest.raises(NotFound):
        await rf.get("rf_missing")


async def test_delete_is_unsupported_and_makes_no_call(rf: RequestFinance, sandbox: RunningSandbox) -> None:
    remote = await rf.create(acme())
    with pytest.raises(Unsupported, match="no API to delete"):
        await rf.delete(remote.id)
    assert len(sim(sandbox).calls) == 1


async def test_the_api_itself_has_no_delete_route(rf: RequestFinance) -> None:
    remote = await rf.create(acme())
    with pytest.raises(PermanentError) as caught:
        await rf.request("DELETE", f"/clients/{remote.id}")
    assert caught.value.status == 405


async def test_search_by_email_is_exact_and_case_insensitive(rf: RequestFinance) -> None:
    await rf.create(acme(id="a", email="ann.billing@acme.example"))
    wanted = await rf.create(acme(id="b", email="billing@acme.example"))
    assert [r.id for r in await rf.search("email", "Billing@Acme.example")] == [wanted.id]
    assert await rf.search("email", "nobody@acme.example") == []
    assert await rf.search("stamp", "b") == []  # no stamp field by default


async def test_list_walks_the_paginated_form_page_by_page(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    created = [await rf.create(acme(id=f"c{i}", email=f"c{i}@acme.example")) for i in range(5)]
    listed = [r.id async for r in rf.list(page_size=2)]
    assert listed == [r.id for r in created]
    pages = [c.path for c in sim(sandbox).calls if c.method == "GET"]
    assert len(pages) == 3
    assert all("format=paginated" in p and "take=2" in p for p in pages)


async def test_without_format_paginated_the_api_answers_a_bare_array(rf: RequestFinance) -> None:
    for i in range(3):
        await rf.create(acme(id=f"c{i}", email=f"c{i}@acme.example"))
    plain = await rf.request("GET", "/clients", params={"type": "customer"})
    assert isinstance(plain, list)
    assert len(plain) == 3


async def test_list_and_search_accept_an_api_that_ignores_format_paginated(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    for i in range(3):
        await rf.create(acme(id=f"c{i}", email=f"c{i}@acme.example"))
    sim(sandbox).legacy_list = True
    assert len([r async for r in rf.list(page_size=2)]) == 3
    found = await rf.search("email", "c1@acme.example")
    assert [r.data["email"] for r in found] == ["c1@acme.example"]


async def test_api_key_is_sent_raw_in_authorization(rf: RequestFinance) -> None:
    assert rf.auth_headers() == {"Authorization": "rf-sandbox-key"}


async def test_oauth_token_is_sent_as_bearer_with_the_network_header(
    sandbox: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    config = RequestFinanceConfig(
        url=sandbox.base_url(NAME), oauth_token="rf-sandbox-oauth-token", network="test"
    )
    adapter = RequestFinance(config, session)
    assert adapter.auth_headers() == {"Authorization": "Bearer rf-sandbox-oauth-token", "X-Network": "test"}
    remote = await adapter.create(acme())
    assert (await adapter.get(remote.id)).id == remote.id


async def test_the_sandbox_refuses_a_bearer_token_without_x_network(
    sandbox: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    async with session.get(
        f"{sandbox.base_url(NAME)}/clients", headers={"Authorization": "Bearer rf-sandbox-oauth-token"}
    ) as resp:
        assert resp.status == 401


async def test_a_wrong_key_is_an_auth_error(sandbox: RunningSandbox, session: aiohttp.ClientSession) -> None:
    config = RequestFinanceConfig(url=sandbox.base_url(NAME), api_key="wrong")
    with pytest.raises(AuthError):
        await RequestFinance(config, session).get("rf_1")


def test_configured_with_either_credential_and_missing_names_the_env_vars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("API_KEY", "OAUTH_TOKEN", "URL"):
        monkeypatch.delenv(f"CLIENTSYNC_REQUEST_FINANCE_{key}", raising=False)
    assert not RequestFinanceConfig().is_configured()
    assert "CLIENTSYNC_REQUEST_FINANCE_API_KEY" in RequestFinanceConfig().missing()
    assert "CLIENTSYNC_REQUEST_FINANCE_OAUTH_TOKEN" in RequestFinanceConfig().missing()
    monkeypatch.setenv("CLIENTSYNC_REQUEST_FINANCE_OAUTH_TOKEN", "t")
    assert RequestFinanceConfig().is_configured()


async def test_from_wire_maps_the_record_back_to_the_canonical_client(rf: RequestFinance) -> None:
    remote = await rf.create(acme())
    client = rf.from_wire(remote.data)
    assert client.id == remote.id
    assert client.kind == "company"
    assert client.name == "Acme SAS"
    assert client.email == "billing@acme.example"
    assert client.vat_number == "FR40303265045"
    assert client.billing_address == acme().billing_address


# --- the list envelope, under each reading of the undocumented format=paginated ------------
@pytest.mark.parametrize("envelope", ["items", "data", "clients", "bare"])
async def test_list_and_search_work_under_every_plausible_envelope(
    rf: RequestFinance, sandbox: RunningSandbox, envelope: str
) -> None:
    created = [await rf.create(acme(id=f"c{i}", email=f"c{i}@acme.example")) for i in range(5)]
    sim(sandbox).readings.envelope = envelope  # type: ignore[assignment]
    sim(sandbox).calls.clear()
    assert [r.id async for r in rf.list(page_size=2)] == [r.id for r in created]
    assert len(sim(sandbox).calls) == (1 if envelope == "bare" else 3)
    assert [r.id for r in await rf.search("email", "C3@acme.example")] == [created[3].id]
    assert await rf.search("email", "c@acme.example") == []


async def test_an_unknown_envelope_is_a_permanent_error_naming_its_shape_never_an_empty_list(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    """The old adapter read `{"results": [...], "count": N}` as an empty page: `list` returned
    nothing and the crash-recovery lookup found nothing (-> duplicates)."""
    await rf.create(acme())
    sim(sandbox).readings.envelope = "results"
    with pytest.raises(PermanentError) as info:
        [r async for r in rf.list()]
    assert "results (list)" in info.value.message and "count (int)" in info.value.message
    with pytest.raises(PermanentError):
        await rf.search("email", "billing@acme.example")


# --- mapping --------------------------------------------------------------------------------
def test_create_and_update_bodies_hold_only_the_documented_fields() -> None:
    adapter = RequestFinance.__new__(RequestFinance)
    adapter.config = RequestFinanceConfig(api_key="k")
    full = acme(first_name="Ann", last_name="Lee", tax_id="T1", website="https://acme.example",
                notes="n", tags=("t",), currency="EUR", locale="fr", status="archived",
                shipping_address=Address(country="FR"))  # fmt: skip
    for body in (adapter.to_wire(full), adapter.to_wire(full, existing=_remote({"jobTitle": "CFO"}))):
        assert set(body) <= _FIELDS
        assert set(body["address"]) <= _ADDRESS_FIELDS


def _remote(data: dict[str, Any]) -> Any:
    from worker.providers.base import RemoteClient

    return RemoteClient(id="rf_1", data=data)


async def test_the_sandbox_refuses_an_unknown_field_unless_read_as_ignoring_it(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    body = {"email": "x@acme.example", "contactType": ["customer"], "website": "https://x.example"}
    with pytest.raises(ProviderValidationError) as caught:
        await rf.request("POST", "/clients", json_body=body)
    assert set(caught.value.field_errors) == {"website"}
    sim(sandbox).readings.unknown_fields = "ignore"
    created = await rf.request("POST", "/clients", json_body=body)
    assert "website" not in created


async def test_clearing_the_clients_phone_clears_it_even_when_the_contact_has_one(rf: RequestFinance) -> None:
    contact = Contact(first_name="Jeanne", last_name="Martin", phone="+33 6 00 00 00 00", is_primary=True)
    remote = await rf.create(acme(contacts=(contact,)))
    assert rf.from_wire(remote.data).phone == "+33 1 23 45 67 89"
    updated = await rf.update(remote.id, acme(phone=None, contacts=(contact,)))
    assert rf.from_wire(updated.data).phone is None


async def test_update_with_every_field_changed_and_then_cleared(rf: RequestFinance) -> None:
    remote = await rf.create(acme())
    changed = acme(name="Acme Group", email="ap@acme-group.example", phone="+44 20", first_name="Ann",
                   last_name="Lee", vat_number="GB123456789",
                   billing_address=Address(line1="1 High St", line2="Floor 2", city="London", region="LDN",
                                           postal_code="EC1A 1BB", country="GB"))  # fmt: skip
    got = rf.from_wire((await rf.update(remote.id, changed)).data)
    assert (got.name, got.email, got.phone, got.first_name, got.last_name, got.vat_number) == (
        "Acme Group", "ap@acme-group.example", "+44 20", "Ann", "Lee", "GB123456789")
    assert got.billing_address == changed.billing_address
    cleared = Client(id="acme", kind="individual", email="ap@acme-group.example")
    got = rf.from_wire((await rf.update(remote.id, cleared)).data)
    assert (got.name, got.phone, got.first_name, got.last_name, got.vat_number, got.billing_address) == (None,) * 6
    assert got.kind == "individual"


def test_field_map_declares_every_canonical_field() -> None:
    assert set(RequestFinance.field_map) == set(Client.model_fields)
    assert all(v.startswith(("sent as ", "not supported", "derived")) for v in RequestFinance.field_map.values())


def test_unsupported_fields_names_what_request_finance_cannot_take() -> None:
    adapter = RequestFinance.__new__(RequestFinance)
    client = acme(website="https://acme.example", notes="n", tags=("t",), currency="EUR", locale="fr",
                  status="archived", shipping_address=Address(country="FR"))  # fmt: skip
    assert adapter.unsupported_fields(client) == [
        "website", "shipping_address", "currency", "locale", "notes", "tags", "status"]
    assert adapter.unsupported_fields(acme()) == []


# --- identity -------------------------------------------------------------------------------
async def test_created_at_is_the_createddate(rf: RequestFinance) -> None:
    before = time.time()
    remote = await rf.create(acme())
    created = rf.created_at(remote)
    assert created is not None and before - 2 <= created <= time.time() + 1


async def test_a_configured_stamp_field_is_written_kept_and_searched(
    sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch, id_field="department")
    remote = await adapter.create(acme(id="crm-7"))
    await adapter.create(acme(id="crm-8", email="other@acme.example"))
    assert adapter.stamped(await adapter.get(remote.id)) == "crm-7"
    await adapter.update(remote.id, acme(id="crm-7", name="Renamed"))
    assert adapter.stamped(await adapter.get(remote.id)) == "crm-7"
    assert [r.id for r in await adapter.search("stamp", "crm-7")] == [remote.id]


# --- the three unclear endings --------------------------------------------------------------
@pytest.fixture
def quick(sandbox: RunningSandbox, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> RequestFinance:
    adapter = make_adapter(NAME, sandbox, session, monkeypatch, timeout=0.5)
    assert isinstance(adapter, RequestFinance)
    return adapter


@pytest.mark.parametrize("ending", ENDINGS)
async def test_an_unclear_create_leaves_one_record_that_the_lookalike_finds(
    quick: RequestFinance, sandbox: RunningSandbox, ending: str
) -> None:
    await quick.create(acme(id="other", email="billing@acme.example", name="Other Co"))  # same email
    client = acme()
    since = time.time()
    await unclear_write(sim(sandbox), ending, "POST", lambda: quick.create(client),
                        lambda: len(sim(sandbox).clients) == 2)
    found = await quick.search("email", "billing@acme.example")
    assert len(found) == 2, "email is not unique at Request Finance: never exact"
    assert [r.data["businessName"] for r in await lookalikes(quick, client, since=since)] == ["Acme SAS"]


@pytest.mark.parametrize("ending", ENDINGS)
async def test_an_unclear_update_converges_when_repeated(
    quick: RequestFinance, sandbox: RunningSandbox, ending: str
) -> None:
    remote = await quick.create(acme())
    changed = acme(name="Acme Group", phone=None)
    record = sim(sandbox).clients
    await unclear_write(sim(sandbox), ending, "PUT", lambda: quick.update(remote.id, changed),
                        lambda: record[remote.id].get("businessName") == "Acme Group")  # fmt: skip
    again = quick.from_wire((await quick.update(remote.id, changed)).data)
    assert (again.name, again.phone) == ("Acme Group", None)
    assert len(record) == 1
