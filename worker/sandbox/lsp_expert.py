"""LSP.expert simulator: `/v2/clients` and the contacts sub-resource, as docs.lsp.expert shows them.

Rules and where they come from (PROVIDERS.md 003 summarises the pages):
- Auth: Basic with the key as user and an empty password (docs.lsp.expert/clients, every
  `curl -u {key}:` example). Ids are 24-hex ObjectIds (every example id).
- Errors: `{message, name, code, id}` with conventional statuses; 404 is
  `{"message": "Item not found", "name": "NotFound", "code": "resource_missing"}`
  (docs.lsp.expert/errors).
- Create (`POST /v2/clients`, "Create a client"): `name` required; the body is closed over
  the documented create parameters (`_CREATE_FIELDS`); `archived`/`pinned` are update-only
  ("Update a client") and are refused on create.
- Update (`PUT /v2/clients/:id`, "Update a client"): partial, "any parameters not provided
  will be left unchanged"; create parameters plus `archived`, `pinned`.
- Read shape (docs.lsp.expert/clients, "The Client object"): `address{...}`,
  `invoice.currency{code,symbol}`, embedded `contacts`, `createdAt`/`updatedAt`.
- Contacts (docs.lsp.expert/clients/contacts): `GET /v2/clients/:id/contacts` answers a bare
  array; `POST` needs `fullName`; the body is closed over the documented contact parameters.
- Lists (docs.lsp.expert/pagination): `page`, `sort`, `direction`; pages of 20 as `{items,
  pageSize, page, totalPages, totalItems, hasNextPage, hasPreviousPage}`.

Where the docs are silent, each reading is a switch in `Readings`, settable at run time with
`POST /<prefix>/_sandbox/settings` (JSON body = fields to change; `GET` shows them):
- `contact_routes`: "inferred" (default) serves `PUT`/`DELETE /v2/clients/:id/contacts/:cid`;
  "documented" serves only the documented `GET`/`POST`, so those answer 404 like any
  unknown route.
- `unknown_fields`: "reject" (default) answers 422 naming an unknown body field; "ignore"
  drops it silently.
- `honour_page_size`: True (default) honours a `pageSize` query parameter (1-100), False
  always answers 20 a page (no such parameter is documented).
Other choices: a 422 adds Mongoose-style `errors: {field: {message, kind, path}}`;
`DELETE` is a hard delete answering the deleted record; "" or `null` in a `PUT` clears a
field; bodies may be JSON or form-encoded (the docs' examples use `curl -d`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from worker.sandbox.base import SandboxProvider

PAGE_SIZE = 20
_ADDRESS = {
    "addressName": "name",
    "addressLine1": "line1",
    "addressLine2": "line2",
    "addressCity": "city",
    "addressState": "state",
    "addressPostalCode": "postalCode",
    "addressCountry": "country",
}
_SCALARS = ("name", "vatNumber", "nationalIdentificationNumber", "details", "archived", "pinned")
#: "Create a client" parameters (docs.lsp.expert/clients; PROVIDERS.md 003 "Writable fields")
_CREATE_FIELDS = frozenset({
    "name", *_ADDRESS, "vatNumber", "nationalIdentificationNumber", "applyVATReverseCharge", "tax1", "tax2",
    "currency", "rappenRounding", "minimumFee", "showExchangeRateOnInvoice", "paymentTerms",
    "paymentTermsEndOfMonth", "validityDays", "document", "invoiceFilenameFormat", "quoteFilenameFormat",
    "creditNoteFilenameFormat", "catConfiguration", "overrideGroupMatches", "details",
})  # fmt: skip
#: "Update a client" adds these (update-only)
_UPDATE_ONLY = frozenset({"archived", "pinned"})
#: "Create a contact" parameters (docs.lsp.expert/clients/contacts)
_CONTACT_FIELDS = ("fullName", "email", "emails", "nickname", "title", "phone", "mobile", "notes")


@dataclass
class Readings:
    """The simulator's choice where the docs leave a behaviour open (see the module docstring)."""

    contact_routes: Literal["inferred", "documented"] = "inferred"
    unknown_fields: Literal["reject", "ignore"] = "reject"
    honour_page_size: bool = True


def _error(status: int, message: str, name: str, code: str, **extra: Any) -> web.Response:
    body = {"message": message, "name": name, "code": code, "id": uuid.uuid4().hex, **extra}
    return web.json_response(body, status=status)


def _not_found() -> web.Response:
    return _error(404, "Item not found", "NotFound", "resource_missing")


