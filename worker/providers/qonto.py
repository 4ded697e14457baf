"""Qonto Business API clients (`/v2/clients`), docs: https://docs.qonto.com/api-reference/business-api/clients.

- Auth: OAuth2 Bearer (scopes `client.read`, `client.write`); Qonto's sandbox also needs
  `X-Qonto-Staging-Token` (exactly that capitalisation) on every call, production rejects it.
- Idempotency: `X-Qonto-Idempotency-Key` exists but is not documented for `POST /v2/clients`
  (and Qonto has no uniqueness rule for clients), so it is not sent; `find` (by
  `filter[email]`, then VAT number, then tax id, each re-checked exactly) runs first.
- Update: `PATCH`, partial, so a field cleared at the source is sent as `null` (email,
  phone, VAT number, tax id, delivery address, a company's contact names); currency,
  locale and billing address are never nulled (Qonto needs them to invoice).
- Delete: `DELETE` -> 204, permanent, cancels the client's recurring invoices; later GETs 404.
- Names: `kind` decides them: company -> `name` (the company name, else "first last");
  individual -> `first_name` + `last_name`. Addresses go in `billing_address` /
  `delivery_address` objects, never the deprecated root-level fields. `province_code` is
  sent for Italy only (from `Address.region`), where a 2-letter code and a 5-character
  zip are required. Every documented rule and length limit is checked in `validate()`
  before any call, so a bad client costs no request and no rate-limit budget.
- Locale: fr/en/it/de/es only (region dropped); any other locale is left out.
- Phone: `{country_code, number}`, sent only when written "+<code> <number>" (a space,
  dot or dash after the country code); without a numbering plan we cannot split
  "+33612345678" reliably, so such a phone is left out.
- Rate limit: 1,000 requests / 10 s per IP (the default bucket); no Retry-After documented.

Unconfirmed [?]: 200 vs 201 on create; `phone.country_code` as "+33" vs "33"; whether
PATCH replaces or merges `billing_address`; the email length limit (100 or 250).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError
from worker.models import Address, Client
from worker.providers.base import ProviderAdapter, ProviderConfig, RemoteClient

CLIENTS = "/v2/clients"
LOCALES = frozenset({"fr", "en", "it", "de", "es"})
CLEARABLE = ("email", "phone", "vat_number", "tax_identification_number", "delivery_address")
# canonical field -> max length (docs' field limits); address limits apply to each address
LIMITS = {"name": 250, "first_name": 60, "last_name": 60, "vat_number": 20, "tax_id": 20}
ADDRESS_LIMITS = {"street (line1, line2)": 250, "city": 50, "postal_code": 20}
_PHONE = re.compile(r"^\+(\d{1,3})[\s.\-]+([\d\s.\-]+)$")


class QontoConfig(ProviderConfig):
    """`CLIENTSYNC_QONTO_{URL,TOKEN,STAGING_TOKEN}`; the default bucket is Qonto's published limit."""

    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_QONTO_", extra="ignore", frozen=True)

    token: SecretStr | None = Field(None, description="OAuth access token (client.read, client.write).")
    staging_token: SecretStr | None = Field(None, description="Qonto sandbox only; production rejects it.")
    rate_limit: int | None = Field(1000, ge=1)
    rate_period: float = Field(10.0, gt=0)

    def is_configured(self) -> bool:
        return bool(self.token and self.token.get_secret_value())

    def missing(self) -> str:
        return "" if self.is_configured() else "set CLIENTSYNC_QONTO_TOKEN (an OAuth access token)"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class _Address(_Wire):
    street_address: str | None = None
    city: str | None = None
    zip_code: str | None = None
    province_code: str | None = None
    country_code: str | None = None


class _Phone(_Wire):
    country_code: str | None = None
    number: str | None = None


class _Client(_Wire):
    id: str
    kind: str | None = None
    type: str | None = None
    name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: _Phone | None = None
    currency: str | None = None
    locale: str | None = None
    vat_number: str | None = None
    tax_identification_number: str | None = None
    billing_address: _Address | None = None
    delivery_address: _Address | None = None


