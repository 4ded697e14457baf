"""Invoice Ninja v5 Clients API (`/api/v1/clients`, `X-API-TOKEN`, `{data: ...}` envelopes).

Docs: https://invoiceninja.github.io/en/api-reference/ ; OpenAPI spec (bundled copy in
`shared/external/invoiceninja-openapi/api-docs.yaml`): request bodies follow `ClientRequest`.

- Idempotency: none (no header, no idempotent create). `find()` uses natural keys instead:
  a contact's email (list filter `email=`), then `id_number` (unique per company; our tax_id).
- Update: PUT is partial for scalars, so a cleared field is sent as "". `contacts`, when
  sent, is the full set (matched by `id` are updated, without `id` created, missing ones
  deleted), so an update first GETs the record and reuses contact ids (by email, else position).
- Status: archive/restore are `POST /clients/bulk` actions, called after the write when the
  state differs. Delete is soft (`is_deleted`); `get()` reports a soft-deleted record as NotFound.
- Country: `country_id` is the ISO 3166-1 numeric code (CountriesSeeder). Currency:
  `settings.currency_id` is Invoice Ninja's own id (CurrenciesSeeder, table below); sending
  `settings` replaces the client's settings overrides, so an update merges the existing ones.
- Errors: unknown id is 400 (not 404); bad token 403 "Invalid token"; 422 carries field errors.
- Unconfirmed [?]: whether the `email=` filter is exact (we re-check locally); the exact
  400 message wording; whether `settings` replaces or merges server-side. A create without any
  billing address omits `country_id` (the spec marks it required; the server then uses the
  company's country, StoreClientRequest.php). Not held: tags,
  locale, a client-level email separate from its contacts, clearing a country or currency.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pycountry
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError, NotFound, ProviderError
from worker.models import Address, Client, Contact
from worker.providers.base import ProviderAdapter, ProviderConfig, RemoteClient, wire_text

_PATH = "/api/v1/clients"
# Invoice Ninja's currency ids are 1..123 in this order
# (invoiceninja/invoiceninja:database/seeders/CurrenciesSeeder.php).
_CURRENCIES = (
    "USD", "GBP", "EUR", "ZAR", "DKK", "ILS", "SEK", "KES", "CAD", "PHP", "INR", "AUD", "SGD", "NOK", "NZD",
    "VND", "CHF", "GTQ", "MYR", "BRL", "THB", "NGN", "ARS", "BDT", "AED", "HKD", "IDR", "MXN", "EGP", "COP",
    "XOF", "CNY", "RWF", "TZS", "ANG", "TTD", "XCD", "GHS", "BGN", "AWG", "TRY", "RON", "HRK", "SAR", "JPY",
    "MVR", "CRC", "PKR", "PLN", "LKR", "CZK", "UYU", "NAD", "TND", "RUB", "MZN", "OMR", "UAH", "MOP", "TWD",
    "DOP", "CLP", "ISK", "PGK", "JOD", "MMK", "PEN", "BWP", "HUF", "UGX", "BBD", "BND", "GEL", "QAR", "HNL",
    "SRD", "BHD", "VES", "KRW", "MAD", "JMD", "AOA", "HTG", "ZMW", "NPR", "XPF", "MUR", "CVE", "KWD", "DZD",
    "MKD", "FJD", "BOB", "ALL", "RSD", "LBP", "AMD", "AZN", "BAM", "BYN", "GIP", "MDL", "KZT", "ETB", "GMD",
    "PYG", "MWK", "ZWL", "KHR", "VUV", "CUP", "KYD", "SZL", "BZD", "LYD", "XAG", "XAU", "NIO", "MGA", "TOP",
    "LAK", "BTN", "MRU",
)  # fmt: skip
_ADDRESS = {"address1": "line1", "address2": "line2", "city": "city", "state": "region",
            "postal_code": "postal_code"}  # fmt: skip
_SCALARS = {"phone": "phone", "website": "website", "vat_number": "vat_number", "id_number": "tax_id"}
# DB columns are varchar(191) (Laravel defaultStringLength), contact email varchar(100);
# the API layer does not check, so a longer value fails as a database error (500).
_MAX, _MAX_EMAIL = 191, 100
_NOT_FOUND = re.compile(r"no query results|not found", re.IGNORECASE)


class InvoiceNinjaConfig(ProviderConfig):
    """`CLIENTSYNC_INVOICE_NINJA_{URL,TOKEN,API_SECRET}`."""

    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_INVOICE_NINJA_", extra="ignore", frozen=True)

    token: SecretStr | None = None
    api_secret: SecretStr | None = None  # only self-hosted instances that set API_SECRET check it

    def is_configured(self) -> bool:
        return bool(self.token and self.token.get_secret_value())

    def missing(self) -> str:
        return "" if self.is_configured() else "set CLIENTSYNC_INVOICE_NINJA_TOKEN (an API token)"


def _country_id(code: str) -> int:
    found = pycountry.countries.get(alpha_2=code)
    assert found is not None  # `Address.country` is validated against pycountry
    return int(found.numeric)


def _country(value: Any) -> str | None:
    try:
        found = pycountry.countries.get(numeric=f"{int(value):03d}")
    except (TypeError, ValueError):
        return None
    return str(found.alpha_2) if found else None


def _address(prefix: str, address: Address | None) -> dict[str, Any]:
    out: dict[str, Any] = {f"{prefix}{k}": getattr(address, f, None) or "" for k, f in _ADDRESS.items()}
    if address is not None:
        out[f"{prefix}country_id"] = _country_id(address.country)
    return out


def _address_from(prefix: str, data: dict[str, Any]) -> Address | None:
    country = _country(data.get(f"{prefix}country_id"))
    if country is None:  # an address without a country cannot be canonical
        return None
    values = {f: wire_text(data.get(f"{prefix}{k}")) for k, f in _ADDRESS.items()}
    return Address(country=country, **values) if any(values.values()) else None


def _contact_from(raw: dict[str, Any]) -> Contact | None:
    fields = {k: wire_text(raw.get(k)) for k in ("first_name", "last_name", "email", "phone")}
    if not any(fields.values()):
        return None
    try:
        return Contact(is_primary=bool(raw.get("is_primary")), **fields)
    except ValueError:  # an address typed into the IN UI that our model rejects
        return Contact(is_primary=bool(raw.get("is_primary")), **{**fields, "email": None})


def _wanted_contacts(client: Client) -> list[Contact]:
    """Primary first (IN makes the first contact primary); else one built from the client."""
    primary = client.primary_contact
    if primary is not None:
        others = [c for c in client.contacts if c is not primary]
        if client.email and not primary.email and all(c.email != client.email for c in others):
            # IN has no client-level email: the primary contact carries it, or the client could
            # never be found again by email (lookup-before-create would then create twice).
            primary = primary.model_copy(update={"email": client.email})
        return [primary, *others]
    if client.first_name or client.last_name or client.email:
        return [Contact(first_name=client.first_name, last_name=client.last_name, email=client.email)]
    return []


def _contact_ids(wanted: list[Contact], existing: list[dict[str, Any]]) -> list[str | None]:
    """Existing contact ids to reuse: matched by email first, then by position."""
    ids: list[str | None] = [None] * len(wanted)
    used: set[str] = set()
    for i, contact in enumerate(wanted):
        for old in existing:
            email = str(old.get("email") or "").casefold()
            if contact.email and old["id"] not in used and email == contact.email.casefold():
                ids[i] = old["id"]
                used.add(old["id"])
                break
    for i in range(min(len(wanted), len(existing))):
        if ids[i] is None and existing[i]["id"] not in used:
            ids[i] = existing[i]["id"]
            used.add(existing[i]["id"])
    return ids


class InvoiceNinja(ProviderAdapter):
    """Invoice Ninja v5 (hosted invoicing.co or self-hosted)."""

    name = "invoice_ninja"
    title = "Invoice Ninja v5"
    settings_class = InvoiceNinjaConfig
    default_url = "https://invoicing.co"

    def auth_headers(self) -> dict[str, str]:
        config = self.config
        assert isinstance(config, InvoiceNinjaConfig)
        assert config.token is not None
        headers = {"X-API-TOKEN": config.token.get_secret_value(), "X-Requested-With": "XMLHttpRequest"}
        if config.api_secret is not None:
            headers["X-API-SECRET"] = config.api_secret.get_secret_value()
        return headers

    def refine_error(self, error: ProviderError, body: Any) -> ProviderError:
        if error.status == 400 and not error.field_errors and _NOT_FOUND.search(error.message):
            return NotFound(error.message, provider=self.name, status=400)
        return error

    def validate(self, client: Client) -> None:
        def fail(field: str, rule: str) -> None:
            raise LocalValidationError(f"{field}: {rule}", provider=self.name, field_errors={field: [rule]})

        values = {"name": client.display_name, **{w: getattr(client, f) for w, f in _SCALARS.items()}}
        for prefix, address in (("", client.billing_address), ("shipping_", client.shipping_address)):
            values.update({f"{prefix}{k}": getattr(address, f, None) for k, f in _ADDRESS.items()})
        for i, contact in enumerate(_wanted_contacts(client)):
            values.update(
                {f"contacts.{i}.{k}": getattr(contact, k) for k in ("first_name", "last_name", "phone")}
            )
            if contact.email and len(contact.email) > _MAX_EMAIL:
                fail(f"contacts.{i}.email", f"at most {_MAX_EMAIL} characters")
        for field, value in values.items():
            if value and len(value) > _MAX:
                fail(field, f"at most {_MAX} characters")
        if client.currency and client.currency not in _CURRENCIES:
            fail("currency", f"{client.currency} is not a currency Invoice Ninja knows")

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        old = existing.data if existing else {}
        wanted = _wanted_contacts(client)
        old_contacts = [c for c in old.get("contacts") or [] if c.get("id")]
        ids = _contact_ids(wanted, old_contacts)
        contacts: list[dict[str, Any]] = []
        for contact, contact_id in zip(wanted, ids, strict=True):
            wire = {k: getattr(contact, k) or "" for k in ("first_name", "last_name", "email", "phone")}
            contacts.append({"id": contact_id, **wire} if contact_id else wire)
        if not wanted:  # nothing canonical to say: keep the contacts IN has (omitting would too)
            contacts = [{"id": c["id"]} for c in old_contacts]
        body: dict[str, Any] = {
            "name": client.display_name or "",
            "classification": client.kind,
            **{w: getattr(client, f) or "" for w, f in _SCALARS.items()},
            "private_notes": client.notes or "",
            **_address("", client.billing_address),
            **_address("shipping_", client.shipping_address),
            "contacts": contacts,
        }
        if "country_id" not in body and _country(old.get("country_id")):
            body["country_id"] = int(old["country_id"])  # the spec requires it; resending changes nothing
        if client.currency:
            settings = dict(old.get("settings") or {})
            settings["currency_id"] = str(_CURRENCIES.index(client.currency) + 1)
            body["settings"] = settings
        return body

    def from_wire(self, data: dict[str, Any]) -> Client:
        raw_contacts = [c for c in (data.get("contacts") or []) if isinstance(c, dict)]
        contacts = tuple(c for c in map(_contact_from, raw_contacts) if c is not None)
        primary = next((c for c in contacts if c.is_primary), contacts[0] if contacts else None)
        currency_id = wire_text((data.get("settings") or {}).get("currency_id"))
        currency = None
        if currency_id and currency_id.isdigit() and 0 < int(currency_id) <= len(_CURRENCIES):
            currency = _CURRENCIES[int(currency_id) - 1]
        return Client(
            id=str(data["id"]),
            kind="individual" if data.get("classification") == "individual" else "company",
            name=wire_text(data.get("name")),
            first_name=primary.first_name if primary else None,
            last_name=primary.last_name if primary else None,
            email=primary.email if primary else None,
            **{f: wire_text(data.get(w)) for w, f in _SCALARS.items()},
            notes=(wire_text(data.get("private_notes")) or "")[:1000] or None,
            billing_address=_address_from("", data),
            shipping_address=_address_from("shipping_", data),
            currency=currency,
            status="archived" if data.get("archived_at") and not data.get("is_deleted") else "active",
            contacts=contacts,
        )

    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        body = await self.request("POST", _PATH, json_body=self.to_wire(client))
        return await self._apply_status(client, body["data"])

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        existing = await self.get(remote_id)
        payload = self.to_wire(client, existing=existing)
        body = await self.request("PUT", f"{_PATH}/{remote_id}", json_body=payload)
        return await self._apply_status(client, body["data"])

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"{_PATH}/{remote_id}")

    async def get(self, remote_id: str) -> RemoteClient:
        data = (await self.request("GET", f"{_PATH}/{remote_id}"))["data"]
        if data.get("is_deleted"):
            raise NotFound(f"client {remote_id} is deleted", provider=self.name)
        return RemoteClient(id=str(data["id"]), data=data)

    async def find(self, client: Client) -> RemoteClient | None:
        primary = client.primary_contact
        email = client.email or (primary.email if primary else None)
        for key, value in (("email", email), ("id_number", client.tax_id)):
            if not value:
                continue
            body = await self.request("GET", _PATH, params={key: value, "per_page": 50})
            matches = [r for r in body.get("data") or [] if not r.get("is_deleted") and _has(r, key, value)]
            if len(matches) == 1:
                return RemoteClient(id=str(matches[0]["id"]), data=matches[0])
        return None

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        page = 1
        while True:
            body = await self.request("GET", _PATH, params={"page": page, "per_page": page_size})
            items = body.get("data") or []
            for item in items:
                yield RemoteClient(id=str(item["id"]), data=item)
            total = int(((body.get("meta") or {}).get("pagination") or {}).get("total_pages") or 1)
            if not items or page >= total:
                return
            page += 1

    async def _apply_status(self, client: Client, data: dict[str, Any]) -> RemoteClient:
        archived = bool(data.get("archived_at"))
        action = {("archived", False): "archive", ("active", True): "restore"}.get((client.status, archived))
        if action and not data.get("is_deleted"):
            body = await self.request(
                "POST", f"{_PATH}/bulk", json_body={"action": action, "ids": [data["id"]]}
            )
            data = next((d for d in body.get("data") or [] if d.get("id") == data["id"]), data)
        return RemoteClient(id=str(data["id"]), data=data)


def _has(record: dict[str, Any], key: str, value: str) -> bool:
    """Re-check a list filter locally: exact (case-insensitive) email on a contact, exact id_number."""
    if key == "email":
        return any(
            str(c.get("email") or "").casefold() == value.casefold() for c in record.get("contacts") or []
        )
    return str(record.get(key) or "") == value
