"""Qonto Business API simulator: `/v2/clients`, its auth (API key and OAuth 2) and JSON:API errors.

Every rule below cites its source; `D/` is https://docs.qonto.com/api-reference/business-api.

Auth:
- API key `Authorization: {login}:{secret-key}`, plain (D/ "Authentication" > API key).
- OAuth: `POST /oauth2/token` (form-encoded `client_id`, `client_secret`, `grant_type`,
  `refresh_token`) issues a bearer access token living `access_token_ttl` seconds (docs: 1 hour)
  and a NEW refresh token; the used refresh token stays valid `refresh_grace` seconds after its
  first use, then is refused (D/ "OAuth" > "Refresh token endpoint"). Refusals are RFC 6749
  section 5.2 bodies `{"error", "error_description"}` (Qonto's OAuth server is Ory Hydra: 400
  `invalid_grant`, 401 `invalid_client`). The authorization-code grant needs a browser and is
  answered `unsupported_grant_type` here. An expired or unknown access token gets Qonto's 401.
- `X-Qonto-Staging-Token`, exact capitalisation, on every call including the token call
  (D/ "Sandbox"); a missing one is a 401 here (Qonto's sandbox may answer a 302 to a login page).
- A fixed pre-issued bearer (`credentials["token"]`) is accepted for demos.

Clients (D/clients/create-a-client, update-a-client, list-clients, delete-a-client):
- Closed bodies. Create: `kind` (alias `type`, `kind` wins), names, email, extra_emails, phone,
  e_invoicing_address, vat_number, tax_identification_number, billing/delivery addresses,
  recipient_code, currency, locale. Update (PATCH, partial): the same WITHOUT `kind`/`type`
  ("you can only update the fields in the request body"). Whether Qonto rejects or ignores
  other fields is not documented: `settings.unknown_fields` = "reject" (default: 422 naming the
  field) or "ignore" (dropped, nothing applied).
- `kind` individual/company/freelancer decides the required names; length limits (name 250,
  first/last 60, vat 20, tax id 20, street 250, city 50, zip 20); Italy: 5-character zip and a
  province code from the closed list (`IT_PROVINCES`); a VAT number
  starting with FR must be FR + 2 characters + 9 digits (D/ update-a-client, `vat_number`).
- Choice: the deprecated root-level address fields are refused (422), so an adapter that
  regresses to them fails loudly here (Qonto still accepts them).
- `POST` answers 201 [?]; `PATCH` replaces a sent address object as a whole [?]; `DELETE` 204,
  then 404. List: `filter[name|email|vat_number|tax_identification_number]`, `page`/`per_page`
  (max 100), `{clients, meta{current_page, next_page, prev_page, total_pages, total_count,
  per_page}}` (D/ "Pagination"). Email, VAT and tax-id filters are exact (email case-insensitive);
  the name filter's rule is undocumented: `settings.name_filter` = "substring" (default) or "exact".
- Errors: `{"errors": [{"code", "detail", "source": {"pointer"}}], "trace_id"}` (D/ "Errors").

Settings: `GET/POST /_sandbox/settings` (JSON body = `QontoSettings` fields to change).
"""

from __future__ import annotations

import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import pycountry
from aiohttp import web

from worker.sandbox.base import SandboxProvider

STAGING_HEADER = "X-Qonto-Staging-Token"
TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a path, not a secret
KINDS = frozenset({"individual", "company", "freelancer"})
LOCALES = frozenset({"fr", "en", "it", "de", "es"})
LIMITS = {"first_name": 60, "last_name": 60, "name": 250, "vat_number": 20, "tax_identification_number": 20}
ADDRESS_LIMITS = {"street_address": 250, "city": 50, "zip_code": 20, "province_code": 2, "country_code": 2}
ADDRESS_FIELDS = frozenset({"street_address", "city", "zip_code", "province_code", "country_code"})
DEPRECATED = ("address", "city", "zip_code", "province_code", "country_code")
UPDATE_FIELDS = frozenset({
    "name", "first_name", "last_name", "email", "extra_emails", "phone", "currency", "locale",
    "vat_number", "tax_identification_number", "billing_address", "delivery_address",
    "recipient_code", "e_invoicing_address", *DEPRECATED,
})  # fmt: skip
CREATE_FIELDS = UPDATE_FIELDS | {"kind", "type"}
FILTERS = ("name", "email", "vat_number", "tax_identification_number")
#: Italy's province codes: ISO 3166-2:IT second-level codes (pycountry) plus AO (Valle d'Aosta)
IT_PROVINCES = frozenset(
    {s.code[3:] for s in pycountry.subdivisions.get(country_code="IT")  # type: ignore[no-untyped-call]
     if re.fullmatch(r"IT-[A-Z]{2}", s.code)}
    | {"AO"}
)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_FR_VAT = re.compile(r"^FR[0-9A-Z]{2}[0-9]{9}$")
Problem = tuple[str, str, str]  # (code, detail, pointer)


