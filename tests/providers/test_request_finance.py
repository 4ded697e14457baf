"""Request Finance adapter against its simulator, over real HTTP on loopback."""

from __future__ import annotations

import aiohttp
import pytest

from tests.providers.conftest import StartSandbox, make_adapter
from worker.errors import (
    AuthError,
    LocalValidationError,
    NotFound,
    PermanentError,
    ProviderValidationError,
    Unsupported,
)
from worker.models import Address, Client, Contact
from worker.providers.request_finance import RequestFinance, RequestFinanceConfig
from worker.sandbox.request_finance import RequestFinanceSandbox
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


async def test_find_matches_the_exact_email_only(rf: RequestFinance) -> None:
    await rf.create(acme(id="a", email="ann.billing@acme.example"))
    wanted = await rf.create(acme(id="b", email="billing@acme.example"))
    found = await rf.find(acme(email="Billing@Acme.example"))
    assert found is not None
    assert found.id == wanted.id
    assert await rf.find(acme(email="nobody@acme.example")) is None


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


async def test_list_and_find_accept_an_api_that_ignores_format_paginated(
    rf: RequestFinance, sandbox: RunningSandbox
) -> None:
    for i in range(3):
        await rf.create(acme(id=f"c{i}", email=f"c{i}@acme.example"))
    sim(sandbox).legacy_list = True
    assert len([r async for r in rf.list(page_size=2)]) == 3
    found = await rf.find(acme(email="c1@acme.example"))
    assert found is not None
    assert found.data["email"] == "c1@acme.example"


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
