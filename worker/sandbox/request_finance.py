"""A Request Finance Clients API simulator (https://docs.request.finance/clients).

Rules and where they come from (docs.request.finance/clients; the older copy in
RequestFinance/docs.request.finance:docs/clients.md):
- Auth: a raw API key or `Bearer` token + mandatory `X-Network` (docs/going-live.md).
- "Creating a Client": `POST /clients`, 201 with `id`, `createdById`, `createdDate`; `email`
  and `contactType` (the array `["customer"]`) required; the body is closed over the
  documented request body (`_FIELDS`, `_ADDRESS_FIELDS`); `address.country` is ISO 3166-1
  alpha-2.
- "Updating a Client": `PUT /clients/{id}`, "same as for the creation"; treated as a full
  replace (the docs do not say).
- "Retrieving clients": `GET /clients?type=customer` is "not paginated" (a bare array);
  `&format=paginated` enables `take` (default 25, max 100), `skip`, `search` (email or
  business name) and returns a total. `GET /clients/{id}`.
- No DELETE route (405, as for any unknown method).

Where the docs are silent, each reading is a switch in `Readings`, settable at run time with
`POST /request_finance/_sandbox/settings` (JSON body = fields to change; `GET` shows them):
- `envelope`: the shape of a `format=paginated` answer, never shown by the docs: "items"
  (default: `{"items": [...], "total": N}`), "data" (`{"data", "total"}`), "clients"
  (`{"clients", "total"}`), "bare" (the server ignores `format=paginated` and answers the
  whole array, as the older docs describe), "results" (`{"results", "count"}`, a shape the
  adapter must refuse loudly rather than read as empty).
- `unknown_fields`: "reject" (default) answers 400 naming an unknown body field; "ignore"
  drops it.
Also assumed: errors are `{"message", "errors": {field: [...]}}` with 400 for validation
and 404 for an unknown id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from worker.sandbox.base import SandboxProvider

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CREATOR = "sandbox-user-1"
#: "Creating a Client" request body (docs.request.finance/clients)
_FIELDS = frozenset({
    "email", "contactType", "jobTitle", "department", "paymentMethods", "address", "businessName",
    "firstName", "lastName", "phone", "taxRegistration",
})  # fmt: skip
_ADDRESS_FIELDS = frozenset({"streetAddress", "extendedAddress", "city", "postalCode", "region", "country"})


@dataclass
class Readings:
    """The simulator's choice where the docs leave a behaviour open (see the module docstring)."""

    envelope: Literal["items", "data", "clients", "bare", "results"] = "items"
    unknown_fields: Literal["reject", "ignore"] = "reject"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, message: str, errors: dict[str, list[str]] | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if errors:
        body["errors"] = errors
    return web.json_response(body, status=status)


def _haystack(record: dict[str, Any]) -> str:
    """What `search` looks in: the email and the business name."""
    return "\n".join(str(record.get(k) or "") for k in ("email", "businessName")).casefold()


class RequestFinanceSandbox(SandboxProvider):
    name = "request_finance"
    readings_class = Readings

    @property
    def legacy_list(self) -> bool:
        """The older API: `format=paginated` ignored, a bare array answered."""
        return bool(self.readings.envelope == "bare")

    @legacy_list.setter
    def legacy_list(self, value: bool) -> None:
        self.readings.envelope = "bare" if value else "items"

    @classmethod
    def default_credentials(cls) -> dict[str, str]:
        return {"api_key": "rf-sandbox-key", "oauth_token": "rf-sandbox-oauth-token"}

    def env(self, base_url: str) -> dict[str, str]:
        return {
            "CLIENTSYNC_REQUEST_FINANCE_URL": base_url,
            "CLIENTSYNC_REQUEST_FINANCE_API_KEY": self.credentials["api_key"],
        }

    def is_authorised(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth == self.credentials["api_key"]:
            return True
        network = request.headers.get("X-Network")
        return auth == f"Bearer {self.credentials['oauth_token']}" and network in ("live", "test")

    def unauthorised(self) -> web.Response:
        return _error(401, "Unauthorized")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/clients", self._create)
        app.router.add_get("/clients", self._list)
        app.router.add_get("/clients/{id}", self._get)
        app.router.add_put("/clients/{id}", self._replace)

    # --- handlers ------------------------------------------------------------------------
    async def _create(self, request: web.Request) -> web.Response:
        body, problem = await self._valid_body(request)
        if problem is not None:
            return problem
        record = {**body, "id": f"rf_{self.new_id()}", "createdById": _CREATOR, "createdDate": _now()}
        self.clients[record["id"]] = record
        return web.json_response(record, status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        current = self.clients.get(request.match_info["id"])
        if current is None:
            return _error(404, "Client not found")
        body, problem = await self._valid_body(request)
        if problem is not None:
            return problem
        keep = {k: current[k] for k in ("id", "createdById", "createdDate")}
        record = {**body, **keep, "updatedDate": _now()}
        self.clients[record["id"]] = record
        return web.json_response(record)

    async def _get(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _error(404, "Client not found")
        return web.json_response(record)

    async def _list(self, request: web.Request) -> web.Response:
        q = request.query
        records = [c for c in self.clients.values() if "customer" in c.get("contactType", [])]
        if q.get("format") != "paginated" or self.readings.envelope == "bare":
            return web.json_response(records)
        try:
            take, skip = int(q.get("take", "25")), int(q.get("skip", "0"))
        except ValueError:
            return _error(400, "Validation failed", {"take": ["must be an integer"]})
        if not 1 <= take <= 100 or skip < 0:
            return _error(400, "Validation failed", {"take": ["must be between 1 and 100"]})
        term = q.get("search", "").strip().casefold()
        if term:
            records = [c for c in records if term in _haystack(c)]
        page, total = records[skip : skip + take], len(records)
        holder = self.readings.envelope
        if holder == "results":
            return web.json_response({"results": page, "count": total})
        return web.json_response({holder: page, "total": total})

    # --- validation ----------------------------------------------------------------------
    async def _valid_body(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        try:
            body = await request.json()
        except ValueError:
            return {}, _error(400, "Body must be JSON")
        if not isinstance(body, dict):
            return {}, _error(400, "Body must be a JSON object")
        errors: dict[str, list[str]] = {}
        email = body.get("email")
        if not isinstance(email, str) or not email.strip():
            errors["email"] = ["email is required"]
        elif not _EMAIL.match(email):
            errors["email"] = ["email must be an email"]
        if body.get("contactType") != ["customer"]:
            errors["contactType"] = ['contactType must be the array ["customer"]']
        address = body.get("address")
        if address is not None:
            country = address.get("country") if isinstance(address, dict) else None
            if not isinstance(address, dict) or (
                country is not None and not (isinstance(country, str) and re.fullmatch(r"[A-Z]{2}", country))
            ):
                errors["address.country"] = ["country must be an ISO 3166-1 alpha-2 code"]
        for key in ("id", "createdById", "createdDate"):
            body.pop(key, None)
        unknown = sorted(set(body) - _FIELDS)
        if isinstance(address, dict):
            unknown += sorted(f"address.{k}" for k in set(address) - _ADDRESS_FIELDS)
        if unknown and self.readings.unknown_fields == "reject":
            errors.update({k: [f"{k} is not an allowed field"] for k in unknown})
        for key in unknown:
            if key.startswith("address.") and isinstance(address, dict):
                address.pop(key.removeprefix("address."))
            else:
                body.pop(key)
        if errors:
            return {}, _error(400, "Validation failed", errors)
        return body, None
