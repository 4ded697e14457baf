"""A Request Finance Clients API simulator (https://docs.request.finance/clients).

Faithful to the docs: raw API key or `Bearer` token + mandatory `X-Network`, `POST` (201 with
`id`, `createdById`, `createdDate`), full-replace `PUT`, `GET` one, and the list in its older
unpaginated form (a bare array) and its `format=paginated` form (`take` ≤ 100, `skip`,
`search` on email or business name). There is no DELETE route (405, as for any unknown method).

Assumed where the docs are silent: errors are `{"message", "errors": {field: [...]}}` with
400 for validation and 404 for an unknown id, and the paginated envelope is
`{"items": [...], "total": N}`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from worker.sandbox.base import SandboxProvider

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CREATOR = "sandbox-user-1"


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

    #: behave like the older API, which ignores `format=paginated` and answers a bare array
    legacy_list: bool = False

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
        if q.get("format") != "paginated" or self.legacy_list:
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
        return web.json_response({"items": records[skip : skip + take], "total": len(records)})

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
        if errors:
            return {}, _error(400, "Validation failed", errors)
        return body, None
