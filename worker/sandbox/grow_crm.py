"""A Grow CRM Clients + Contacts API simulator, written from the docs
(https://docs-api.growcrm.io/clients and /contacts; nextloopdevs/growcrm-modules-docs-api:
clients.md, contacts.md, getting-started.md, authentication.md).

Each rule and its source:
- auth: Bearer key; else 401 `{"message": "Unauthorized. A valid API key is required."}`
  (authentication.md).
- envelope `{data, meta, message}`; lists `page` / `limit` (max 100) with `meta {current_page,
  per_page, total, last_page}` (getting-started.md "Pagination"); errors `{message, errors}`,
  `errors` only on 422 (getting-started.md "Errors").
- clients (clients.md): numeric ids; the documented client object; `GET /clients` `status`,
  `category_id`, `search` (company name), `sort`, `order` (default desc); `POST /clients` 201,
  body parameters as listed ("Create a client"), `first_name`, `last_name`, `email` required,
  the email unique among users, they make the account-owner user; `PATCH /clients/{id}` only
  the listed `client_*` parameters, `client_company_name` required, users untouched; `PUT
  …/tags` (array, full replace), `…/status` (active | suspended), `…/owner` (a user of this
  client, else 409); `DELETE` hard and cascading (its users go too); unknown id 404.
- contacts (contacts.md): the documented contact object; `GET /contacts` `status`,
  `client_id`, `account_owner`, `search` (first/last name, email, phone), `sort`, `order`
  (default asc); `POST /contacts` 201 (`first_name`, `last_name`, `email`, `clientid`
  required; `phone`, `position`, `send_email`); `PATCH /contacts/{id}` (`first_name`,
  `last_name`, `email` required, email unique ignoring itself; `phone`, `position`); `DELETE`
  soft: email cleared, then 404 everywhere and gone from lists; `PUT …/account-owner` (no body).

Where the docs leave a behaviour open, `Readings` (GET/POST `/_sandbox/settings`) holds a
switch; the default is the strict reading:
- `unknown_fields`: "reject" (422 naming each undocumented body field; note clients.md lets
  required custom fields through by name, none are configured here) or "ignore".
- `patch_omitted`: "keep" (PATCH changes only the fields sent) or "clear" (an omitted optional
  field is emptied): clients.md does not say.
Bodies may be JSON or form data (the docs' examples are form data).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from worker.sandbox.base import SandboxProvider

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_INVALID = "The given data was invalid."
_FIELDS = ("company_name", "description", "phone", "website", "vat")
_BILLING = ("street", "city", "state", "zip", "country", "invoice_due_days")
# clients.md "Update a client" body parameters; "Create a client" adds the owner and tags
_PATCH_FIELDS = {"client_company_name", "client_categoryid", *(f"client_{f}" for f in _FIELDS[1:]),
                 *(f"client_billing_{f}" for f in _BILLING)}  # fmt: skip
_CREATE_FIELDS = {*_PATCH_FIELDS, "first_name", "last_name", "email", "tags", "send_email"}
# contacts.md "Create a contact" / "Update a contact"
_CONTACT_CREATE = {"first_name", "last_name", "email", "clientid", "phone", "position", "send_email"}
_CONTACT_UPDATE = {"first_name", "last_name", "email", "phone", "position"}


@dataclass
class Readings:
    """One switch per behaviour the docs leave open (see the module docstring); strict by default."""

    unknown_fields: str = "reject"  # or "ignore"
    patch_omitted: str = "keep"  # or "clear"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _invalid(errors: dict[str, list[str]]) -> web.Response:
    return web.json_response({"message": _INVALID, "errors": errors}, status=422)


def _label(field: str) -> str:
    return field.replace("_", " ")


class GrowCRMSandbox(SandboxProvider):
    name = "grow_crm"
    readings_class = Readings

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        #: user id -> {id, first_name, last_name, email, phone, position, client_id, deleted, created}
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
        r.add_post("/contacts", self._contact_create)
        r.add_get(r"/contacts/{id:\d+}", self._contact_get)
        r.add_patch(r"/contacts/{id:\d+}", self._contact_update)
        r.add_delete(r"/contacts/{id:\d+}", self._contact_delete)
        r.add_put(r"/contacts/{id:\d+}/account-owner", self._contact_owner)

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.users.clear()
        self._next_user = 100
        return await super()._control_reset(request)

    # --- clients -------------------------------------------------------------------------
    async def _list(self, request: web.Request) -> web.Response:
        term = request.query.get("search", "").casefold()
        status = request.query.get("status")
        rows = [
            c
            for c in sorted(self.clients.values(), key=lambda c: int(c["id"]), reverse=True)
            if term in c["company_name"].casefold() and status in (None, c["status"])
        ]
        if request.query.get("order") == "asc":
            rows.reverse()
        return self._page(request, rows, "Clients retrieved successfully.")

    async def _create(self, request: web.Request) -> web.Response:
        body = await _body(request)
        errors = self._unknown(body, _CREATE_FIELDS)
        errors.update(self._person_errors(body, None))
        if body.get("tags") is not None and not isinstance(body["tags"], list):
            errors["tags"] = ["The tags must be an array."]
        if errors:
            return _invalid(errors)
        client_id = int(self.new_id())
        user = self._new_user(body, client_id)
        record: dict[str, Any] = {
            "id": client_id,
            "company_name": body.get("client_company_name") or f"{user['first_name']} {user['last_name']}",
            "description": None, "status": "active", "phone": None, "website": None, "vat": None,
            "category": {"id": 1, "name": "Default"},
            "owner": {"id": user["id"], "name": _name(user)},
            "billing": dict.fromkeys(_BILLING),
            "shipping": dict.fromkeys(_BILLING[:5]),
            "dates": {"created": _now(), "updated": _now()},
            "tags": [str(t) for t in body.get("tags") or []],
        }  # fmt: skip
        _write_fields(record, body, clear_omitted=False)
        self.clients[str(client_id)] = record
        return web.json_response({"data": record, "message": "Client created successfully."}, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found("Client")
        return web.json_response({"data": record, "message": "Client retrieved successfully."})

    async def _update(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found("Client")
        body = await _body(request)
        errors = self._unknown(body, _PATCH_FIELDS)
        if not body.get("client_company_name"):
            errors["client_company_name"] = ["The client company name field is required."]
        if errors:
            return _invalid(errors)
        _write_fields(record, body, clear_omitted=self.readings.patch_omitted == "clear")
        return web.json_response({"data": record, "message": "Client updated successfully."})

    async def _delete(self, request: web.Request) -> web.Response:
        record = self.clients.pop(request.match_info["id"], None)
        if record is None:
            return _not_found("Client")
        self.users = {k: u for k, u in self.users.items() if u["client_id"] != record["id"]}
        return web.json_response({"data": {"id": record["id"]}, "message": "Client deleted successfully."})

    async def _action(self, request: web.Request) -> web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            return _not_found("Client")
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
            user = self._live_user(int(owner)) if owner.isdigit() else None
            if user is None or user["client_id"] != record["id"]:
                return web.json_response({"message": "The user does not belong to this client."}, status=409)
            record["owner"] = {"id": user["id"], "name": _name(user)}
        record["dates"]["updated"] = _now()
        return web.json_response({"data": record, "message": f"Client {action} updated successfully."})

    # --- contacts ------------------------------------------------------------------------
    async def _contacts(self, request: web.Request) -> web.Response:
        q = request.query
        term = q.get("search", "").casefold()
        rows = []
        for user in sorted(self.users.values(), key=lambda u: int(u["id"])):
            if user["deleted"]:
                continue
            haystack = " ".join(str(user[k] or "") for k in ("first_name", "last_name", "email", "phone"))
            if term not in haystack.casefold() or q.get("client_id") not in (None, str(user["client_id"])):
                continue
            contact = self._contact(user)  # built only for the users that match (a large account)
            if q.get("account_owner") not in (None, contact["account_owner"]):
                continue
            rows.append(contact)
        if q.get("order") == "desc":
            rows.reverse()
        return self._page(request, rows, "Contacts retrieved successfully.")

    async def _contact_create(self, request: web.Request) -> web.Response:
        body = await _body(request)
        errors = self._unknown(body, _CONTACT_CREATE)
        errors.update(self._person_errors(body, None))
        client_id = str(body.get("clientid") or "")
        if not client_id:
            errors["clientid"] = ["The clientid field is required."]
        elif client_id not in self.clients:
            errors["clientid"] = ["The selected clientid is invalid."]
        if errors:
            return _invalid(errors)
        user = self._new_user(body, int(client_id))
        return web.json_response({"data": self._contact(user), "message": "Contact created successfully."}, status=201)

    async def _contact_get(self, request: web.Request) -> web.Response:
        user = self._live_user(int(request.match_info["id"]))
        if user is None:
            return _not_found("Contact")
        return web.json_response({"data": self._contact(user), "message": "Contact retrieved successfully."})

    async def _contact_update(self, request: web.Request) -> web.Response:
        user = self._live_user(int(request.match_info["id"]))
        if user is None:
            return _not_found("Contact")
        body = await _body(request)
        errors = self._unknown(body, _CONTACT_UPDATE)
        errors.update(self._person_errors(body, user))
        if errors:
            return _invalid(errors)
        for key in ("first_name", "last_name", "email", "phone", "position"):
            if key in body:
                user[key] = body[key] or None
        client = self.clients[str(user["client_id"])]
        if client["owner"]["id"] == user["id"]:
            client["owner"]["name"] = _name(user)
        return web.json_response({"data": self._contact(user), "message": "Contact updated successfully."})

    async def _contact_delete(self, request: web.Request) -> web.Response:
        user = self._live_user(int(request.match_info["id"]))
        if user is None:
            return _not_found("Contact")
        user.update(deleted=True, email=None)  # contacts.md: marked deleted, email cleared
        return web.json_response({"data": {"id": user["id"]}, "message": "Contact deleted successfully."})

    async def _contact_owner(self, request: web.Request) -> web.Response:
        user = self._live_user(int(request.match_info["id"]))
        if user is None:
            return _not_found("Contact")
        client = self.clients.get(str(user["client_id"]))
        if client is None:
            return web.json_response({"message": "The contact does not belong to a client."}, status=409)
        client["owner"] = {"id": user["id"], "name": _name(user)}
        return web.json_response({"data": self._contact(user), "message": "Contact set as account owner successfully."})

    # --- helpers -------------------------------------------------------------------------
    def _unknown(self, body: dict[str, Any], allowed: set[str]) -> dict[str, list[str]]:
        if self.readings.unknown_fields != "reject":
            return {}
        return {k: [f"The {_label(k)} field is not a documented parameter."] for k in sorted(set(body) - allowed)}

    def _person_errors(self, body: dict[str, Any], current: dict[str, Any] | None) -> dict[str, list[str]]:
        errors = {
            f: [f"The {_label(f)} field is required."] for f in ("first_name", "last_name", "email") if not body.get(f)
        }
        email = str(body.get("email") or "")
        if email and not _EMAIL.match(email):
            errors["email"] = ["The email must be a valid email address."]
        elif email and (holder := self._user_by_email(email)) is not None and holder is not current:
            errors["email"] = ["The email has already been taken."]
        return errors

    def _new_user(self, body: dict[str, Any], client_id: int) -> dict[str, Any]:
        user_id = self._next_user
        self._next_user += 1
        self.users[user_id] = {
            "id": user_id, "first_name": body["first_name"], "last_name": body["last_name"],
            "email": body["email"], "phone": body.get("phone") or None, "position": body.get("position"),
            "client_id": client_id, "deleted": False, "created": _now(),
        }  # fmt: skip
        return self.users[user_id]

    def _live_user(self, user_id: int) -> dict[str, Any] | None:
        user = self.users.get(user_id)
        return user if user is not None and not user["deleted"] else None

    def _contact(self, user: dict[str, Any]) -> dict[str, Any]:
        """The contact object (contacts.md "The contact object")."""
        client = self.clients[str(user["client_id"])]
        return {
            **{k: user[k] for k in ("id", "first_name", "last_name", "email", "phone")},
            "name": _name(user),
            "job_position": user["position"],
            "account_owner": "yes" if client["owner"]["id"] == user["id"] else "no",
            "status": "active",
            "client": {"id": client["id"], "company_name": client["company_name"]},
            "role": {"id": 2, "name": "Client"},
            "dates": {"created": user["created"], "updated": user["created"]},
        }

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
        return next((u for u in self.users.values() if (u["email"] or "").casefold() == email.casefold()), None)


def _name(user: dict[str, Any]) -> str:
    return f"{user['first_name']} {user['last_name']}"


def _write_fields(record: dict[str, Any], body: dict[str, Any], *, clear_omitted: bool) -> None:
    """Copy the `client_*` fields of `body` onto the stored client object (an omitted one is
    emptied under the "clear" reading of PATCH)."""
    for field in _FIELDS:
        key = f"client_{field}"
        if key in body and (body[key] or field != "company_name"):
            record[field] = body[key] or None
        elif clear_omitted and field != "company_name":
            record[field] = None
    for field in _BILLING:
        key = f"client_billing_{field}"
        if key in body:
            record["billing"][field] = body[key] or None
        elif clear_omitted:
            record["billing"][field] = None
    record["dates"]["updated"] = _now()


def _not_found(what: str) -> web.Response:
    return web.json_response({"message": f"{what} not found."}, status=404)


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
