"""LSP.expert simulator: `/v2/clients` and the contacts sub-resource, as docs.lsp.expert shows them.

Faithful to what is documented: Basic auth with the key as user and an empty password,
24-hex ObjectId ids, `name` the only required field, partial `PUT`, the client's read
shape (`address{...}`, `invoice.currency{code,symbol}`, embedded `contacts`), errors as
`{message, name, code, id}`, pages of 20 as `{items, pageSize, page, totalPages,
totalItems, hasNextPage, hasPreviousPage}`. Bodies may be JSON or form-encoded (the docs'
examples use `curl -d`).

Choices where the docs are silent: a 422 adds Mongoose-style `errors: {field: {message,
kind, path}}`; `DELETE` is a hard delete answering the deleted record; "" or `null` in a
`PUT` clears a field; unknown fields are ignored; `PUT /v2/clients/{id}/contacts/{contactId}`
updates a contact (path inferred). Lists honour a `pageSize` query parameter (1-100; the
real API documents none) unless `honour_page_size` is turned off, as it may be there.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import time
import uuid
from typing import Any

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
_CONTACT_FIELDS = ("fullName", "email", "nickname", "title", "phone", "mobile", "notes")


def _error(status: int, message: str, name: str, code: str, **extra: Any) -> web.Response:
    body = {"message": message, "name": name, "code": code, "id": uuid.uuid4().hex, **extra}
    return web.json_response(body, status=status)


def _not_found() -> web.Response:
    return _error(404, "Item not found", "NotFound", "resource_missing")


def _required(field: str) -> web.Response:
    text = f"Path `{field}` is required."
    return _error(
        422, f"Validation failed: {field}: {text}", "ValidationError", "validation_failed",
        errors={field: {"message": text, "kind": "required", "path": field}},
    )  # fmt: skip


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
    #: False = ignore `pageSize` and always answer 20 a page (the documented behaviour)
    honour_page_size = True

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
        record["updatedAt"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())

    def _invalid(self, body: dict[str, Any], *, creating: bool) -> web.Response | None:
        if (creating or "name" in body) and not str(body.get("name") or "").strip():
            return _required("name")
        country = body.get("addressCountry")
        if country and (not isinstance(country, str) or len(country) != 2 or not country.isalpha()):
            text = "must be a two-letter country code"
            return _error(
                422, f"Validation failed: addressCountry: {text}", "ValidationError", "validation_failed",
                errors={"addressCountry": {"message": text, "kind": "format", "path": "addressCountry"}},
            )  # fmt: skip
        return None

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
        return web.json_response(_page(items, page, size if self.honour_page_size else PAGE_SIZE))

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body is None:
            return _error(400, "Body must be a JSON object", "BadRequest", "parameter_invalid")
        if invalid := self._invalid(body, creating=True):
            return invalid
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
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
        if record is None:
            return _not_found()
        return web.json_response(_page(record["contacts"], int(request.query.get("page", "1") or 1)))

    async def _create_contact(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found()
        body = await self._body(request)
        if body is None:
            return _error(400, "Body must be a JSON object", "BadRequest", "parameter_invalid")
        if not str(body.get("fullName") or "").strip():
            return _required("fullName")
        contact = {k: body.get(k) for k in _CONTACT_FIELDS}
        contact["emails"] = {"invoice": True, "quote": True, "ccInvoice": False, "ccQuote": False}
        contact["id"] = self.object_id()
        record["contacts"].append(contact)
        return web.json_response(contact, status=201)

    async def _update_contact(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        contact = next(
            (c for c in (record or {}).get("contacts", []) if c["id"] == request.match_info["contact_id"]),
            None,
        )
        if record is None or contact is None:
            return _not_found()
        body = await self._body(request)
        if body is None:
            return _error(400, "Body must be a JSON object", "BadRequest", "parameter_invalid")
        if "fullName" in body and not str(body["fullName"] or "").strip():
            return _required("fullName")
        contact.update({k: body[k] for k in _CONTACT_FIELDS if k in body})
        return web.json_response(contact)
