"""Qonto Business API simulator: `/v2/clients` with Qonto's rules and JSON:API errors.

Faithful to what is documented: Bearer auth plus, when the simulator is configured with
one (the default), `X-Qonto-Staging-Token` matched with its exact capitalisation as
Qonto's sandbox does; UUID ids; `kind` (alias `type`, `kind` wins) deciding the required
names; the Italian rules (2-letter province code, 5-character zip); the length limits;
`PATCH` partial; `DELETE` 204 then 404; `filter[name|email|vat_number|tax_identification_number]`;
`page`/`per_page` (max 100) with `meta{current_page, next_page, prev_page, total_pages,
total_count, per_page}`; errors `{"errors": [{"code", "detail", "source"}], "trace_id"}`.

Choices where the docs are silent or where stricter is more useful:
- The deprecated root-level address fields are **rejected** (422, pointer `/address`
  etc.), so an adapter that regresses to them fails loudly here (Qonto still accepts them).
- A missing or wrongly cased staging token is a 401 here; Qonto's sandbox may answer
  a 302 to a login page instead, which an API client cannot use anyway.
- `POST` answers 201; `PATCH` replaces a sent address object as a whole; email, VAT and
  tax-id filters are exact (email case-insensitive), the name filter a substring match.
- 429s carry `Retry-After` when the fault knob sets one (Qonto documents no such header).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any

from aiohttp import web

from worker.sandbox.base import SandboxProvider

STAGING_HEADER = "X-Qonto-Staging-Token"
KINDS = frozenset({"individual", "company", "freelancer"})
LOCALES = frozenset({"fr", "en", "it", "de", "es"})
LIMITS = {"first_name": 60, "last_name": 60, "name": 250, "vat_number": 20, "tax_identification_number": 20}
ADDRESS_LIMITS = {"street_address": 250, "city": 50, "zip_code": 20, "province_code": 2, "country_code": 2}
DEPRECATED = ("address", "city", "zip_code", "province_code", "country_code")
FIELDS = (
    "name", "first_name", "last_name", "email", "extra_emails", "phone", "currency", "locale",
    "vat_number", "tax_identification_number", "billing_address", "delivery_address",
    "recipient_code", "e_invoicing_address",
)  # fmt: skip
FILTERS = ("name", "email", "vat_number", "tax_identification_number")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
Problem = tuple[str, str, str]  # (code, detail, pointer)


def _errors(status: int, problems: list[Problem]) -> web.Response:
    errors = [
        {"code": code, "detail": detail, **({"source": {"pointer": pointer}} if pointer else {})}
        for code, detail, pointer in problems
    ]
    return web.json_response({"errors": errors, "trace_id": uuid.uuid4().hex}, status=status)


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
    if record.get("locale") and record["locale"] not in LOCALES:
        problems.append(("inclusion", "locale must be one of fr, en, it, de, es", "/locale"))
    if record.get("currency") and not re.fullmatch(r"[A-Z]{3}", str(record["currency"])):
        problems.append(("invalid", "currency must be an ISO 4217 code", "/currency"))
    for which in ("billing_address", "delivery_address"):
        address = record.get(which)
        if address is None:
            continue
        if not isinstance(address, dict):
            problems.append(("invalid", f"{which} must be an object", f"/{which}"))
            continue
        for key, limit in ADDRESS_LIMITS.items():
            if len(str(address.get(key) or "")) > limit:
                problems.append(("too_long", f"{key} is too long (maximum is {limit})", f"/{which}/{key}"))
        if address.get("country_code") == "IT":
            if not re.fullmatch(r"[A-Za-z]{2}", str(address.get("province_code") or "")):
                detail = "province_code is required for Italian clients (2 letters)"
                problems.append(("invalid", detail, f"/{which}/province_code"))
            if len(str(address.get("zip_code") or "")) != 5:
                detail = "zip_code must be 5 characters for Italian clients"
                problems.append(("invalid", detail, f"/{which}/zip_code"))
    return problems


class QontoSandbox(SandboxProvider):
    name = "qonto"

    @classmethod
    def default_credentials(cls) -> dict[str, str]:
        return {"token": "qonto-sandbox-token", "staging_token": "qonto-sandbox-staging-token"}

    def env(self, base_url: str) -> dict[str, str]:
        out = {"CLIENTSYNC_QONTO_URL": base_url, "CLIENTSYNC_QONTO_TOKEN": self.credentials["token"]}
        if "staging_token" in self.credentials:
            out["CLIENTSYNC_QONTO_STAGING_TOKEN"] = self.credentials["staging_token"]
        return out

    def is_authorised(self, request: web.Request) -> bool:
        if request.headers.get("Authorization") != f"Bearer {self.credentials['token']}":
            return False
        expected = self.credentials.get("staging_token")
        if expected is None:
            return True
        # raw_headers keeps the sender's capitalisation; Qonto's sandbox only honours this one
        sent = [v.decode() for k, v in request.raw_headers if k.decode() == STAGING_HEADER]
        return sent == [expected]

    def unauthorised(self) -> web.Response:
        detail = "Invalid or missing credentials (Bearer token, and X-Qonto-Staging-Token in the sandbox)"
        return _errors(401, [("unauthorized", detail, "")])

    def rate_limited(self, retry_after: float | None) -> web.Response:
        response = _errors(429, [("too_many_requests", "Rate limit exceeded", "")])
        if retry_after is not None:
            response.headers["Retry-After"] = f"{retry_after:g}"
        return response

    def server_error(self, status: int) -> web.Response:
        return _errors(status, [("internal_server_error", "Service unavailable (sandbox fault)", "")])

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v2/clients", self._list)
        app.router.add_post("/v2/clients", self._create)
        app.router.add_get("/v2/clients/{id}", self._get)
        app.router.add_patch("/v2/clients/{id}", self._update)
        app.router.add_delete("/v2/clients/{id}", self._delete)

    # --- helpers -------------------------------------------------------------------------
    def uuid(self) -> str:
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _errors(400, [("bad_request", "body must be a JSON object", "")])
        if deprecated := [k for k in DEPRECATED if k in body]:
            return _errors(422, [("deprecated", f"{k} is deprecated; use billing_address", f"/{k}")
                                 for k in deprecated])  # fmt: skip
        return body

    @staticmethod
    def _merge(record: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        merged = dict(record)
        kind = body.get("kind", body.get("type"))
        if kind is not None:
            merged["kind"] = merged["type"] = kind
        merged.update({k: body[k] for k in FIELDS if k in body})
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
            if key == "name":
                items = [c for c in items if wanted.casefold() in str(c.get("name") or "").casefold()]
            elif key == "email":
                items = [c for c in items if str(c.get("email") or "").casefold() == wanted.casefold()]
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
        body = await self._body(request)
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
        body = await self._body(request)
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
