"""Invoice Ninja v5 Clients API (`/api/v1/clients`, `X-API-TOKEN`, `{data: ...}` envelopes).

Docs: https://invoiceninja.github.io/en/api-reference/ ; OpenAPI spec (copy in
`tests/data/invoiceninja-openapi/api-docs.yaml`): request bodies follow `ClientRequest`, whose
`required` is `[contacts, country_id]` on POST and PUT alike; lists take `page`/`per_page` and
answer `{data: [...], meta: {pagination: {total_pages, ...}}}` (spec `Meta`).

- Identity: the source client id is stamped into `number` on every create and update. The
  spec lists `number` as an exact list filter (`GET /api/v1/clients?number=`, ClientFilters
  `where('number', $number)`), and the server keeps it unique per company, deleted clients
  included (PROVIDERS.md 001 "Required fields"), so a create whose answer was lost cannot
  make a second record: its repeat gets 422 "number has already been taken", and `create`
  then adopts the record stamped with this id (restoring it if it was deleted). Whatever a
  user kept in `number` (IN's own client numbering) is overwritten; choose another field with
  `CLIENTSYNC_INVOICE_NINJA_ID_FIELD` (`id_number`: exact filter and unique, but then tax_id
  is not sent; `custom_value1..4`: searched through the free-text `filter` and re-checked
  locally, not unique) or `none`. `id_number` (our tax_id) is also unique per company, so it
  counts as exact; contact email (exact filter) and name (LIKE filter) are only similar.
- Idempotency: none (no header). Create returns 200 `{data}`.
- Update: PUT is partial for scalars, so a cleared field is sent as "". `contacts`, when
  sent, is the full set (matched by `id` are updated, without `id` created, missing ones
  deleted), so an update first GETs the record and reuses contact ids (by email, else position).
- Status: archive/restore are `POST /clients/bulk` actions, called after the write when the
  state differs. Delete is soft (`is_deleted`); `get()` reports a soft-deleted record as
  NotFound, and `restore()` brings it back (bulk `restore`, spec GenericBulkAction).
- Country: `country_id` is the ISO 3166-1 numeric code (CountriesSeeder). The spec requires it
  on every write, so a client without a billing address gets the company's own country (what
  the server would default to, StoreClientRequest.php): `CLIENTSYNC_INVOICE_NINJA_COUNTRY`
  (alpha-2), else read once per process from `GET /api/v1/companies`
  (`data[].settings.country_id`, spec CompanySettings); more than one company, or none with a
  country, is a PermanentError asking for the setting.
- Currency: `settings.currency_id` is Invoice Ninja's own id (CurrenciesSeeder, table below);
  sending `settings` replaces the client's settings overrides, so an update merges the existing
  ones.
- Errors: unknown id is 400 (not 404); bad token 403 "Invalid token"; 422 carries field errors.
- Calls: create 1 (+1 bulk when archived, +1 per process for the company country); update 2
  (GET + PUT, +1 bulk when the state changes); delete 1.
- Unconfirmed [?] against a live account: whether `ClientRequest` is closed (the spec sets no
  `additionalProperties`; the sandbox rejects unknown fields by default and can ignore them);
  whether `GET /api/v1/companies` lists only the token's company; whether `settings` replaces or
  merges server-side; the exact 400 message wording. Not held: tags, locale (see `field_map`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import aiohttp
import pycountry
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError, NotFound, PermanentError, ProviderError, ProviderValidationError
from worker.models import Address, Client, Contact, Country
from worker.providers.base import Identity, ProviderAdapter, ProviderConfig, RemoteClient, wire_text

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
    country: Country | None = Field(
        None,
        description="The company's country (ISO alpha-2), sent as country_id for clients without a "
        "billing address (the spec requires one); unset = read from GET /api/v1/companies.",
    )

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


#: spec ClientFilters: these list filters compare exactly (`where(col, value)`); custom values are
#: reachable only through the free-text `filter` (LIKE over several columns), re-checked locally
_EXACT_FILTERS = ("number", "id_number")
_CUSTOM = ("custom_value1", "custom_value2", "custom_value3", "custom_value4")
_LIVE = "active,archived"  # spec parameter `status`: leave deleted clients out of every search


class InvoiceNinja(ProviderAdapter):
    """Invoice Ninja v5 (hosted invoicing.co or self-hosted)."""

    name = "invoice_ninja"
    title = "Invoice Ninja v5"
    settings_class = InvoiceNinjaConfig
    default_url = "https://invoicing.co"
    identity = Identity(
        stamp="number",
        unique=("tax_id",),
        similar=("email", "name"),
        notes=(
            "Source id stamped into `number`: an exact list filter (spec GET /api/v1/clients "
            "parameter `number`; ClientFilters::number) kept unique per company, deleted clients "
            "included (StoreClientRequest/UpdateClientRequest). tax_id is sent as `id_number`, also "
            "an exact filter and unique per company. Contact email (`email` filter, exact but not "
            "unique) and name (`name` filter, LIKE) are only similar. Records carry `created_at`."
        ),
    )
    #: canonical field -> how Invoice Ninja holds it (docs/providers.md is generated from this)
    field_map: ClassVar[dict[str, str]] = {
        "id": "sent as number (the identity stamp; CLIENTSYNC_INVOICE_NINJA_ID_FIELD picks another field)",
        "kind": "sent as classification (individual / company)",
        "name": "sent as name (else the person's name)",
        "first_name": "sent as the primary contact's first_name",
        "last_name": "sent as the primary contact's last_name",
        "email": "sent as the primary contact's email (IN has no client-level email)",
        "phone": "sent as phone",
        "website": "sent as website",
        "vat_number": "sent as vat_number",
        "tax_id": "sent as id_number (unique per company)",
        "billing_address": "sent as address1, address2, city, state, postal_code, country_id (ISO numeric)",
        "shipping_address": "sent as shipping_address1 ... shipping_country_id",
        "currency": "sent as settings.currency_id (Invoice Ninja's currency id); a removed currency is "
        "left as it was (spec ClientSettings requires currency_id)",
        "locale": "not supported (IN keeps a language_id in settings; no mapping yet)",
        "notes": "sent as private_notes",
        "tags": "not supported (the Clients API has no tags)",
        "status": "sent as bulk archive / restore (POST /api/v1/clients/bulk)",
        "contacts": "sent as contacts (the full set; ids reused by email, then position)",
    }

    config: InvoiceNinjaConfig

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        #: the company's country_id, for writes of clients without an address (read once)
        self._home_country: int | None = _country_id(self.config.country) if self.config.country else None

    def auth_headers(self) -> dict[str, str]:
        config = self.config
        assert config.token is not None
        headers = {"X-API-TOKEN": config.token.get_secret_value(), "X-Requested-With": "XMLHttpRequest"}
        if config.api_secret is not None:
            headers["X-API-SECRET"] = config.api_secret.get_secret_value()
        return headers

    def refine_error(self, error: ProviderError, body: Any) -> ProviderError:
        if error.status == 400 and not error.field_errors and _NOT_FOUND.search(error.message):
            return NotFound(error.message, provider=self.name, status=400)
        return error

    def unsupported_fields(self, client: Client) -> list[str]:
        """The canonical fields set on `client` that Invoice Ninja cannot hold."""
        out = super().unsupported_fields(client)
        if self.stamp_field == "id_number" and client.tax_id:
            out.append("tax_id")  # its field carries the stamp
        return out

    def validate(self, client: Client) -> None:
        def fail(field: str, rule: str) -> None:
            raise LocalValidationError(f"{field}: {rule}", provider=self.name, field_errors={field: [rule]})

        values = {"name": client.display_name, **{w: getattr(client, f) for w, f in _SCALARS.items()}}
        if self.stamp_field:
            values[self.stamp_field] = self.stamp_value(client.id)
        for prefix, address in (("", client.billing_address), ("shipping_", client.shipping_address)):
            values.update({f"{prefix}{k}": getattr(address, f, None) for k, f in _ADDRESS.items()})
        for i, contact in enumerate(_wanted_contacts(client)):
            values.update({f"contacts.{i}.{k}": getattr(contact, k) for k in ("first_name", "last_name", "phone")})
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
        if not wanted and old_contacts:  # no person at all: one blank contact, as IN keeps for []
            contacts = [
                {"id": old_contacts[0]["id"], **dict.fromkeys(("first_name", "last_name", "email", "phone"), "")}
            ]
        body: dict[str, Any] = {
            "name": client.display_name or "",
            "classification": client.kind,
            **{w: getattr(client, f) or "" for w, f in _SCALARS.items()},
            "private_notes": client.notes or "",
            **_address("", client.billing_address),
            **_address("shipping_", client.shipping_address),
            "contacts": contacts,
        }
        if "country_id" not in body:  # required by the spec: keep the record's, else the company's
            kept = int(old["country_id"]) if _country(old.get("country_id")) else self._home_country
            if kept is not None:
                body["country_id"] = kept
        if client.currency:
            settings = dict(old.get("settings") or {})
            settings["currency_id"] = str(_CURRENCIES.index(client.currency) + 1)
            body["settings"] = settings
        if self.stamp_field:
            body[self.stamp_field] = self.stamp_value(client.id)  # overwrites whatever the field held (tax_id too)
        return body

    def from_wire(self, data: dict[str, Any]) -> Client:
        raw_contacts = [c for c in (data.get("contacts") or []) if isinstance(c, dict)]
        contacts = tuple(c for c in map(_contact_from, raw_contacts) if c is not None)
        primary = next((c for c in contacts if c.is_primary), contacts[0] if contacts else None)
        currency_id = wire_text((data.get("settings") or {}).get("currency_id"))
        currency = None
        if currency_id and currency_id.isdigit() and 0 < int(currency_id) <= len(_CURRENCIES):
            currency = _CURRENCIES[int(currency_id) - 1]
        scalars = {f: wire_text(data.get(w)) for w, f in _SCALARS.items() if w != self.stamp_field}
        return Client(
            id=str(data["id"]),
            kind="individual" if data.get("classification") == "individual" else "company",
            name=wire_text(data.get("name")),
            first_name=primary.first_name if primary else None,
            last_name=primary.last_name if primary else None,
            email=primary.email if primary else None,
            **scalars,
            notes=(wire_text(data.get("private_notes")) or "")[:1000] or None,
            billing_address=_address_from("", data),
            shipping_address=_address_from("shipping_", data),
            currency=currency,
            status="archived" if data.get("archived_at") and not data.get("is_deleted") else "active",
            contacts=contacts,
        )

    # --- the Clients API ---------------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        await self._know_home_country(client, None)
        try:
            body = await self.request("POST", _PATH, json_body=self.to_wire(client))
        except ProviderValidationError as exc:
            # Our stamp is taken: the record is this client's own (a create whose answer was
            # lost, or one deleted since). Adopt it instead of failing or creating another.
            own = await self._stamped_any_state(client) if self.stamp_field in exc.field_errors else None
            if own is None:
                raise
            if own.data.get("is_deleted"):
                own = await self.restore(own.id)
            return await self.update(own.id, client)
        return await self._apply_status(client, _record(body, self.name))

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        existing = await self.get(remote_id)
        await self._know_home_country(client, existing)
        payload = self.to_wire(client, existing=existing)
        body = await self.request("PUT", f"{_PATH}/{remote_id}", json_body=payload)
        return await self._apply_status(client, _record(body, self.name))

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"{_PATH}/{remote_id}")

    async def restore(self, remote_id: str) -> RemoteClient:
        """Bring back a (soft-)deleted or archived client: bulk action `restore` (spec
        GenericBulkAction; PROVIDERS.md 001 "Operations"). Restoring a live client changes nothing."""
        body = await self.request("POST", f"{_PATH}/bulk", json_body={"action": "restore", "ids": [remote_id]})
        found = [d for d in _records(body, self.name) if str(d.get("id")) == remote_id]
        if not found:
            raise NotFound(f"client {remote_id} is not there to restore", provider=self.name)
        return RemoteClient(id=remote_id, data=found[0])

    async def get(self, remote_id: str) -> RemoteClient:
        data = _record(await self.request("GET", f"{_PATH}/{remote_id}"), self.name)
        if data.get("is_deleted"):
            raise NotFound(f"client {remote_id} is deleted", provider=self.name)
        return RemoteClient(id=str(data["id"]), data=data)

    # --- identity ------------------------------------------------------------------------------
    async def search(self, key: str, value: str) -> list[RemoteClient]:
        field = self.stamp_field if key == "stamp" else {"tax_id": "id_number"}.get(key, key)
        if key == "stamp":
            value = self.stamp_value(value)
        if field is None or (key == "tax_id" and self.stamp_field == "id_number"):
            return []  # no stamp field / id_number carries the stamp, not the tax id
        return [
            RemoteClient(id=str(r["id"]), data=r)
            async for r in self._pages({**_filter(field, value), "status": _LIVE}, 100)
            if not r.get("is_deleted") and _has(r, field, value)
        ]

    def created_at(self, remote: RemoteClient) -> float | None:
        value = remote.data.get("created_at")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value else None

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        async for item in self._pages({"status": _LIVE}, page_size):
            if not item.get("is_deleted"):
                yield RemoteClient(id=str(item["id"]), data=item)

    # --- helpers -------------------------------------------------------------------------------
    async def _pages(self, params: dict[str, str], size: int) -> AsyncIterator[dict[str, Any]]:
        """Every item of a list query, page by page (spec: `page`, `per_page`, `meta.pagination`)."""
        page = 1
        while True:
            body = await self.request("GET", _PATH, params={**params, "page": page, "per_page": size})
            items = _records(body, self.name)
            pagination = (body.get("meta") or {}).get("pagination") if isinstance(body, dict) else None
            if not isinstance(pagination, dict) or not str(pagination.get("total_pages", "")).isdigit():
                raise PermanentError(
                    f"list answer without meta.pagination.total_pages: {str(body)[:200]}", provider=self.name
                )
            for item in items:
                yield item
            if not items or page >= int(pagination["total_pages"]):
                return
            page += 1

    async def _stamped_any_state(self, client: Client) -> RemoteClient | None:
        """The one record stamped with `client.id`, deleted ones included (a 422 on our stamp)."""
        field = self.stamp_field
        assert field is not None
        stamp = self.stamp_value(client.id)
        params = {**_filter(field, stamp), "status": "active,archived,deleted"}
        found = [r async for r in self._pages(params, 100) if _has(r, field, stamp)]
        return RemoteClient(id=str(found[0]["id"]), data=found[0]) if len(found) == 1 else None

    async def _know_home_country(self, client: Client, existing: RemoteClient | None) -> None:
        """Learn the company's country once, when a write needs it (no address, none kept)."""
        if client.billing_address or self._home_country is not None:
            return
        if existing is not None and _country(existing.data.get("country_id")):
            return
        body = await self.request("GET", "/api/v1/companies")
        countries = {_country((c.get("settings") or {}).get("country_id")) for c in _records(body, self.name)}
        if len(countries) != 1 or None in countries:
            raise PermanentError(
                "cannot tell the company's country (GET /api/v1/companies answered "
                f"{len(_records(body, self.name))} companies): set CLIENTSYNC_INVOICE_NINJA_COUNTRY",
                provider=self.name,
            )
        code = countries.pop()
        assert code is not None
        self._home_country = _country_id(code)

    async def _apply_status(self, client: Client, data: dict[str, Any]) -> RemoteClient:
        archived = bool(data.get("archived_at"))
        action = {("archived", False): "archive", ("active", True): "restore"}.get((client.status, archived))
        if action and not data.get("is_deleted"):
            body = await self.request("POST", f"{_PATH}/bulk", json_body={"action": action, "ids": [data["id"]]})
            data = next((d for d in _records(body, self.name) if d.get("id") == data["id"]), data)
        return RemoteClient(id=str(data["id"]), data=data)


def _filter(field: str, value: str) -> dict[str, str]:
    if field in _EXACT_FILTERS or field in ("email", "name"):
        return {field: value}
    if field in _CUSTOM:
        return {"filter": value}
    raise PermanentError(
        f"Invoice Ninja cannot search clients by {field!r} (CLIENTSYNC_INVOICE_NINJA_ID_FIELD must be "
        f"one of {', '.join(_EXACT_FILTERS + _CUSTOM)})",
        provider="invoice_ninja",
    )


def _record(body: Any, provider: str) -> dict[str, Any]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict) or not data.get("id"):
        raise PermanentError(f"answer without a client in data: {str(body)[:200]}", provider=provider)
    return data


def _records(body: Any, provider: str) -> list[dict[str, Any]]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise PermanentError(f"list answer without a data array: {str(body)[:200]}", provider=provider)
    return data


def _has(record: dict[str, Any], key: str, value: str) -> bool:
    """Re-check a list filter locally: exact (case-insensitive) email on a contact, else exact value."""
    if key == "email":
        return any(str(c.get("email") or "").casefold() == value.casefold() for c in record.get("contacts") or [])
    return str(record.get(key) or "") == value
