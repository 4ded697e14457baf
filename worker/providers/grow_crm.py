"""Grow CRM (NextLoop): the self-hosted `/api/clients` API (docs: https://docs-api.growcrm.io/clients).

- Auth: `Authorization: Bearer <API key>`; every key acts as the main admin. Self-hosted, so
  there is no public URL: `CLIENTSYNC_GROW_CRM_URL` (…/api) is required.
- Ids: the numeric `client_id` (kept as a string in `RemoteClient.id`).
- Create `POST /clients` needs `first_name`, `last_name`, `email` (they create the client's
  account-owner user; the email must be unique among users). We derive them from the
  canonical client and fail locally when they cannot be derived.
- Update `PATCH /clients/{id}` needs `client_company_name` every time. Tags and status are
  separate `PUT /clients/{id}/tags|status` actions; `update` reads the record first and calls
  them only when the value differs. The owner action is not used: the canonical client has
  no owner and the owner must be an existing Grow user of the client.
- Idempotency: none. Delete: `DELETE /clients/{id}` is hard and cascading (users, projects,
  invoices, files).
- `find` by email: client records carry no email and `/clients?search=` matches only the
  company name, so we search `/contacts` (which matches email), take the exact-email match
  and fetch its client.
- `get` adds the account-owner contact (`GET /contacts?client_id=…&account_owner=yes`) to the
  record as `account_owner`: the client object names its owner but carries no email.
- Country is free text: alpha-2 ↔ English name via pycountry.

Unconfirmed: whether PATCH clears omitted fields (we send every field we own, `""` for unset
ones), JSON bodies (the docs show form data), rate limits, and the shipping address (the
write API has no shipping fields, so it is not synced).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pycountry
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError, NotFound, PermanentError
from worker.models import Address, Client, Contact
from worker.providers.base import ProviderAdapter, ProviderConfig, RemoteClient, wire_text

_MAX_LIMIT = 100
_STATUS = {"active": "active", "archived": "suspended"}


class GrowCRMConfig(ProviderConfig):
    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_GROW_CRM_", extra="ignore", frozen=True)

    api_key: SecretStr | None = Field(None, description="API key (Settings → API Keys), sent as Bearer.")

    def is_configured(self) -> bool:
        return self.url is not None and self.api_key is not None

    def missing(self) -> str:
        return "set CLIENTSYNC_GROW_CRM_URL (your install's https://…/api) and CLIENTSYNC_GROW_CRM_API_KEY"


def _country_name(code: str) -> str:
    country = pycountry.countries.get(alpha_2=code)
    return str(getattr(country, "common_name", None) or country.name) if country else code


def _country_code(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return str(pycountry.countries.lookup(name).alpha_2)
    except LookupError:
        return None


def _owner(client: Client) -> tuple[str | None, str | None, str | None]:
    """(first, last, email) of the account-owner user: the individual, else the primary contact."""
    contact = client.primary_contact or Contact()
    own = (client.first_name, client.last_name)
    theirs = (contact.first_name, contact.last_name)
    pairs = [own, theirs] if client.kind == "individual" else [theirs, own]
    first, last = next((p for p in pairs if all(p)), next((p for p in pairs if any(p)), (None, None)))
    return first, last, client.email or contact.email


def _billing(addr: Address | None) -> dict[str, str | None]:
    if addr is None:
        return dict.fromkeys(("street", "city", "state", "zip", "country"))
    return {
        "street": ", ".join(p for p in (addr.line1, addr.line2) if p) or None,
        "city": addr.city,
        "state": addr.region,
        "zip": addr.postal_code,
        "country": _country_name(addr.country),
    }


class GrowCRM(ProviderAdapter):
    name = "grow_crm"
    title = "Grow CRM"
    settings_class = GrowCRMConfig
    default_url = "https://example.invalid/api"

    config: GrowCRMConfig

    def auth_headers(self) -> dict[str, str]:
        assert self.config.api_key is not None, "adapter built without credentials"
        return {"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"}

    # --- mapping -----------------------------------------------------------------------
    def validate(self, client: Client) -> None:
        first, last, email = _owner(client)
        missing = [n for n, v in (("first_name", first), ("last_name", last), ("email", email)) if not v]
        if missing:
            raise LocalValidationError(
                f"Grow CRM needs {', '.join(missing)} to create a client (they make its account-owner "
                "user): set them on the client (individuals) or on its primary contact",
                provider=self.name,
                field_errors={f"client.{n}": ["required by Grow CRM"] for n in missing},
            )

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        first, last, email = _owner(client)
        body: dict[str, Any] = {
            "client_company_name": client.display_name or " ".join(p for p in (first, last) if p),
            "client_description": client.notes,
            "client_phone": client.phone,
            "client_website": client.website,
            "client_vat": client.vat_number or client.tax_id,
        }
        body.update({f"client_billing_{k}": v for k, v in _billing(client.billing_address).items()})
        if existing is not None:  # PATCH: send every owned field so a removed value is cleared
            if not body["client_company_name"]:
                body["client_company_name"] = existing.data.get("company_name")
            return {k: "" if v is None else v for k, v in body.items()}
        body.update(first_name=first, last_name=last, email=email, tags=list(client.tags) or None)
        return {k: v for k, v in body.items() if v is not None}

    def from_wire(self, data: dict[str, Any]) -> Client:
        billing = data.get("billing") if isinstance(data.get("billing"), dict) else {}
        assert isinstance(billing, dict)
        code = _country_code(wire_text(billing.get("country")))
        address = None
        if code:
            address = Address(
                line1=wire_text(billing.get("street")),
                city=wire_text(billing.get("city")),
                region=wire_text(billing.get("state")),
                postal_code=wire_text(billing.get("zip")),
                country=code,
            )
        owner = data.get("account_owner") if isinstance(data.get("account_owner"), dict) else {}
        assert isinstance(owner, dict)
        first, last = wire_text(owner.get("first_name")), wire_text(owner.get("last_name"))
        if not owner and isinstance(data.get("owner"), dict):  # a record not read through `get`
            first, _, rest = (wire_text(data["owner"].get("name")) or "").partition(" ")
            first, last = first or None, rest or None
        return Client(
            id=str(data["id"]),
            kind="company",
            name=wire_text(data.get("company_name")),
            first_name=first,
            last_name=last,
            email=wire_text(owner.get("email")),
            notes=wire_text(data.get("description")),
            phone=wire_text(data.get("phone")),
            website=wire_text(data.get("website")),
            vat_number=wire_text(data.get("vat")),
            billing_address=address,
            tags=tuple(t for t in data.get("tags") or () if isinstance(t, str) and t.strip()),
            status="archived" if data.get("status") == "suspended" else "active",
        )

    # --- the Clients API -----------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        remote = self._remote(await self.request("POST", "/clients", json_body=self.to_wire(client)))
        if client.status != "active":
            remote = await self._put(remote, "status", {"status": _STATUS[client.status]})
        return remote

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        existing = await self.get(remote_id)
        body = self.to_wire(client, existing=existing)
        remote = self._remote(await self.request("PATCH", f"/clients/{existing.id}", json_body=body))
        if sorted(client.tags) != sorted(existing.data.get("tags") or []):
            remote = await self._put(remote, "tags", {"tags": list(client.tags)})
        if existing.data.get("status") != _STATUS[client.status]:
            remote = await self._put(remote, "status", {"status": _STATUS[client.status]})
        return remote

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"/clients/{_numeric(remote_id)}")

    async def get(self, remote_id: str) -> RemoteClient:
        remote = self._remote(await self.request("GET", f"/clients/{_numeric(remote_id)}"))
        # The client object names its owner but not the owner's email: that lives on /contacts.
        params: dict[str, str | int] = {"client_id": remote.id, "account_owner": "yes", "limit": 1}
        answer = await self.request("GET", "/contacts", params=params)
        owners = answer.get("data") if isinstance(answer, dict) else None
        if isinstance(owners, list) and owners and isinstance(owners[0], dict):
            return RemoteClient(id=remote.id, data={**remote.data, "account_owner": owners[0]})
        return remote

    async def find(self, client: Client) -> RemoteClient | None:
        email = _owner(client)[2]
        if not email:
            return None
        async for contact in self._pages("/contacts", {"search": email}, _MAX_LIMIT):
            owner_of = contact.get("client")
            found = str(contact.get("email") or "").strip().casefold()
            if found == email.casefold() and isinstance(owner_of, dict) and owner_of.get("id"):
                return await self.get(str(owner_of["id"]))
        return None

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        async for item in self._pages("/clients", {}, page_size):
            yield self._remote({"data": item})

    # --- helpers -------------------------------------------------------------------------
    async def _pages(self, path: str, extra: dict[str, str], size: int) -> AsyncIterator[dict[str, Any]]:
        page, limit = 1, max(1, min(size, _MAX_LIMIT))
        while True:
            params: dict[str, str | int] = {"page": page, "limit": limit}
            params.update(extra)
            body = await self.request("GET", path, params=params)
            items = body.get("data") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise PermanentError(f"unexpected list answer: {body!r:.200}", provider=self.name)
            for item in items:
                if isinstance(item, dict):
                    yield item
            meta = body.get("meta") or {}
            if not items or int(meta.get("current_page", page)) >= int(meta.get("last_page", page)):
                return
            page += 1

    async def _put(self, remote: RemoteClient, action: str, body: dict[str, Any]) -> RemoteClient:
        answer = await self.request("PUT", f"/clients/{remote.id}/{action}", json_body=body)
        data = answer.get("data") if isinstance(answer, dict) else None
        return self._remote(answer) if isinstance(data, dict) and data.get("id") else remote

    def _remote(self, body: Any) -> RemoteClient:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or data.get("id") is None:
            raise PermanentError(f"answer without a client id: {body!r:.200}", provider=self.name)
        return RemoteClient(id=str(data["id"]), data=data)


def _numeric(remote_id: str) -> str:
    if not remote_id.isdigit():  # the route only matches numbers; answer as the API would
        raise NotFound(f"no client {remote_id!r} (Grow CRM client ids are numeric)", provider="grow_crm")
    return remote_id