@dataclass
class QontoSettings:
    """Readings of what the docs leave open, and token lifetimes (settable at run time)."""

    unknown_fields: Literal["reject", "ignore"] = "reject"
    name_filter: Literal["substring", "exact"] = "substring"
    access_token_ttl: float = 3600.0  # docs: 1 hour
    refresh_grace: float = 60.0  # docs: the used refresh token stays valid 60 s


def _errors(status: int, problems: list[Problem]) -> web.Response:
    errors = [
        {"code": code, "detail": detail, **({"source": {"pointer": pointer}} if pointer else {})}
        for code, detail, pointer in problems
    ]
    return web.json_response({"errors": errors, "trace_id": uuid.uuid4().hex}, status=status)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _not_found() -> web.Response:
    return _errors(404, [("not_found", "Client not found", "")])


def _check(record: dict[str, Any]) -> list[Problem]:
    """Every rule a stored client must satisfy."""
    problems: list[Problem] = []
    kind = record.get("kind")
    if kind not in KINDS:
        problems.append(("invalid", "kind must be one of individual, company, freelancer", "/kind"))
    required = ("name",) if kind == "company" else ("first_name", "last_name")
    for key in required:
        if not str(record.get(key) or "").strip():
            problems.append(("blank", f"{key} is required for kind {kind}", f"/{key}"))
    for key, limit in LIMITS.items():
        if len(str(record.get(key) or "")) > limit:
            problems.append(("too_long", f"{key} is too long (maximum is {limit} characters)", f"/{key}"))
    if record.get("email") and not _EMAIL.match(str(record["email"])):
        problems.append(("invalid", "email is invalid", "/email"))
    extra = record.get("extra_emails")
    if extra is not None and not (isinstance(extra, list) and all(_EMAIL.match(str(e)) for e in extra)):
        problems.append(("invalid", "extra_emails must be a list of email addresses", "/extra_emails"))
    vat = str(record.get("vat_number") or "")
    if vat.startswith("FR") and not _FR_VAT.match(vat):
        detail = "vat_number starting with FR must be FR + 2-character checksum + 9-digit SIREN"
        problems.append(("invalid", detail, "/vat_number"))
    phone = record.get("phone")
    if phone is not None and not (
        isinstance(phone, dict) and set(phone) <= {"country_code", "number"}
        and re.fullmatch(r"\+\d{1,3}", str(phone.get("country_code"))) and str(phone.get("number")).isdigit()
    ):  # fmt: skip
        problems.append(("invalid", "phone must be {country_code: '+33', number: '612345678'}", "/phone"))
    if record.get("locale") and record["locale"] not in LOCALES:
        problems.append(("inclusion", "locale must be one of fr, en, it, de, es", "/locale"))
    if record.get("currency") and not re.fullmatch(r"[A-Z]{3}", str(record["currency"])):
        problems.append(("invalid", "currency must be an ISO 4217 code", "/currency"))
    for which in ("billing_address", "delivery_address"):
        problems += _check_address(which, record.get(which))
    return problems


def _check_address(which: str, address: Any) -> list[Problem]:
    if address is None:
        return []
    if not isinstance(address, dict) or set(address) - ADDRESS_FIELDS:
        return [("invalid", f"{which} must be an object of {', '.join(sorted(ADDRESS_FIELDS))}", f"/{which}")]
    problems: list[Problem] = []
    for key, limit in ADDRESS_LIMITS.items():
        if len(str(address.get(key) or "")) > limit:
            problems.append(("too_long", f"{key} is too long (maximum is {limit})", f"/{which}/{key}"))
    if address.get("country_code") == "IT":
        if str(address.get("province_code") or "") not in IT_PROVINCES:
            detail = "province_code must be an Italian province code (e.g. MI) for Italian clients"
            problems.append(("not_in_list", detail, f"/{which}/province_code"))
        if len(str(address.get("zip_code") or "")) != 5:
            problems.append(("invalid", "zip_code must be 5 characters for Italian clients", f"/{which}/zip_code"))
    return problems


