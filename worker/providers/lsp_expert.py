"""LSP.expert Clients API (`/v2/clients`), docs: https://docs.lsp.expert/clients.

- Auth: HTTP Basic, the API key as user name and an empty password (`curl -u {key}:`).
- Idempotency: none documented; a create is never safe to repeat, so `find` runs first.
- Update: `PUT` is partial ("any parameters not provided will be left unchanged"), so a
  field cleared at the source is sent as "" (the docs' bodies are form-encoded, where ""
  is the only way to say "empty"; whether LSP.expert clears on "" is unconfirmed).
- Delete: `DELETE /v2/clients/{id}` is inferred, not seen verbatim; hard or soft is not
  stated. `archived: true` (canonical status "archived") is the documented soft path.
- Contacts are a sub-resource `/v2/clients/{id}/contacts` (`fullName` required); the
  client's own email/phone travel as its first contact (LSP clients have no email field).
  Create posts each contact after the client. Update matches the client's embedded
  `contacts` by email (else full name): a missing one is posted, a changed one is `PUT`
  to `/v2/clients/{id}/contacts/{contactId}` (inferred path [?]), and none is deleted
  (contacts the source dropped stay). Posting missing ones also repairs a create that died
  between the client and its contacts (the retry adopts the client via `find`).
- Find: no filter is documented, so `find` scans every page for an exact VAT number,
  national id, contact email, or name match, in that order of trust.
- Lists: `page` (1-based) -> `{items, page, totalPages, hasNextPage, ...}`, 20 a page.
  No page-size parameter is documented; `pageSize` (the envelope's own field name) is
  sent as a hint, and paging follows `hasNextPage`, so it works if the server ignores it.

Unconfirmed [?]: the client paths themselves, JSON bodies (the docs' examples are
form-encoded), the read shape of `address` beyond `name`, error codes for 401/422/429,
rate limits (none documented), the contact update path.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError
from worker.models import Address, Client, Contact
from worker.providers.base import ProviderAdapter, ProviderConfig, RemoteClient

CLIENTS = "/v2/clients"


class LSPExpertConfig(ProviderConfig):
    """`CLIENTSYNC_LSP_EXPERT_*`: the API key from the app's "API settings"."""

    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_LSP_EXPERT_", extra="ignore", frozen=True)

    api_key: SecretStr | None = None

    def is_configured(self) -> bool:
        return bool(self.api_key and self.api_key.get_secret_value())

    def missing(self) -> str:
        return "" if self.is_configured() else "set CLIENTSYNC_LSP_EXPERT_API_KEY (the API key)"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class _Contact(_Wire):
    id: str | None = None
    full_name: str = Field("", alias="fullName")
    email: str | None = None
    phone: str | None = None


class _AddressRead(_Wire):
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = Field(None, alias="postalCode")
    country: str | None = None


class _Currency(_Wire):
    code: str | None = None


class _Invoice(_Wire):
    currency: _Currency | None = None


class _ClientRead(_Wire):
    id: str
    name: str | None = None
    address: _AddressRead | None = None
    archived: bool = False
    contacts: list[_Contact] = []
    details: str | None = None
    invoice: _Invoice | None = None
    vat_number: str | None = Field(None, alias="vatNumber")
    national_id: str | None = Field(None, alias="nationalIdentificationNumber")


