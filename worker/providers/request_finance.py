"""Request Finance: the Clients API at https://api.request.finance (docs: https://docs.request.finance/clients).

- Auth: an API key sent raw in `Authorization` (deprecated for live apps), or an OAuth2
  access token sent as `Authorization: Bearer …` with the mandatory `X-Network: live|test`.
  The newest docs say the Clients API is OAuth-only and write access needs RF approval.
- Clients have no test environment: a test key writes production clients.
- Idempotency: none. `POST /clients` is not idempotent, so `find` (by email) guards creates.
- Delete: there is no documented delete; `delete` raises `Unsupported`.
- Update: `PUT /clients/{id}` takes the create body. Whether omitted fields are cleared is
  undocumented, so `update` reads the record first and carries over the fields clientsync
  does not own (`jobTitle`, `department`, `paymentMethods`).

Unconfirmed (PROVIDERS.md marks these [?]): the error format and status codes, rate
limits, the raw-key form of `Authorization`, and the envelope of `format=paginated` lists.
We assume `{"items": [...], "total": N}` (the sandbox answers that) and also accept
`clients`/`data` for the array, a bare array (the older unpaginated form), and no total.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError, PermanentError, Unsupported
from worker.models import Address, Client
from worker.providers.base import ProviderAdapter, ProviderConfig, RemoteClient, wire_text

_MAX_TAKE = 100
#: fields of the RF record that clientsync has no canonical value for; kept across a PUT
_UNOWNED = ("jobTitle", "department", "paymentMethods")


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
        first = client.first_name or (contact.first_name if contact else None)
        last = client.last_name or (contact.last_name if contact else None)
        body: dict[str, Any] = {
            "email": _email_of(client),
            "contactType": ["customer"],
            "firstName": first,
            "lastName": last,
            "businessName": client.name if client.kind == "company" else None,
            "phone": client.phone or (contact.phone if contact else None),
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

    async def find(self, client: Client) -> RemoteClient | None:
        email = _email_of(client)
        if not email:
            return None
        async for remote in self._pages({"search": email}, _MAX_TAKE):
            found = remote.data.get("email")
            if isinstance(found, str) and found.strip().casefold() == email.casefold():
                return remote
        return None

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        async for remote in self._pages({}, page_size):
            yield remote

    # --- helpers -------------------------------------------------------------------------
    async def _pages(self, extra: dict[str, str], page_size: int) -> AsyncIterator[RemoteClient]:
        take, skip = max(1, min(page_size, _MAX_TAKE)), 0
        while True:
            params: dict[str, str | int] = {"type": "customer", "format": "paginated"}
            params.update(take=take, skip=skip, **extra)
            body = await self.request("GET", "/clients", params=params)
            total: int | None = None
            if isinstance(body, list):  # the older unpaginated form: everything at once
                items = body
            elif isinstance(body, dict):
                items = body.get("items") or body.get("clients") or body.get("data") or []
                total = body.get("total") if isinstance(body.get("total"), int) else None
            else:
                raise PermanentError(f"unexpected list answer: {body!r:.200}", provider=self.name)
            for item in items:
                yield self._remote(item)
            skip += len(items)
            if isinstance(body, list) or len(items) < take or (total is not None and skip >= total):
                return

    def _remote(self, body: Any) -> RemoteClient:
        if not isinstance(body, dict) or not body.get("id"):
            raise PermanentError(f"answer without a client id: {body!r:.200}", provider=self.name)
        return RemoteClient(id=str(body["id"]), data=body)


def _path(remote_id: str) -> str:
    return f"/clients/{quote(remote_id, safe='')}"


def _compact(body: dict[str, Any]) -> dict[str, Any]:
    """Drop unset fields (nested too): RF's handling of explicit nulls is undocumented."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if isinstance(value, dict):
            value = _compact(value)
        if value not in (None, {}):
            out[key] = value
    return out