class QontoSandbox(SandboxProvider):
    name = "qonto"
    readings_class = QontoSettings

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._reset_tokens()

    def _reset_tokens(self) -> None:
        #: access token -> expiry (unix seconds)
        self.access_tokens: dict[str, float] = {}
        #: refresh token -> first use (unix seconds; None = unused)
        self.refresh_tokens: dict[str, float | None] = {self.credentials["refresh_token"]: None}
        self._why = ""
        #: the last OAuth access token a call was authorised with (tests check which one was used)
        self.last_access_token: str | None = None

    @classmethod
    def default_credentials(cls) -> dict[str, str]:
        return {
            "login": "acme-sas-4821", "secret_key": "qonto-sandbox-secret-key",
            "client_id": "qonto-sandbox-client", "client_secret": "qonto-sandbox-client-secret",
            "refresh_token": "ory_rt_sandbox-seed", "token": "qonto-sandbox-token",
            "staging_token": "qonto-sandbox-staging-token",
        }  # fmt: skip

    def env(self, base_url: str) -> dict[str, str]:
        """API key auth by default; `oauth_env` points the adapter at the OAuth flow instead."""
        out = {"CLIENTSYNC_QONTO_URL": base_url, "CLIENTSYNC_QONTO_LOGIN": self.credentials["login"],
               "CLIENTSYNC_QONTO_SECRET_KEY": self.credentials["secret_key"]}  # fmt: skip
        if "staging_token" in self.credentials:
            out["CLIENTSYNC_QONTO_STAGING_TOKEN"] = self.credentials["staging_token"]
        return out

    def oauth_env(self, base_url: str) -> dict[str, str]:
        out = {k: v for k, v in self.env(base_url).items() if "LOGIN" not in k and "SECRET_KEY" not in k}
        out.update({
            "CLIENTSYNC_QONTO_CLIENT_ID": self.credentials["client_id"],
            "CLIENTSYNC_QONTO_CLIENT_SECRET": self.credentials["client_secret"],
            "CLIENTSYNC_QONTO_REFRESH_TOKEN": self.credentials["refresh_token"],
            "CLIENTSYNC_QONTO_TOKEN_URL": f"{base_url}{TOKEN_PATH}",
        })  # fmt: skip
        return out

    # --- auth ----------------------------------------------------------------------------
    def is_authorised(self, request: web.Request) -> bool:
        expected = self.credentials.get("staging_token")
        # raw_headers keeps the sender's capitalisation; Qonto's sandbox only honours this one
        sent = [v.decode() for k, v in request.raw_headers if k.decode() == STAGING_HEADER]
        if expected is not None and sent != [expected]:
            self._why = "Missing or invalid X-Qonto-Staging-Token header (exact capitalisation)"
            return False
        if request.path.endswith(TOKEN_PATH):
            return True  # the token endpoint checks the client credentials itself
        header = request.headers.get("Authorization", "")
        c = self.credentials
        if header == f"{c['login']}:{c['secret_key']}" or header == f"Bearer {c['token']}":
            return True
        if header.startswith("Bearer ") and header[7:] in self.access_tokens:
            if self.access_tokens[header[7:]] > time.time():
                self.last_access_token = header[7:]
                return True
            self._why = "The access token expired"
            return False
        self._why = "Invalid or missing credentials (Bearer token or login:secret-key)"
        return False

    def unauthorised(self) -> web.Response:
        return _errors(401, [("unauthorized", self._why or "Unauthorized", "")])

    def rate_limited(self, retry_after: float | None) -> web.Response:
        response = _errors(429, [("too_many_requests", "Rate limit exceeded", "")])
        if retry_after is not None:
            response.headers["Retry-After"] = f"{retry_after:g}"
        return response

    def server_error(self, status: int) -> web.Response:
        return _errors(status, [("internal_server_error", "Service unavailable (sandbox fault)", "")])

    def _unclear_ending(self, request: web.Request) -> str | None:
        # The token endpoint gets a write fault only when one targets it by name ("oauth2").
        if request.path.endswith(TOKEN_PATH) and "oauth2" not in self.faults.write_match:
            return None
        return super()._unclear_ending(request)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(TOKEN_PATH, self._token)
        app.router.add_get("/v2/clients", self._list)
        app.router.add_post("/v2/clients", self._create)
        app.router.add_get("/v2/clients/{id}", self._get)
        app.router.add_patch("/v2/clients/{id}", self._update)
        app.router.add_delete("/v2/clients/{id}", self._delete)

    # --- control -------------------------------------------------------------------------
    async def _control_reset(self, request: web.Request) -> web.Response:
        self._reset_tokens()
        return await super()._control_reset(request)

    # --- OAuth ---------------------------------------------------------------------------
    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            return _oauth_error(400, "invalid_request", "Content type must be application/x-www-form-urlencoded")
        form = await request.post()
        c = self.credentials
        if form.get("client_id") != c["client_id"] or form.get("client_secret") != c["client_secret"]:
            return _oauth_error(401, "invalid_client", "Client authentication failed")
        if form.get("grant_type") != "refresh_token":
            return _oauth_error(400, "unsupported_grant_type", "The sandbox issues tokens by refresh_token only")
        used = str(form.get("refresh_token") or "")
        now = time.time()
        if used not in self.refresh_tokens:
            return _oauth_error(400, "invalid_grant", "The refresh token is malformed, revoked or was never issued")
        first_use = self.refresh_tokens[used]
        if first_use is not None and now > first_use + self.readings.refresh_grace:
            return _oauth_error(400, "invalid_grant", "The refresh token was already used and its grace period ended")
        if first_use is None:
            self.refresh_tokens[used] = now
        access, refresh = f"ory_at_{secrets.token_urlsafe(16)}", f"ory_rt_{secrets.token_urlsafe(16)}"
        self.access_tokens[access] = now + self.readings.access_token_ttl
        self.refresh_tokens[refresh] = None
        return web.json_response({
            "access_token": access, "expires_in": math.ceil(self.readings.access_token_ttl),
            "refresh_token": refresh, "scope": "offline_access client.read client.write", "token_type": "bearer",
        })  # fmt: skip

    # --- helpers -------------------------------------------------------------------------
    def uuid(self) -> str:
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    async def _body(self, request: web.Request, allowed: frozenset[str]) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _errors(400, [("bad_request", "body must be a JSON object", "")])
        if deprecated := [k for k in DEPRECATED if k in body]:
            return _errors(422, [("deprecated", f"{k} is deprecated; use billing_address", f"/{k}")
                                 for k in deprecated])  # fmt: skip
        if unknown := sorted(set(body) - allowed):
            if self.readings.unknown_fields == "reject":
                return _errors(422, [("unpermitted_parameter", f"{k} is not a permitted field here", f"/{k}")
                                     for k in unknown])  # fmt: skip
            body = {k: v for k, v in body.items() if k in allowed}
        return body

    @staticmethod
    def _merge(record: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        merged = dict(record)
        kind = body.get("kind", body.get("type"))
        if kind is not None:
            merged["kind"] = merged["type"] = kind
        merged.update({k: v for k, v in body.items() if k not in ("kind", "type")})
        if isinstance(merged.get("locale"), str):
            merged["locale"] = re.split(r"[-_]", merged["locale"])[0].lower()
        if merged.get("kind") != "company" and merged.get("first_name") and merged.get("last_name"):
            merged["name"] = f"{merged['first_name']} {merged['last_name']}"
        merged["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        return merged

    # --- handlers ------------------------------------------------------------------------
    async def _list(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            page = max(1, int(q.get("page", "1")))
            per_page = min(100, max(1, int(q.get("per_page", "100"))))
        except ValueError:
            return _errors(400, [("invalid", "page and per_page must be integers", "")])
        items = list(self.clients.values())
        for key in FILTERS:
            wanted = q.get(f"filter[{key}]")
            if wanted is None:
                continue
            if key == "name" and self.readings.name_filter == "substring":
                items = [c for c in items if wanted.casefold() in str(c.get("name") or "").casefold()]
            elif key in ("name", "email"):
                items = [c for c in items if str(c.get(key) or "").casefold() == wanted.casefold()]
            else:
                items = [c for c in items if c.get(key) == wanted]
        total_pages = max(1, math.ceil(len(items) / per_page))
        meta = {
            "current_page": page, "next_page": page + 1 if page < total_pages else None,
            "prev_page": page - 1 if page > 1 else None, "total_pages": total_pages,
            "total_count": len(items), "per_page": per_page,
        }  # fmt: skip
        return web.json_response({"clients": items[(page - 1) * per_page : page * per_page], "meta": meta})

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._body(request, CREATE_FIELDS)
        if isinstance(body, web.Response):
            return body
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        record = self._merge({"id": self.uuid(), "created_at": now, "kind": None}, body)
        if problems := _check(record):
            return _errors(422, problems)
        self.clients[record["id"]] = record
        return web.json_response({"client": record}, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        return web.json_response({"client": record}) if record else _not_found()

    async def _update(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found()
        body = await self._body(request, UPDATE_FIELDS)
        if isinstance(body, web.Response):
            return body
        merged = self._merge(record, body)
        if problems := _check(merged):
            return _errors(422, problems)
        self.clients[record["id"]] = merged
        return web.json_response({"client": merged})

    async def _delete(self, request: web.Request) -> web.Response:
        if self.clients.pop(request.match_info["id"], None) is None:
            return _not_found()
        return web.Response(status=204)