class LSPExpert(ProviderAdapter):
    name = "lsp_expert"
    title = "LSP.expert"
    settings_class = LSPExpertConfig
    default_url = "https://api.lsp.expert"
    config: LSPExpertConfig

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key.get_secret_value() if self.config.api_key else ""
        token = base64.b64encode(f"{key}:".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def parse_error(self, status: int, body: Any) -> tuple[str, dict[str, list[str]]]:
        # `{message, name, code, id}`; a 422 may add Mongoose-style `errors: {field: {message}}`.
        message, fields = super().parse_error(status, body)
        if isinstance(body, dict) and isinstance(body.get("errors"), dict):
            fields = {
                str(k): [str(v.get("message", v)) if isinstance(v, dict) else str(v)]
                for k, v in body["errors"].items()
            }
        return message, fields

    # --- mapping -------------------------------------------------------------------------
    def validate(self, client: Client) -> None:
        if not client.display_name:
            raise LocalValidationError(
                "name is required by LSP.expert: set client.name or first_name/last_name",
                provider=self.name,
                field_errors={"name": ["required (client.name, or first_name/last_name)"]},
            )

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        a = client.billing_address
        body: dict[str, Any] = {
            "name": client.display_name, "vatNumber": client.vat_number,
            "nationalIdentificationNumber": client.tax_id, "currency": client.currency,
            "details": client.notes, "archived": client.status == "archived",
            "addressLine1": a and a.line1, "addressLine2": a and a.line2, "addressCity": a and a.city,
            "addressState": a and a.region, "addressPostalCode": a and a.postal_code,
            "addressCountry": a and a.country,
        }  # fmt: skip
        kept = {k: v for k, v in body.items() if v is not None}
        # a partial PUT keeps omitted fields: say "empty" for what the source cleared (not currency)
        cleared = {k: "" for k, v in body.items() if v is None and k != "currency"}
        return kept if existing is None else kept | cleared

    def contacts_to_wire(self, client: Client) -> list[dict[str, str]]:
        """The contacts to hold at LSP.expert ("" = none); the client's own email/phone lead."""
        out = [
            {"fullName": _full_name(c.first_name, c.last_name) or c.email or "", "email": c.email or "",
             "phone": c.phone or (client.phone if c.email and c.email == client.email else None) or ""}
            for c in client.contacts
        ]  # fmt: skip
        if client.email and all(c.email != client.email for c in client.contacts):
            full = _full_name(client.first_name, client.last_name) or client.display_name or client.email
            out.insert(0, {"fullName": full, "email": client.email, "phone": client.phone or ""})
        return [c for c in out if c["fullName"]]

    def from_wire(self, data: dict[str, Any]) -> Client:
        w = _ClientRead.model_validate(data)
        a = w.address
        address = (
            Address(line1=a.line1, line2=a.line2, city=a.city, region=a.state,
                    postal_code=a.postal_code, country=a.country)
            if a and a.country else None
        )  # fmt: skip
        contacts = tuple(
            Contact(first_name=c.full_name.partition(" ")[0] or None,
                    last_name=c.full_name.partition(" ")[2] or None, email=c.email, phone=c.phone)
            for c in w.contacts if c.full_name or c.email
        )  # fmt: skip
        own = next((c for c in contacts if c.email), None)
        currency = w.invoice.currency.code if w.invoice and w.invoice.currency else None
        return Client(
            id=w.id, name=w.name, email=own and own.email, phone=own and own.phone,
            vat_number=w.vat_number, tax_id=w.national_id, billing_address=address,
            currency=currency, notes=w.details, contacts=contacts,
            status="archived" if w.archived else "active",
        )  # fmt: skip

    # --- operations ----------------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        data = await self.request("POST", CLIENTS, json_body=self.to_wire(client))
        await self._sync_contacts(str(data["id"]), client, [])
        return await self.get(str(data["id"]))

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        existing = await self.get(remote_id)
        await self.request("PUT", f"{CLIENTS}/{remote_id}", json_body=self.to_wire(client, existing=existing))
        await self._sync_contacts(remote_id, client, existing.data.get("contacts") or [])
        return await self.get(remote_id)

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"{CLIENTS}/{remote_id}")

    async def get(self, remote_id: str) -> RemoteClient:
        data = await self.request("GET", f"{CLIENTS}/{remote_id}")
        return RemoteClient(id=str(data["id"]), data=data)

    async def find(self, client: Client) -> RemoteClient | None:
        want = self.to_wire(client)
        records = [r async for r in self.list()]
        keys = (
            ("vatNumber", want.get("vatNumber")),
            ("nationalIdentificationNumber", want.get("nationalIdentificationNumber")),
            ("email", (client.email or "").casefold() or None),
            ("name", want.get("name")),
        )
        for key, value in keys:
            for record in records if value else ():
                if value in _values(record.data, key):
                    return record
        return None

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        page = 1
        while True:
            data = await self.request("GET", CLIENTS, params={"page": page, "pageSize": page_size})
            for item in data.get("items", []):
                yield RemoteClient(id=str(item["id"]), data=item)
            if not data.get("hasNextPage") or page >= int(data.get("totalPages") or page):
                return
            page += 1

    async def _sync_contacts(self, remote_id: str, client: Client, current: Sequence[dict[str, Any]]) -> None:
        path = f"{CLIENTS}/{remote_id}/contacts"
        held = {_contact_key(c): c for c in current}
        for want in self.contacts_to_wire(client):
            have = held.get(_contact_key(want))
            if have is None:
                await self.request("POST", path, json_body={k: v for k, v in want.items() if v})
            elif any((have.get(k) or "") != v for k, v in want.items()):
                await self.request("PUT", f"{path}/{have['id']}", json_body=want)


def _full_name(first: str | None, last: str | None) -> str:
    return " ".join(p for p in (first, last) if p)


def _contact_key(contact: dict[str, Any]) -> str:
    return str(contact.get("email") or contact.get("fullName") or "").casefold()


def _values(record: dict[str, Any], key: str) -> set[Any]:
    if key == "email":
        return {str(c.get("email") or "").casefold() for c in record.get("contacts") or []}
    return {record.get(key)}
