"""Request Finance: the Clients API at https://api.request.finance (docs: https://docs.request.finance/clients).

- Auth: an API key sent raw in `Authorization` (deprecated for live apps), or an OAuth2
  access token sent as `Authorization: Bearer …` with the mandatory `X-Network: live|test`.
  The newest docs say the Clients API is OAuth-only and write access needs RF approval.
- Clients have no test environment: a test key writes production clients.
- Idempotency: none, and nothing is documented as unique. Identity: no field holds an
  external id and is searchable (`search` matches "email or business name" only), so no
  stamp by default and nothing exact; `email` (required on every client) is declared
  `similar`, used only to settle an unclear create with the whole payload and `createdDate`.
  `CLIENTSYNC_REQUEST_FINANCE_ID_FIELD` can name a documented free-text field to stamp
  (`department` or `jobTitle`): it is overwritten on every write, and `search` then reads
  every page for it.
- Delete: there is no documented delete; `delete` raises `Unsupported`.
- Update: `PUT /clients/{id}` takes the create body. Whether omitted fields are cleared is
  undocumented, so `update` reads the record first and carries over the fields clientsync
  does not own (`jobTitle`, `department`, `paymentMethods`). Calls: create 1, update 2.
- Person fields sit on the client: firstName/lastName come from the client's own names, or
  from its primary contact only when the client has none; the phone is the client's own
  (never the contact's, so clearing it clears it). Fields RF does not document (website,
  notes, tags, currency, locale, status, shipping address) are declared in `field_map`.
- Lists: the docs say the list is "not paginated" (a JSON array) and, newer, that
  `&format=paginated` enables `take` (≤ 100) / `skip` / `search` and "returns the total
  number of results" — without showing the envelope. Accepted: a bare array (a server that
  ignores `format=paginated`), or an object holding the page in exactly one of `items`,
  `data`, `clients` with an optional integer `total`. Anything else is a `PermanentError`
  naming the shape, never an empty page; so is a page that repeats ids (a server ignoring
  `skip`) or an empty page before `total` is reached.

Unconfirmed (PROVIDERS.md marks these [?]): the error format and status codes, rate
limits, the raw-key form of `Authorization`, which of the accepted envelopes the paginated
form really uses, whether PUT replaces or merges, whether unknown body fields are rejected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError, PermanentError, Unsupported
from worker.models import Address, Client
from worker.providers.base import Identity, ProviderAdapter, ProviderConfig, RemoteClient, wire_text

_MAX_TAKE = 100
#: fields of the RF record that clientsync has no canonical value for; kept across a PUT
_UNOWNED = ("jobTitle", "department", "paymentMethods")
#: where a paginated answer may hold its page (the envelope is not documented)
_ENVELOPES = ("items", "data", "clients")


class RequestFinanceConfig(ProviderConfig):
    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_REQUEST_FINANCE_", extra="ignore", frozen=True)

    api_key: SecretStr | None = Field(None, description="API key, sent raw in Authorization.")
    oauth_token: SecretStr | None = Field(None, description="OAuth2 access token (wins over api_key).")
    network: Literal["live", "test"] = Field("live", description="X-Network header sent with OAuth.")

    def is_configured(self) -> bool:
        return self.api_key is not None or self.oauth_token is not None

    def missing(self) -> str:
        return "set CLIENTSYNC_REQUEST_FINANCE_OAUTH_TOKEN (or the legacy CLIENTSYNC_REQUEST_FINANCE_API_KEY)"


def _email_of(client: Client) -> str | None:
    contact = client.primary_contact
    return client.email or (contact.email if contact else None)


class RequestFinance(ProviderAdapter):
    name = "request_finance"
    title = "Request Finance"
    settings_class = RequestFinanceConfig
    default_url = "https://api.request.finance"

    config: RequestFinanceConfig

    identity = Identity(
        stamp=None,
        unique=(),
        similar=("email",),
        notes=(
            "docs.request.finance/clients: no create field holds an external id, and 'Retrieving clients' "
            "filters (search) by email or business name only; nothing is documented as unique. email is "
            "required on every client ('Creating a Client', email (*)) and createdDate is returned, so an "
            "unclear create is settled by email + whole payload + createdDate; otherwise an operator decides."
        ),
    )

    field_map: ClassVar[dict[str, str]] = {
        "id": "derived: kept in clientsync's link (no documented field holds an external id; "
        "CLIENTSYNC_REQUEST_FINANCE_ID_FIELD=department stamps it)",
        "kind": "derived: a company sends businessName, an individual none",
        "name": "sent as businessName (companies only)",
        "first_name": "sent as firstName (else the primary contact's)",
        "last_name": "sent as lastName (else the primary contact's)",
        "email": "sent as email (else the primary contact's; required)",
        "phone": "sent as phone",
        "website": "not supported (no website field is documented)",
        "vat_number": "sent as taxRegistration",
        "tax_id": "derived: sent as taxRegistration when there is no vat_number",
        "billing_address": "sent as address.streetAddress/extendedAddress/city/postalCode/region/country",
        "shipping_address": "not supported (one address per client)",
        "currency": "not supported (no currency field on a client)",
        "locale": "not supported (no language field on a client)",
        "notes": "not supported (no notes field on a client)",
        "tags": "not supported (tags exist on invoices, not clients)",
        "status": "not supported (no status or archive on a client)",
        "contacts": "derived: the primary contact's names and email fill the client's when it has none; "
        "other contacts are not supported",
    }

    def auth_headers(self) -> dict[str, str]:
        if self.config.oauth_token is not None:
            token = self.config.oauth_token.get_secret_value()
            return {"Authorization": f"Bearer {token}", "X-Network": self.config.network}
        assert self.config.api_key is not None, "adapter built without credentials"
        return {"Authorization": self.config.api_key.get_secret_value()}

    # --- mapping -----------------------------------------------------------------------
    def validate(self, client: Client) -> None:
        if not _email_of(client):
            raise LocalValidationError(
                "Request Finance requires an email on every client: set client.email "
                "(or the primary contact's email)",
                provider=self.name,
                field_errors={"client.email": ["required by Request Finance"]},
            )

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        contact = client.primary_contact
        # The contact's names stand in only for a client without any (never one name each).
        names = (client.first_name, client.last_name)
        if not any(names) and contact is not None:
            names = (contact.first_name, contact.last_name)
        body: dict[str, Any] = {
            "email": _email_of(client),
            "contactType": ["customer"],
            "firstName": names[0],
            "lastName": names[1],
            "businessName": client.name if client.kind == "company" else None,
            "phone": client.phone,
            "taxRegistration": client.vat_number or client.tax_id,
        }
        addr = client.billing_address
        if addr is not None:
            body["address"] = {
                "streetAddress": addr.line1,
                "extendedAddress": addr.line2,
                "city": addr.city,
                "postalCode": addr.postal_code,
                "region": addr.region,
                "country": addr.country,
            }
        if existing is not None:
            body.update({k: existing.data[k] for k in _UNOWNED if existing.data.get(k) is not None})
        if self.stamp_field:
            body[self.stamp_field] = self.stamp_value(client.id)
        return _compact(body)

    def from_wire(self, data: dict[str, Any]) -> Client:
        raw = data.get("address") if isinstance(data.get("address"), dict) else {}
        assert isinstance(raw, dict)
        country = wire_text(raw.get("country"))
        address = None
        if country:
            address = Address(
                line1=wire_text(raw.get("streetAddress")),
                line2=wire_text(raw.get("extendedAddress")),
                city=wire_text(raw.get("city")),
                postal_code=wire_text(raw.get("postalCode")),
                region=wire_text(raw.get("region")),
                country=country,
            )
        business = wire_text(data.get("businessName"))
        return Client(
            id=str(data["id"]),
            kind="company" if business else "individual",
            name=business,
            first_name=wire_text(data.get("firstName")),
            last_name=wire_text(data.get("lastName")),
            email=wire_text(data.get("email")),
            phone=wire_text(data.get("phone")),
            vat_number=wire_text(data.get("taxRegistration")),
            billing_address=address,
        )

    # --- the Clients API -----------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        return self._remote(await self.request("POST", "/clients", json_body=self.to_wire(client)))

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        existing = await self.get(remote_id)
        body = self.to_wire(client, existing=existing)
        return self._remote(await self.request("PUT", _path(remote_id), json_body=body))

    async def delete(self, remote_id: str) -> None:
        raise Unsupported(
            "Request Finance has no API to delete a client; remove it in the Request Finance app"
        )

    async def get(self, remote_id: str) -> RemoteClient:
        return self._remote(await self.request("GET", _path(remote_id)))

    async def search(self, key: str, value: str) -> list[RemoteClient]:
        """Records whose `key` equals `value` exactly (re-checked here; RF's `search` is fuzzy)."""
        want = value.strip().casefold()
        if key == "email":
            pages = self._pages({"search": value.strip()}, _MAX_TAKE)
            return [r async for r in pages if str(r.data.get("email") or "").strip().casefold() == want]
        if key == "stamp":
            field_name = self.stamp_field
            if field_name is None:
                return []
            # No filter reaches that field: every page is read.
            pages = self._pages({}, _MAX_TAKE)
            return [r async for r in pages if self.stamped(r) == value.strip()]
        raise ValueError(f"{self.name} cannot search by {key!r}")

    def created_at(self, remote: RemoteClient) -> float | None:
        """`createdDate` (ISO 8601), returned by create ("Creating a Client", 201)."""
        value = remote.data.get("createdDate")
        if not isinstance(value, str):
            return None
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        async for remote in self._pages({}, page_size):
            yield remote

    # --- helpers -------------------------------------------------------------------------
    async def _pages(self, extra: dict[str, str], page_size: int) -> AsyncIterator[RemoteClient]:
        take, skip = max(1, min(page_size, _MAX_TAKE)), 0
        seen: set[str] = set()
        while True:
            params: dict[str, str | int] = {"type": "customer", "format": "paginated"}
            params.update(take=take, skip=skip, **extra)
            body = await self.request("GET", "/clients", params=params)
            items, total = self._page(body)
            page = [self._remote(item) for item in items]
            if seen & {r.id for r in page}:
                raise PermanentError(
                    f"GET /clients with skip={skip} repeated clients of an earlier page: the server ignores "
                    "skip, so the list cannot be read page by page",
                    provider=self.name,
                )
            seen.update(r.id for r in page)
            for remote in page:
                yield remote
            skip += len(page)
            if total is not None and not page and skip < total:
                raise PermanentError(
                    f"GET /clients answered an empty page at skip={skip} although total is {total}",
                    provider=self.name,
                )
            if isinstance(body, list) or not page or (total is not None and skip >= total) or (
                total is None and len(page) < take
            ):
                return

    def _page(self, body: Any) -> tuple[Sequence[Any], int | None]:
        """(the page's records, the total if given) from a list answer, or a PermanentError."""
        if isinstance(body, list):  # the documented unpaginated form: everything at once
            return body, None
        if isinstance(body, dict):
            holders = [k for k in _ENVELOPES if isinstance(body.get(k), list)]
            total = body.get("total")
            if len(holders) == 1 and (total is None or (isinstance(total, int) and not isinstance(total, bool))):
                return body[holders[0]], total
        raise PermanentError(
            f"GET /clients answered {_shape(body)}; expected a JSON array, or an object with the page in "
            f"exactly one of {', '.join(_ENVELOPES)} and an optional integer total",
            provider=self.name,
        )

    def _remote(self, body: Any) -> RemoteClient:
        if not isinstance(body, dict) or not body.get("id"):
            raise PermanentError(f"answer without a client id: {body!r:.200}", provider=self.name)
        return RemoteClient(id=str(body["id"]), data=body)


def _path(remote_id: str) -> str:
    return f"/clients/{quote(remote_id, safe='')}"


def _shape(body: Any) -> str:
    """A short description of an unexpected answer (its keys and their types, never values)."""
    if isinstance(body, dict):
        parts = [f"{k} ({type(v).__name__})" for k, v in sorted(body.items(), key=lambda kv: str(kv[0]))]
        return "an object with keys " + (", ".join(parts) or "(none)")
    if isinstance(body, list):
        return f"an array of {len(body)}"
    return "nothing" if body is None else f"a {type(body).__name__}"


def _compact(body: dict[str, Any]) -> dict[str, Any]:
    """Drop unset fields (nested too): RF's handling of explicit nulls is undocumented."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if isinstance(value, dict):
            value = _compact(value)
        if value not in (None, {}):
            out[key] = value
    return out