class Qonto(ProviderAdapter):
    name = "qonto"
    title = "Qonto"
    settings_class = QontoConfig
    default_url = "https://thirdparty.qonto.com"
    config: QontoConfig

    def auth_headers(self) -> dict[str, str]:
        token = self.config.token.get_secret_value() if self.config.token else ""
        headers = {"Authorization": f"Bearer {token}"}
        if self.config.staging_token is not None:
            headers["X-Qonto-Staging-Token"] = self.config.staging_token.get_secret_value()
        return headers

    def parse_error(self, status: int, body: Any) -> tuple[str, dict[str, list[str]]]:
        # JSON:API: {"errors": [{"code", "detail", "source": {"pointer"|"parameter"}}], "trace_id"}
        if not (isinstance(body, dict) and isinstance(body.get("errors"), list)):
            return super().parse_error(status, body)
        details: list[str] = []
        fields: dict[str, list[str]] = {}
        for item in (e for e in body["errors"] if isinstance(e, dict)):
            detail = str(item.get("detail") or item.get("code") or "error")
            details.append(detail)
            source = item["source"] if isinstance(item.get("source"), dict) else {}
            where = str(source.get("pointer") or source.get("parameter") or "").strip("/").replace("/", ".")
            if where:
                fields.setdefault(where, []).append(detail)
        return "; ".join(details), fields

    # --- mapping -------------------------------------------------------------------------
    def validate(self, client: Client) -> None:
        errors: dict[str, list[str]] = {}
        if client.kind == "company" and not client.display_name:
            errors["name"] = ["required for a company (client.name, or first_name/last_name)"]
        for part in ("first_name", "last_name") if client.kind == "individual" else ():
            if not getattr(client, part):
                errors[part] = ["required for an individual"]
        name = client.display_name if client.kind == "company" else None  # individuals send no name
        values = {**client.model_dump(include=set(LIMITS)), "name": name}
        for key, limit in LIMITS.items():
            if values[key] and len(values[key]) > limit:
                errors.setdefault(key, []).append(f"at most {limit} characters (has {len(values[key])})")
        for prefix, address in (("billing_address", client.billing_address),
                                ("shipping_address", client.shipping_address)):  # fmt: skip
            if address is not None:
                _check_address(prefix, address, errors)
        if errors:
            text = "; ".join(f"{k}: {', '.join(v)}" for k, v in errors.items())
            raise LocalValidationError(f"invalid for Qonto: {text}", provider=self.name, field_errors=errors)

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        return self._payload(client, clear=existing is not None)

    def _payload(self, client: Client, *, clear: bool) -> dict[str, Any]:
        locale = (client.locale or "")[:2]
        body: dict[str, Any] = {
            "kind": client.kind,
            "name": client.display_name if client.kind == "company" else None,
            "first_name": client.first_name, "last_name": client.last_name,
            "email": client.email, "currency": client.currency,
            "locale": locale if locale in LOCALES else None, "phone": _phone(client.phone),
            "vat_number": client.vat_number, "tax_identification_number": client.tax_id,
            "billing_address": _address(client.billing_address),
            "delivery_address": _address(client.shipping_address),
        }  # fmt: skip
        clearable = (*CLEARABLE, "first_name", "last_name") if client.kind == "company" else CLEARABLE
        return {k: v for k, v in body.items() if v is not None or (clear and k in clearable)}

    def from_wire(self, data: dict[str, Any]) -> Client:
        w = _Client.model_validate(data)
        kind = "company" if (w.kind or w.type) == "company" else "individual"
        phone = " ".join(p for p in (w.phone.country_code, w.phone.number) if p) if w.phone else ""
        return Client(
            id=w.id, kind=kind, name=w.name if kind == "company" else None,
            first_name=w.first_name or None, last_name=w.last_name or None, email=w.email or None,
            phone=phone or None, currency=w.currency or None, locale=w.locale or None,
            vat_number=w.vat_number or None, tax_id=w.tax_identification_number or None,
            billing_address=_from_address(w.billing_address),
            shipping_address=_from_address(w.delivery_address),
        )  # fmt: skip

    # --- operations ----------------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        return _remote(await self.request("POST", CLIENTS, json_body=self.to_wire(client)))

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        return _remote(
            await self.request("PATCH", f"{CLIENTS}/{remote_id}", json_body=self._payload(client, clear=True))
        )

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"{CLIENTS}/{remote_id}")

    async def get(self, remote_id: str) -> RemoteClient:
        return _remote(await self.request("GET", f"{CLIENTS}/{remote_id}"))

    async def find(self, client: Client) -> RemoteClient | None:
        keys = (("email", client.email), ("vat_number", client.vat_number),
                ("tax_identification_number", client.tax_id))  # fmt: skip
        for key, value in keys:
            if not value:
                continue
            data = await self.request("GET", CLIENTS, params={f"filter[{key}]": value, "per_page": 100})
            for item in data.get("clients", []):
                # re-check: the filter's matching rules (case, prefix) are not documented
                if str(item.get(key) or "").casefold() == value.casefold():
                    return RemoteClient(id=str(item["id"]), data=item)
        return None

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        page: int | None = 1
        while page is not None:
            data = await self.request("GET", CLIENTS, params={"page": page, "per_page": min(page_size, 100)})
            for item in data.get("clients", []):
                yield RemoteClient(id=str(item["id"]), data=item)
            page = (data.get("meta") or {}).get("next_page")


def _remote(data: dict[str, Any]) -> RemoteClient:
    record = data["client"]
    return RemoteClient(id=str(record["id"]), data=record)


def _street(address: Address) -> str | None:
    return ", ".join(p for p in (address.line1, address.line2) if p) or None


def _check_address(prefix: str, a: Address, errors: dict[str, list[str]]) -> None:
    values = {"street (line1, line2)": _street(a), "city": a.city, "postal_code": a.postal_code}
    for key, limit in ADDRESS_LIMITS.items():
        if (value := values[key]) and len(value) > limit:
            errors.setdefault(f"{prefix}.{key}", []).append(f"at most {limit} characters (has {len(value)})")
    if a.country != "IT":
        return
    if not (a.region and len(a.region) == 2 and a.region.isalpha()):
        errors.setdefault(f"{prefix}.region", []).append("Italy needs a 2-letter province code")
    if not (a.postal_code and len(a.postal_code) == 5):
        errors.setdefault(f"{prefix}.postal_code", []).append("an Italian zip code has exactly 5 characters")


def _address(a: Address | None) -> dict[str, str] | None:
    if a is None:
        return None
    out = {"street_address": _street(a), "city": a.city, "zip_code": a.postal_code, "country_code": a.country,
           "province_code": a.region.upper() if a.country == "IT" and a.region else None}  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def _from_address(a: _Address | None) -> Address | None:
    if a is None or not a.country_code:
        return None
    return Address(line1=a.street_address or None, city=a.city or None, region=a.province_code or None,
                   postal_code=a.zip_code or None, country=a.country_code)  # fmt: skip


def _phone(phone: str | None) -> dict[str, str] | None:
    match = _PHONE.match(phone or "")
    if match is None:
        return None
    return {"country_code": f"+{match[1]}", "number": re.sub(r"\D", "", match[2])}
