"""Qonto Business API clients (`/v2/clients`), docs: https://docs.qonto.com/api-reference/business-api/clients.

- Auth, as Qonto offers it (docs: "Authentication" > "API key" and "OAuth"; each clients page
  lists `OAuth` (scopes `client.read`/`client.write`) and `SecretKey`):
  API key, `Authorization: {login}:{secret-key}` (a plain concatenation, not Basic), from
  CLIENTSYNC_QONTO_LOGIN + CLIENTSYNC_QONTO_SECRET_KEY; or OAuth 2 with refresh tokens from
  CLIENTSYNC_QONTO_CLIENT_ID / _CLIENT_SECRET / _REFRESH_TOKEN (/ _TOKEN_URL), see
  `worker.providers.qonto_auth` (shared token in Redis, refreshed once before expiry, a refused
  refresh is an `AuthError` that pauses the provider); or a fixed OAuth access token
  (CLIENTSYNC_QONTO_TOKEN, it expires within the hour: demos only). Qonto's sandbox also needs
  `X-Qonto-Staging-Token` (exactly that capitalisation) on every call, the token call included.
- Identity: Qonto has no field clientsync can stamp and search (list filters: name, email,
  vat_number, tax_identification_number only) and "there is no uniqueness rule" for clients,
  so no key is exact: see `identity`. CLIENTSYNC_QONTO_ID_FIELD=tax_identification_number
  stamps the source id there instead (whatever the field held is overwritten on every write,
  so only for accounts that do not use it; ids must then fit its 20 characters).
- Update: `PATCH`, partial; its documented body ("you can only update the fields in the request
  body") has no `kind`/`type`, so `kind` is never sent on update. A kind change therefore cannot
  be made by update: the answer's kind is compared with the client's and a difference raises a
  permanent error naming `kind` (fix it in Qonto, or delete the client there and sync again),
  never a silent success. A 422 on update is diagnosed the same way (one GET, error path only).
  A field cleared at the source is sent as `null` (email, phone, VAT number, tax id, delivery
  address, a company's person names) or `[]` (extra_emails); currency, locale and billing
  address are never cleared (Qonto needs them to invoice).
- Delete: `DELETE` -> 204, permanent, cancels the client's recurring invoices; later GETs 404.
- Names: `kind` decides them: company -> `name`; individual -> `first_name` + `last_name`.
  Addresses go in `billing_address` / `delivery_address`, never the deprecated root fields.
- Checked before any call (so a bad client costs no request): the length limits; Italy's
  5-character zip and its province code from the closed list `IT_PROVINCES`; the French VAT
  format (docs, `vat_number`: "If the VAT number starts with 'FR', it must follow this format:
  FR + 2-character checksum + 9-digit SIREN", e.g. FR12345678901).
- Phone: `{country_code: "+33", number: "612345678"}`, split by the phonenumbers library from an
  international number ("+33 6 12 34 56 78" or "+33612345678"); one without a country code
  cannot be split and is reported in `unsupported_fields`.
- Contacts: Qonto has no contacts, only `extra_emails` (extra invoice recipients): the other
  contacts' emails go there; the primary contact's email is the client's email when it has none.
- Calls: create 1 (POST), update 1 (PATCH; +1 GET only to diagnose a 422), delete 1.
- Rate limit: 1,000 requests / 10 s per IP (the default bucket); no Retry-After documented.

Unconfirmed against a live account [?]: 200 vs 201 on create; whether unknown fields in a PATCH
are rejected or ignored (the adapter sends none; the sandbox has both readings); whether PATCH
replaces or merges `billing_address`; Qonto's own province list text (ours is ISO 3166-2:IT
plus Aosta, see `IT_PROVINCES`); whether the FR checksum itself is verified; the name filter's
matching rule (every search result is re-checked exactly here).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from typing import Any, ClassVar, Concatenate, Literal, ParamSpec, TypeVar

import aiohttp
import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from worker.errors import AuthError, LocalValidationError, PermanentError, ProviderValidationError
from worker.models import Address, Client, Contact
from worker.providers.base import Identity, ProviderAdapter, ProviderConfig, RemoteClient, wire_text
from worker.providers.qonto_auth import DEFAULT_TOKEN_URL, QontoOAuth, TokenStore

CLIENTS = "/v2/clients"
DOCS = "https://docs.qonto.com/api-reference/business-api/clients"
LOCALES = frozenset({"fr", "en", "it", "de", "es"})
CLEARABLE = ("email", "phone", "vat_number", "tax_identification_number", "delivery_address")
# canonical field -> max length (docs' field limits); address limits apply to each address
LIMITS = {"name": 250, "first_name": 60, "last_name": 60, "vat_number": 20, "tax_id": 20}
ADDRESS_LIMITS = {"street (line1, line2)": 250, "city": 50, "postal_code": 20}
#: canonical search key -> the list filter (docs: List clients, query `filter[...]`)
FILTERS = {"name": "name", "email": "email", "vat_number": "vat_number", "tax_id": "tax_identification_number"}
FR_VAT = re.compile(r"^FR[0-9A-Z]{2}[0-9]{9}$")
#: Italian province codes Qonto accepts in `province_code` (a closed list in the clients pages).
#: Source: the two-letter ISO 3166-2:IT codes of the provinces, metropolitan cities, free
#: municipal consortia, decentralised regional entities and autonomous provinces (as pycountry
#: ships them; a test keeps this list equal to it), plus AO (Valle d'Aosta, a region without a
#: province whose sigla Italian invoices use). Qonto's exact list text is unconfirmed [?].
IT_PROVINCES = frozenset({
    "AG", "AL", "AN", "AO", "AP", "AQ", "AR", "AT", "AV", "BA", "BG", "BI", "BL", "BN", "BO", "BR", "BS", "BT",
    "BZ", "CA", "CB", "CE", "CH", "CL", "CN", "CO", "CR", "CS", "CT", "CZ", "EN", "FC", "FE", "FG", "FI", "FM",
    "FR", "GE", "GO", "GR", "IM", "IS", "KR", "LC", "LE", "LI", "LO", "LT", "LU", "MB", "MC", "ME", "MI", "MN",
    "MO", "MS", "MT", "NA", "NO", "NU", "OR", "PA", "PC", "PD", "PE", "PG", "PI", "PN", "PO", "PR", "PT", "PU",
    "PV", "PZ", "RA", "RC", "RE", "RG", "RI", "RM", "RN", "RO", "SA", "SI", "SO", "SP", "SR", "SS", "SU", "SV",
    "TA", "TE", "TN", "TO", "TP", "TR", "TS", "TV", "UD", "VA", "VB", "VC", "VE", "VI", "VR", "VT", "VV",
})  # fmt: skip


class QontoConfig(ProviderConfig):
    """`CLIENTSYNC_QONTO_*`; the default bucket is Qonto's published limit."""

    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_QONTO_", extra="ignore", frozen=True)

    auth: Literal["auto", "api_key", "oauth", "token"] = Field(
        "auto", description="Which credentials to use; auto = OAuth refresh, else API key, else fixed token."
    )
    login: str | None = Field(None, description="API key auth: the organisation's login (slug).")
    secret_key: SecretStr | None = Field(None, description="API key auth: the secret key.")
    client_id: str | None = Field(None, description="OAuth: the application's client id.")
    client_secret: SecretStr | None = Field(None, description="OAuth: the application's client secret.")
    refresh_token: SecretStr | None = Field(None, description="OAuth: a refresh token (offline_access).")
    token_url: str = Field(DEFAULT_TOKEN_URL, description="OAuth token endpoint.")
    refresh_leeway: float = Field(300.0, ge=0, description="Refresh the access token this many seconds early.")
    token: SecretStr | None = Field(None, description="A fixed OAuth access token (expires within the hour).")
    staging_token: SecretStr | None = Field(None, description="Qonto sandbox only; production rejects it.")
    rate_limit: int | None = Field(1000, ge=1)
    rate_period: float = Field(10.0, gt=0)

    def mode(self) -> Literal["api_key", "oauth", "token"] | None:
        """The credentials in use, or None when the chosen ones are incomplete."""
        have = {
            "oauth": bool(self.client_id and _secret(self.client_secret) and _secret(self.refresh_token)),
            "api_key": bool(self.login and _secret(self.secret_key)),
            "token": bool(_secret(self.token)),
        }
        if self.auth != "auto":
            return self.auth if have[self.auth] else None
        for mode in ("oauth", "api_key", "token"):
            if have[mode]:
                return mode
        return None

    def is_configured(self) -> bool:
        return self.mode() is not None

    def missing(self) -> str:
        if self.is_configured():
            return ""
        return ("set CLIENTSYNC_QONTO_LOGIN + CLIENTSYNC_QONTO_SECRET_KEY (API key), or CLIENTSYNC_QONTO_CLIENT_ID "
                "+ CLIENTSYNC_QONTO_CLIENT_SECRET + CLIENTSYNC_QONTO_REFRESH_TOKEN (OAuth)")  # fmt: skip


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


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
    extra_emails: list[str] | None = None
    phone: _Phone | None = None
    currency: str | None = None
    locale: str | None = None
    vat_number: str | None = None
    tax_identification_number: str | None = None
    billing_address: _Address | None = None
    delivery_address: _Address | None = None


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _with_oauth(
    send: Callable[Concatenate[Qonto, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Qonto, _P], Coroutine[Any, Any, _T]]:
    """`send` (`ProviderAdapter.request`) under OAuth: each call takes the current access token,
    and a 401 one forced refresh and one repeat. The arguments pass through as they are, so the
    signature is stated once, in the base, and mypy still checks every call against it."""

    async def request(self: Qonto, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self.oauth is None:
            return await send(self, *args, **kwargs)
        self._access_token = await self.oauth.access_token()
        try:
            return await send(self, *args, **kwargs)
        except AuthError as exc:
            if exc.status != 401:
                raise
            # Revoked or expired early: one forced refresh, one repeat (a 401 applied nothing).
            self._access_token = await self.oauth.access_token(stale=self._access_token)
            return await send(self, *args, **kwargs)

    return request


class Qonto(ProviderAdapter):
    name = "qonto"
    title = "Qonto"
    settings_class = QontoConfig
    default_url = "https://thirdparty.qonto.com"
    config: QontoConfig
    identity = Identity(
        stamp=None,
        unique=(),
        similar=("email", "vat_number", "tax_id", "name"),
        notes=(
            f"No exact key. No field for a foreign id can be searched: GET /v2/clients filters only "
            f"name, email, vat_number and tax_identification_number ({DOCS}/list-clients, query "
            f"parameters); 'There is no uniqueness rule' ({DOCS}/create-a-client, warning). Records "
            "carry created_at. An unclear create is settled by whole-payload match, created after the "
            "intent, unlinked; otherwise an operator decides."
        ),
    )
    field_map: ClassVar[dict[str, str]] = {
        "id": "not supported (no searchable field for a foreign id; CLIENTSYNC_QONTO_ID_FIELD="
              "tax_identification_number stamps it there)",
        "kind": "sent as kind on create (company / individual); not updatable: a change is a permanent error",
        "name": "sent as name (companies)",
        "first_name": "sent as first_name",
        "last_name": "sent as last_name",
        "email": "sent as email (else the primary contact's email)",
        "phone": "sent as phone {country_code, number} (international numbers only)",
        "website": "not supported",
        "vat_number": "sent as vat_number",
        "tax_id": "sent as tax_identification_number",
        "billing_address": "sent as billing_address (never cleared: Qonto needs it to invoice)",
        "shipping_address": "sent as delivery_address",
        "currency": "sent as currency (never cleared)",
        "locale": "sent as locale (fr, en, it, de, es only; never cleared)",
        "notes": "not supported",
        "tags": "not supported",
        "status": "not supported",
        "contacts": "derived: the other contacts' emails are sent as extra_emails (names and phones not supported)",
    }  # fmt: skip

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        c = self.config
        staging = _secret(c.staging_token) or None
        self.oauth: QontoOAuth | None = None
        if c.mode() == "oauth":
            assert c.client_id is not None
            self.oauth = QontoOAuth(
                client_id=c.client_id, client_secret=_secret(c.client_secret),
                refresh_token=_secret(c.refresh_token), token_url=c.token_url, session=session,
                timeout=c.timeout, leeway=c.refresh_leeway, staging_token=staging, provider=self.name,
            )  # fmt: skip
        self._access_token = _secret(c.token)

    @property
    def token_store(self) -> TokenStore | None:
        """Where the OAuth token lives (None without OAuth); the worker runtime sets a
        `RedisTokenStore` so every worker shares one token and one refresh."""
        return self.oauth.store if self.oauth else None

    @token_store.setter
    def token_store(self, store: TokenStore) -> None:
        if self.oauth is not None:
            self.oauth.store = store

    # --- auth ----------------------------------------------------------------------------
    def auth_headers(self) -> dict[str, str]:
        c = self.config
        if c.mode() == "api_key":
            headers = {"Authorization": f"{c.login}:{_secret(c.secret_key)}"}  # not Basic: Qonto's docs
        else:
            headers = {"Authorization": f"Bearer {self._access_token}"}
        if c.staging_token is not None:
            headers["X-Qonto-Staging-Token"] = c.staging_token.get_secret_value()
        return headers

    request = _with_oauth(ProviderAdapter.request)

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
        vat = client.vat_number or ""
        if vat.upper().startswith("FR") and not FR_VAT.match(vat.upper()):
            errors.setdefault("vat_number", []).append(
                "a French VAT number is FR + a 2-character key + the 9-digit SIREN, e.g. FR12345678901"
            )
        if self.stamp_field == "tax_identification_number" and len(client.id) > LIMITS["tax_id"]:
            errors["id"] = [f"stamped into tax_identification_number: at most {LIMITS['tax_id']} characters"]
        for prefix, address in (("billing_address", client.billing_address),
                                ("shipping_address", client.shipping_address)):  # fmt: skip
            if address is not None:
                _check_address(prefix, address, errors)
        if errors:
            text = "; ".join(f"{k}: {', '.join(v)}" for k, v in errors.items())
            raise LocalValidationError(f"invalid for Qonto: {text}", provider=self.name, field_errors=errors)

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        return self._payload(client, update=existing is not None)

    def _payload(self, client: Client, *, update: bool) -> dict[str, Any]:
        locale = (client.locale or "")[:2]
        primary = client.primary_contact
        email = client.email or (primary.email if primary else None)
        body: dict[str, Any] = {
            "kind": None if update else client.kind,  # not in the documented PATCH body
            "name": client.display_name if client.kind == "company" else None,
            "first_name": client.first_name, "last_name": client.last_name,
            "email": email, "extra_emails": _extra_emails(client, email) or ([] if update else None),
            "currency": client.currency, "locale": locale if locale in LOCALES else None,
            "phone": _phone(client.phone),
            "vat_number": client.vat_number.upper() if client.vat_number else None,
            "tax_identification_number": client.tax_id,
            "billing_address": _address(client.billing_address),
            "delivery_address": _address(client.shipping_address),
        }  # fmt: skip
        if self.stamp_field is not None:
            body[self.stamp_field] = client.id
        clearable = (*CLEARABLE, "first_name", "last_name") if client.kind == "company" else CLEARABLE
        return {k: v for k, v in body.items() if v is not None or (update and k in clearable)}

    def from_wire(self, data: dict[str, Any]) -> Client:
        w = _Client.model_validate(data)
        kind = "company" if (w.kind or w.type) == "company" else "individual"
        phone = " ".join(p for p in (w.phone.country_code, w.phone.number) if p) if w.phone else ""
        tax_id = None if self.stamp_field == "tax_identification_number" else w.tax_identification_number
        return Client(
            id=w.id, kind=kind, name=w.name if kind == "company" else None,
            first_name=w.first_name or None, last_name=w.last_name or None, email=w.email or None,
            phone=phone or None, currency=w.currency or None, locale=w.locale or None,
            vat_number=w.vat_number or None, tax_id=tax_id or None,
            billing_address=_from_address(w.billing_address),
            shipping_address=_from_address(w.delivery_address),
            contacts=tuple(Contact(email=e) for e in (w.extra_emails or []) if e),
        )  # fmt: skip

    def unsupported_fields(self, client: Client) -> list[str]:
        """The canonical fields set on `client` that Qonto cannot take (recorded on the job)."""
        out = super().unsupported_fields(client)
        if client.phone and _phone(client.phone) is None:
            out.append("phone")
        if client.locale and client.locale[:2] not in LOCALES:
            out.append("locale")
        if any(c.first_name or c.last_name or c.phone for c in client.contacts):
            out.append("contacts")
        return out

    def created_at(self, remote: RemoteClient) -> float | None:
        text = wire_text(remote.data.get("created_at"))
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None
        except ValueError:
            return None

    # --- operations ----------------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        return _remote(await self.request("POST", CLIENTS, json_body=self.to_wire(client)))

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        body = self._payload(client, update=True)
        try:
            remote = _remote(await self.request("PATCH", f"{CLIENTS}/{remote_id}", json_body=body))
        except ProviderValidationError as exc:
            # Qonto validates names against the record's kind: tell a kind change apart
            current = await self.get(remote_id)
            if _kind(current.data) != client.kind:
                raise self._kind_change(current, client) from exc
            raise
        if _kind(remote.data) != client.kind:
            raise self._kind_change(remote, client)
        return remote

    def _kind_change(self, remote: RemoteClient, client: Client) -> PermanentError:
        held = remote.data.get("kind") or remote.data.get("type")
        rule = (f"Qonto holds this client as {held!r} and cannot change it by update (PATCH /v2/clients/{{id}} "
                f"has no kind): change it in Qonto, or delete the client there and sync again")  # fmt: skip
        return PermanentError(f"kind changed to {client.kind!r}: {rule}", provider=self.name,
                              field_errors={"kind": [rule]})  # fmt: skip

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"{CLIENTS}/{remote_id}")

    async def get(self, remote_id: str) -> RemoteClient:
        return _remote(await self.request("GET", f"{CLIENTS}/{remote_id}"))

    async def search(self, key: str, value: str) -> list[RemoteClient]:
        if key == "stamp":
            wire = self.stamp_field
            if wire not in FILTERS.values():
                raise PermanentError(
                    f"CLIENTSYNC_QONTO_ID_FIELD={wire!r} cannot be searched: Qonto filters only "
                    f"{', '.join(FILTERS.values())}", provider=self.name,
                )  # fmt: skip
            matches = self._matcher(str(wire), value)
        elif key in FILTERS:
            wire, matches = FILTERS[key], self._matcher(key, value)
        else:
            raise PermanentError(f"Qonto cannot search clients by {key!r}", provider=self.name)
        return [r async for r in self._pages({f"filter[{wire}]": value}) if matches(r)]

    def _matcher(self, key: str, value: str) -> Any:
        """The exact local re-check of a filter result (the filters' matching rules are undocumented)."""
        if key == "email":
            return lambda r: (wire_text(r.data.get("email")) or "").casefold() == value.strip().casefold()
        if key == "name":
            return lambda r: self.from_wire(r.data).display_name == value.strip()
        wire = FILTERS.get(key, key)
        return lambda r: (wire_text(r.data.get(wire)) or "").upper() == value.strip().upper()

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        async for remote in self._pages({}, page_size=page_size):
            yield remote

    async def _pages(self, params: dict[str, str], *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        """Every page of `GET /v2/clients` ({clients, meta{next_page}}, docs: Pagination)."""
        page: int | None = 1
        while page is not None:
            data = await self.request("GET", CLIENTS, params={**params, "page": page,
                                                              "per_page": min(page_size, 100)})  # fmt: skip
            items, meta = (data.get("clients"), data.get("meta")) if isinstance(data, dict) else (None, None)
            if not isinstance(items, list) or not isinstance(meta, dict):
                raise PermanentError(_shape("a list page", data, "{clients: [...], meta: {next_page}}"),
                                     provider=self.name)  # fmt: skip
            for item in items:
                yield _record(item)
            nxt = meta.get("next_page")
            page = int(nxt) if isinstance(nxt, int) and nxt > page else None


def _shape(what: str, data: Any, expected: str) -> str:
    got = sorted(data) if isinstance(data, dict) else type(data).__name__
    return f"Qonto answered {what} of an unknown shape (expected {expected}; got {got})"


def _record(item: Any) -> RemoteClient:
    if not isinstance(item, dict) or not item.get("id"):
        raise PermanentError(_shape("a client", item, "an object with an id"), provider="qonto")
    return RemoteClient(id=str(item["id"]), data=item)


def _remote(data: Any) -> RemoteClient:
    if not isinstance(data, dict) or "client" not in data:
        raise PermanentError(_shape("a client answer", data, "{client: {...}}"), provider="qonto")
    return _record(data["client"])


def _kind(data: dict[str, Any]) -> str:
    return "company" if (data.get("kind") or data.get("type")) == "company" else "individual"


def _street(address: Address) -> str | None:
    return ", ".join(p for p in (address.line1, address.line2) if p) or None


def _check_address(prefix: str, a: Address, errors: dict[str, list[str]]) -> None:
    values = {"street (line1, line2)": _street(a), "city": a.city, "postal_code": a.postal_code}
    for key, limit in ADDRESS_LIMITS.items():
        if (value := values[key]) and len(value) > limit:
            errors.setdefault(f"{prefix}.{key}", []).append(f"at most {limit} characters (has {len(value)})")
    if a.country != "IT":
        return
    if (a.region or "").upper() not in IT_PROVINCES:
        errors.setdefault(f"{prefix}.region", []).append(
            "Italy needs a 2-letter province code from Qonto's list (e.g. MI, RM, TO)"
        )
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


def _extra_emails(client: Client, email: str | None) -> list[str]:
    seen = {(email or "").casefold()}
    out = []
    for contact in client.contacts:
        if contact.email and contact.email.casefold() not in seen:
            seen.add(contact.email.casefold())
            out.append(contact.email)
    return out


def _phone(phone: str | None) -> dict[str, str] | None:
    if not phone or not phone.strip().startswith("+"):
        return None
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return None
    national = phonenumbers.national_significant_number(number)
    return {"country_code": f"+{number.country_code}", "number": national} if national else None