def _invalid_field(field: str, text: str, kind: str) -> web.Response:
    return _error(
        422, f"Validation failed: {field}: {text}", "ValidationError", "validation_failed",
        errors={field: {"message": text, "kind": kind, "path": field}},
    )  # fmt: skip


def _required(field: str) -> web.Response:
    return _invalid_field(field, f"Path `{field}` is required.", "required")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _page(items: list[dict[str, Any]], page: int, size: int = PAGE_SIZE) -> dict[str, Any]:
    total_pages = max(1, math.ceil(len(items) / size))
    start = (page - 1) * size
    return {
        "items": items[start : start + size], "pageSize": size, "page": page,
        "totalPages": total_pages, "totalItems": len(items),
        "hasNextPage": page < total_pages, "hasPreviousPage": page > 1,
    }  # fmt: skip


class LSPExpertSandbox(SandboxProvider):
    name = "lsp_expert"
    readings_class = Readings

    @property
    def honour_page_size(self) -> bool:
        return bool(self.readings.honour_page_size)

    @honour_page_size.setter
    def honour_page_size(self, value: bool) -> None:
        self.readings.honour_page_size = value

    @classmethod
    def default_credentials(cls) -> dict[str, str]:
        return {"api_key": "lsp-sandbox-key"}

    def env(self, base_url: str) -> dict[str, str]:
        return {
            "CLIENTSYNC_LSP_EXPERT_URL": base_url,
            "CLIENTSYNC_LSP_EXPERT_API_KEY": self.credentials["api_key"],
        }

    def is_authorised(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(decoded, f"{self.credentials['api_key']}:")

    def unauthorised(self) -> web.Response:
        response = _error(401, "Unauthorized", "Unauthorized", "unauthorized")
        response.headers["WWW-Authenticate"] = 'Basic realm="api"'
        return response

    def rate_limited(self, retry_after: float | None) -> web.Response:
        response = _error(429, "Too many requests", "TooManyRequests", "rate_limited")
        if retry_after is not None:
            response.headers["Retry-After"] = f"{retry_after:g}"
        return response

    def server_error(self, status: int) -> web.Response:
        return _error(status, "Service unavailable (sandbox fault)", "ServiceUnavailable", "unavailable")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v2/clients", self._list)
        app.router.add_post("/v2/clients", self._create)
        app.router.add_get("/v2/clients/{id}", self._get)
        app.router.add_put("/v2/clients/{id}", self._update)
        app.router.add_delete("/v2/clients/{id}", self._delete)
        app.router.add_get("/v2/clients/{id}/contacts", self._list_contacts)
        app.router.add_post("/v2/clients/{id}/contacts", self._create_contact)
        app.router.add_put("/v2/clients/{id}/contacts/{contact_id}", self._update_contact)
        app.router.add_delete("/v2/clients/{id}/contacts/{contact_id}", self._delete_contact)

    # --- helpers -------------------------------------------------------------------------
    def object_id(self) -> str:
        """A MongoDB-style ObjectId: 4-byte time, 5 random bytes, 3-byte counter."""
        counter = int(self.new_id())
        return f"{int(time.time()):08x}{self._random.getrandbits(40):010x}{counter:06x}"

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any] | None:
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                return None
            return body if isinstance(body, dict) else None
        form = await request.post()
        return {k: v for k, v in form.items() if isinstance(v, str)}

    def _closed(self, body: dict[str, Any], allowed: frozenset[str] | tuple[str, ...]) -> web.Response | None:
        """An unknown field: 422 naming it (reading "reject"), or dropped (reading "ignore")."""
        unknown = sorted(set(body) - set(allowed))
        if not unknown:
            return None
        if self.readings.unknown_fields == "ignore":
            for key in unknown:
                body.pop(key)
            return None
        return _invalid_field(unknown[0], f"`{unknown[0]}` is not an allowed parameter here", "unknown")

    @staticmethod
    def _write(record: dict[str, Any], body: dict[str, Any]) -> None:
        for key in _SCALARS:
            if key in body:
                value = body[key]
                if key in ("archived", "pinned") and isinstance(value, str):
                    value = value.lower() == "true"
                record[key] = value
        for key, target in _ADDRESS.items():
            if key in body:
                value = body[key]
                record["address"][target] = value.upper() if key == "addressCountry" and value else value
        invoice = record["invoice"]
        if "currency" in body:
            code = body["currency"]
            invoice["currency"] = {"code": code.upper(), "symbol": code.upper()} if code else None
        if "paymentTerms" in body:
            invoice["paymentTerms"] = body["paymentTerms"]
        record["updatedAt"] = _now()

    def _invalid(self, body: dict[str, Any], *, creating: bool) -> web.Response | None:
        if creating and (sent := sorted(_UPDATE_ONLY & set(body))):
            return _invalid_field(sent[0], f"`{sent[0]}` can only be set by an update", "update_only")
        if closed := self._closed(body, _CREATE_FIELDS if creating else _CREATE_FIELDS | _UPDATE_ONLY):
            return closed
        if (creating or "name" in body) and not str(body.get("name") or "").strip():
            return _required("name")
        country = body.get("addressCountry")
        if country and (not isinstance(country, str) or len(country) != 2 or not country.isalpha()):
            return _invalid_field("addressCountry", "must be a two-letter country code", "format")
        return None

    def _contact(self, request: web.Request) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        record = self.clients.get(request.match_info["id"])
        contact = next(
            (c for c in (record or {}).get("contacts", []) if c["id"] == request.match_info["contact_id"]), None
        )
        return record, contact

    # --- handlers ------------------------------------------------------------------------
    async def _list(self, request: web.Request) -> web.Response:
        try:
            page = max(1, int(request.query.get("page", "1")))
            size = min(100, max(1, int(request.query.get("pageSize", PAGE_SIZE))))
        except ValueError:
            return _error(400, "page must be a positive integer", "BadRequest", "parameter_invalid")
        items = list(self.clients.values())
        if request.query.get("sort") == "name":
            items.sort(key=lambda c: str(c.get("name", "")).lower())
        if request.query.get("direction") == "desc":
            items.reverse()
        return web.json_response(_page(items, page, size if self.readings.honour_page_size else PAGE_SIZE))

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body is None:
            return _error(400, "Body must be a JSON object", "BadRequest", "parameter_invalid")
        if invalid := self._invalid(body, creating=True):
            return invalid
        now = _now()
        record: dict[str, Any] = {
            "id": self.object_id(), "name": "", "address": {"name": body.get("name")}, "archived": False,
            "pinned": False, "contacts": [], "details": None, "invoice": {"currency": None},
            "nationalIdentificationNumber": None, "vatNumber": None, "createdAt": now, "updatedAt": now,
        }  # fmt: skip
        self._write(record, body)
        self.clients[record["id"]] = record
        return web.json_response(record, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        return web.json_response(record) if record else _not_found()

    async def _update(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found()
        body = await self._body(request)
        if body is None:
            return _error(400, "Body must be a JSON object", "BadRequest", "parameter_invalid")
        if invalid := self._invalid(body, creating=False):
            return invalid
        self._write(record, body)
        return web.json_response(record)

    async def _delete(self, request: web.Request) -> web.Response:
        record = self.clients.pop(request.match_info["id"], None)
        return web.json_response(record) if record else _not_found()

    async def _list_contacts(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        return web.json_response(record["contacts"]) if record else _not_found()

    async def _create_contact(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found()
        body = await self._body(request)
        if body is None:
            return _error(400, "Body must be a JSON object", "BadRequest", "parameter_invalid")
        if closed := self._closed(body, _CONTACT_FIELDS):
            return closed
        if not str(body.get("fullName") or "").strip():
            return _required("fullName")
        contact = {k: body.get(k) for k in _CONTACT_FIELDS if k != "emails"}
        contact["emails"] = {"invoice": True, "quote": True, "ccInvoice": False, "ccQuote": False}
        contact["id"] = self.object_id()
        record["contacts"].append(contact)
        return web.json_response(contact, status=201)

    async def _update_contact(self, request: web.Request) -> web.Response:
        if self.readings.contact_routes == "documented":
            raise web.HTTPNotFound()  # no such route: answered like any unknown path
        record, contact = self._contact(request)
        if record is None or contact is None:
            return _not_found()
        body = await self._body(request)
        if body is None:
            return _error(400, "Body must be a JSON object", "BadRequest", "parameter_invalid")
        if closed := self._closed(body, _CONTACT_FIELDS):
            return closed
        if "fullName" in body and not str(body["fullName"] or "").strip():
            return _required("fullName")
        contact.update({k: body[k] for k in _CONTACT_FIELDS if k in body})
        return web.json_response(contact)

    async def _delete_contact(self, request: web.Request) -> web.Response:
        if self.readings.contact_routes == "documented":
            raise web.HTTPNotFound()
        record, contact = self._contact(request)
        if record is None or contact is None:
            return _not_found()
        record["contacts"].remove(contact)
        return web.json_response(contact)
