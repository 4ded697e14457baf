"""A Grow CRM Clients API simulator (https://docs-api.growcrm.io/clients, /contacts).

Faithful to the docs: Bearer key (401 `{"message": "Unauthorized. A valid API key is
required."}`), numeric client ids, the `{data, meta, message}` envelope and the documented
client object, `POST /clients` (201; `first_name`, `last_name`, `email` required, the email
unique among users; they make the account-owner user), `PATCH` (422 without
`client_company_name`), the `PUT …/tags|status|owner` actions, hard cascading `DELETE`,
404 for an unknown id, `page`/`limit` (≤ 100) lists, and `GET /contacts` (search matches
names, email and phone) so a client can be found by its users' emails.

Assumed where the docs are silent: an owner that is not a user of the client is a 409
business failure; bodies may be JSON or form data.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from worker.sandbox.base import SandboxProvider

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_INVALID = "The given data was invalid."
_FIELDS = ("company_name", "description", "phone", "website", "vat")
_BILLING = ("street", "city", "state", "zip", "country", "invoice_due_days")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _invalid(errors: dict[str, list[str]]) -> web.Response:
    return web.json_response({"message": _INVALID, "errors": errors}, status=422)


def _label(field: str) -> str:
    return field.replace("_", " ")


class GrowCRMSandbox(SandboxProvider):
    name = "grow_crm"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        #: user id -> {id, first_name, last_name, email, phone, client_id}
        self.users: dict[int, dict[str, Any]] = {}
        self._next_user = 100

    @classmethod
    def default_credentials(cls) -> dict[str, str]:
        return {"api_key": "grow-sandbox-key"}

    def env(self, base_url: str) -> dict[str, str]:
        return {
            "CLIENTSYNC_GROW_CRM_URL": base_url,
            "CLIENTSYNC_GROW_CRM_API_KEY": self.credentials["api_key"],
        }

    def is_authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.credentials['api_key']}"

    def unauthorised(self) -> web.Response:
        return web.json_response({"message": "Unauthorized. A valid API key is required."}, status=401)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/clients", self._list)
        r.add_post("/clients", self._create)
        r.add_get(r"/clients/{id:\d+}", self._get)
        r.add_patch(r"/clients/{id:\d+}", self._update)
        r.add_delete(r"/clients/{id:\d+}", self._delete)
        r.add_put(r"/clients/{id:\d+}/{action:tags|status|owner}", self._action)
        r.add_get("/contacts", self._contacts)

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.users.clear()
        self._next_user = 100
        return await super()._control_reset(request)

    # --- handlers ------------------------------------------------------------------------
    async def _list(self, request: web.Request) -> web.Response:
        term = request.query.get("search", "").casefold()
        status = request.query.get("status")
        rows = [
            c
            for c in sorted(self.clients.values(), key=lambda c: int(c["id"]), reverse=True)
            if term in c["company_name"].casefold() and status in (None, c["status"])
        ]
        return self._page(request, rows, "Clients retrieved successfully.")

    async def _create(self, request: web.Request) -> web.Response:
        body = await _body(request)
        errors = {
            f: [f"The {_label(f)} field is required."]
            for f in ("first_name", "last_name", "email")
            if not body.get(f)
        }
        email = str(body.get("email") or "")
        if email and not _EMAIL.match(email):
            errors["email"] = ["The email must be a valid email address."]
        elif email and self._user_by_email(email) is not None:
            errors["email"] = ["The email has already been taken."]
        if errors:
            return _invalid(errors)
        client_id, user_id = int(self.new_id()), self._next_user
        self._next_user += 1
        name = f"{body['first_name']} {body['last_name']}"
        self.users[user_id] = {
            "id": user_id, "first_name": body["first_name"], "last_name": body["last_name"],
            "email": email, "phone": None, "client_id": client_id,
        }  # fmt: skip
        record: dict[str, Any] = {
            "id": client_id,
            "company_name": body.get("client_company_name") or name,
            "status": "active",
            "category": {"id": 1, "name": "Default"},
            "owner": {"id": user_id, "name": name},
            "billing": dict.fromkeys(_BILLING),
            "shipping": dict.fromkeys(_BILLING[:5]),
            "dates": {"created": _now(), "updated": _now()},
            "tags": [str(t) for t in body.get("tags") or []],
        }
        _write_fields(record, body)
        self.clients[str(client_id)] = record
        return web.json_response({"data": record, "message": "Client created successfully."}, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found()
        return web.json_response({"data": record, "message": "Client retrieved successfully."})

    async def _update(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found()
        body = await _body(request)
        if not body.get("client_company_name"):
            return _invalid({"client_company_name": ["The client company name field is required."]})
        _write_fields(record, body)
        return web.json_response({"data": record, "message": "Client updated successfully."})

    async def _delete(self, request: web.Request) -> web.Response:
        record = self.clients.pop(request.match_info["id"], None)
        if record is None:
            return _not_found()
        self.users = {k: u for k, u in self.users.items() if u["client_id"] != record["id"]}
        return web.json_response({"data": {"id": record["id"]}, "message": "Client deleted successfully."})

    async def _action(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found()
        body, action = await _body(request), request.match_info["action"]
        if action == "tags":
            tags = body.get("tags")
            if not isinstance(tags, list):
                return _invalid({"tags": ["The tags field must be an array."]})
            record["tags"] = [str(t) for t in tags]
        elif action == "status":
            if body.get("status") not in ("active", "suspended"):
                return _invalid({"status": ["The selected status is invalid."]})
            record["status"] = body["status"]
        else:
            owner = str(body.get("owner") or "")
            user = self.users.get(int(owner)) if owner.isdigit() else None
            if user is None or user["client_id"] != record["id"]:
                return web.json_response({"message": "The user does not belong to this client."}, status=409)
            record["owner"] = {"id": user["id"], "name": f"{user['first_name']} {user['last_name']}"}
        record["dates"]["updated"] = _now()
        return web.json_response({"data": record, "message": f"Client {action} updated successfully."})

    async def _contacts(self, request: web.Request) -> web.Response:
        term = request.query.get("search", "").casefold()
        client_id, owner_flag = request.query.get("client_id"), request.query.get("account_owner")
        rows = []
        for user in sorted(self.users.values(), key=lambda u: int(u["id"])):
            haystack = " ".join(str(user[k] or "") for k in ("first_name", "last_name", "email", "phone"))
            client = self.clients[str(user["client_id"])]
            is_owner = "yes" if client["owner"]["id"] == user["id"] else "no"
            if term not in haystack.casefold() or client_id not in (None, str(user["client_id"])):
                continue
            if owner_flag not in (None, is_owner):
                continue
            rows.append({
                **{k: user[k] for k in ("id", "first_name", "last_name", "email", "phone")},
                "name": f"{user['first_name']} {user['last_name']}",
                "account_owner": is_owner,
                "status": "active",
                "client": {"id": client["id"], "company_name": client["company_name"]},
            })  # fmt: skip
        return self._page(request, rows, "Contacts retrieved successfully.")

    # --- helpers -------------------------------------------------------------------------
    def _page(self, request: web.Request, rows: list[dict[str, Any]], message: str) -> web.Response:
        try:
            page = max(1, int(request.query.get("page", "1")))
            limit = min(100, max(1, int(request.query.get("limit", "15"))))
        except ValueError:
            return _invalid({"page": ["The page must be an integer."]})
        last = max(1, math.ceil(len(rows) / limit))
        meta = {"current_page": page, "per_page": limit, "total": len(rows), "last_page": last}
        chunk = rows[(page - 1) * limit : page * limit]
        return web.json_response({"data": chunk, "meta": meta, "message": message})

    def _user_by_email(self, email: str) -> dict[str, Any] | None:
        return next((u for u in self.users.values() if u["email"].casefold() == email.casefold()), None)


def _write_fields(record: dict[str, Any], body: dict[str, Any]) -> None:
    """Copy the `client_*` fields present in `body` onto the stored client object."""
    for field in _FIELDS:
        if f"client_{field}" in body and (body[f"client_{field}"] or field != "company_name"):
            record[field] = body[f"client_{field}"] or None
    for field in _BILLING:
        if f"client_billing_{field}" in body:
            record["billing"][field] = body[f"client_billing_{field}"] or None
    record["dates"]["updated"] = _now()


def _not_found() -> web.Response:
    return web.json_response({"message": "Client not found."}, status=404)


async def _body(request: web.Request) -> dict[str, Any]:
    """A JSON or form body as a dict (form `tags[]` becomes `tags`)."""
    if request.content_type == "application/json":
        try:
            data = await request.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
    form = await request.post()
    out: dict[str, Any] = {k: v for k, v in form.items() if not k.endswith("[]")}
    if "tags[]" in form:
        out["tags"] = form.getall("tags[]")
    return out
