"""Invoice Ninja v5 simulator: `/api/v1/clients` as its published OpenAPI spec and PROVIDERS.md
("001") describe it. "spec" below is `tests/data/invoiceninja-openapi/api-docs.yaml`.

Each rule and its source:
- auth: `X-API-TOKEN`; a wrong token answers 403 "Invalid token" (TokenAuth.php, PROVIDERS.md).
- ids are hashed strings; `{data}` envelopes; lists `{data, meta: {pagination}}` (spec `Meta`).
- list filters (spec GET /api/v1/clients parameters, ClientFilters.php): `number`, `id_number`,
  `email` (a contact's) compare exactly; `name` is LIKE %name%; `filter` is LIKE over name,
  id_number, contacts' first/last name and email, custom_value1..4; `status` a comma list of
  active / archived / deleted (default: active + archived); `page` / `per_page` (default 20, at
  most 5000, ClientController).
- writes (spec `ClientRequest`, POST and PUT alike): only its properties are accepted, readOnly
  ones (`id`, `is_deleted`, `has_valid_vat_number`) refused; contacts only
  `ClientContactRequest`'s properties (+ `id`, which the server matches contacts by,
  ClientContactRepository); `required: [contacts, country_id]`; country ids are numbers and
  ISO numeric codes (CountriesSeeder); `number` and `id_number` unique per company, deleted
  clients included (422 "has already been taken"); contact email a valid address.
- strings longer than the DB columns (191; contact email 100) answer 500, as MySQL strict mode
  does behind the real API (the API layer does not check lengths).
- PUT is partial for scalars, `contacts` the full set; delete is soft (`is_deleted`); bulk
  `archive` / `restore` / `delete` (spec GenericBulkAction); an unknown id is 400.
- `GET /api/v1/companies` lists the account's companies with `settings.country_id` (spec
  CompanySettings).

Where the docs leave a behaviour open, `Readings` (GET/POST `/_sandbox/settings`) holds a
switch; the default is the strict reading:
- `unknown_fields`: "reject" (422 naming the field) or "ignore" (Laravel's `fill()` drops them):
  the spec gives `ClientRequest` no `additionalProperties`.
- `spec_required`: True = the spec's `required` is enforced; False = the server's reading
  (StoreClientRequest: a missing country defaults to the company's, no contacts = one blank).
- `company_countries`: the ISO numeric countries of the account's companies.
Every JSON body sent to a write route is kept in `bodies` (method, path, body) for tests.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pycountry
from aiohttp import web

from worker.sandbox.base import SandboxProvider

_PATH = "/api/v1/clients"
_STRINGS = (
    "name", "website", "private_notes", "public_notes", "phone", "vat_number", "id_number", "number",
    "address1", "address2", "city", "state", "postal_code", "shipping_address1", "shipping_address2",
    "shipping_city", "shipping_state", "shipping_postal_code", "custom_value1", "custom_value2",
    "custom_value3", "custom_value4", "classification",
)  # fmt: skip
_CONTACT_STRINGS = ("first_name", "last_name", "email", "phone", "custom_value1", "custom_value2",
                    "custom_value3", "custom_value4")  # fmt: skip
# spec components/schemas/ClientRequest and ClientContactRequest: the writable properties
_REQUEST_FIELDS = {*_STRINGS, "contacts", "country_id", "shipping_country_id", "industry_id", "size_id",
                   "group_settings_id", "routing_id", "is_tax_exempt", "settings"}  # fmt: skip
_CUSTOM = ("custom_value1", "custom_value2", "custom_value3", "custom_value4")
_READ_ONLY = {"id", "is_deleted", "has_valid_vat_number"}
_CONTACT_FIELDS = {*_CONTACT_STRINGS, "id", "password", "send_email"}
_REQUIRED = ("contacts", "country_id")  # spec ClientRequest.required
# UpdateClientRequest.php: classification in:individual,business,company,partnership,trust,charity,...
_CLASSIFICATIONS = {"individual", "business", "company", "partnership", "trust", "charity",
                    "government", "other"}  # fmt: skip
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_TOKEN = "sandbox-invoice-ninja-token"  # noqa: S105 - the sandbox's published test token


def _known_country(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        return False
    return pycountry.countries.get(numeric=f"{int(value):03d}") is not None


@dataclass
class Readings:
    """One switch per behaviour the docs leave open (see the module docstring); strict by default."""

    unknown_fields: str = "reject"  # or "ignore"
    spec_required: bool = True
    company_countries: list[int] = field(default_factory=lambda: [840])


class InvoiceNinjaSandbox(SandboxProvider):
    """A company's clients in Invoice Ninja v5."""

    name = "invoice_ninja"
    readings_class = Readings

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        #: (method, path, JSON body) of every write the simulator received, oldest first
        self.bodies: list[tuple[str, str, Any]] = []
        self._serial = 0

    @classmethod
    def default_credentials(cls) -> dict[str, str]:
        return {"token": _TOKEN}

    def env(self, base_url: str) -> dict[str, str]:
        return {
            "CLIENTSYNC_INVOICE_NINJA_URL": base_url,
            "CLIENTSYNC_INVOICE_NINJA_TOKEN": self.credentials["token"],
        }

    def is_authorised(self, request: web.Request) -> bool:
        return request.headers.get("X-API-TOKEN") == self.credentials["token"]

    def unauthorised(self) -> web.Response:
        return web.json_response({"message": "Invalid token", "errors": {}}, status=403)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(_PATH, self._list)
        app.router.add_post(_PATH, self._create)
        app.router.add_post(f"{_PATH}/bulk", self._bulk)
        app.router.add_get(_PATH + "/{id}", self._get)
        app.router.add_put(_PATH + "/{id}", self._update)
        app.router.add_delete(_PATH + "/{id}", self._delete)
        app.router.add_get("/api/v1/companies", self._companies)

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.bodies.clear()
        return await super()._control_reset(request)

    # --- helpers ----------------------------------------------------------------------------
    def _hashed_id(self) -> str:
        """A 10-character id like Invoice Ninja's hashids (`Opnel5aKBz`), never all digits."""
        self._serial += 1
        digest = hashlib.sha256(f"{self.name}:{self._serial}".encode()).digest()
        return _ALPHABET[digest[0] % 52] + "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[1:10])

    def _lookup(self, request: web.Request) -> dict[str, Any] | web.Response:
        record = self.clients.get(request.match_info["id"])
        if record is None:
            # ModelNotFoundException rendered for a JSON client: 400, not 404.
            return web.json_response(
                {"message": "No query results for model [App\\Models\\Client]."}, status=400
            )
        return record

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"message": "The given data was invalid.", "errors": {}}, status=400)
        self.bodies.append((request.method, request.path, body))
        if not isinstance(body, dict):
            return _invalid({"body": ["The body must be an object."]})
        return body

    def _check(self, body: dict[str, Any], current: dict[str, Any] | None) -> web.Response | None:
        errors: dict[str, list[str]] = {}
        too_long = False
        if self.readings.unknown_fields == "reject":
            for key in sorted(set(body) - _REQUEST_FIELDS):
                rule = "is read-only" if key in _READ_ONLY else "is not a ClientRequest property"
                errors[key] = [f"The {key} field {rule}."]
            listed = body.get("contacts")
            for i, contact in enumerate(listed if isinstance(listed, list) else []):
                for key in sorted(set(contact) - _CONTACT_FIELDS if isinstance(contact, dict) else ()):
                    errors[f"contacts.{i}.{key}"] = [f"The contacts.{i}.{key} field is not a contact property."]
        if self.readings.spec_required:
            for key in _REQUIRED:
                if key not in body:
                    errors[key] = [f"The {key} field is required."]
        for key in ("country_id", "shipping_country_id"):
            value = body.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                errors[key] = [f"The {key} must be a number."]
        for key in _STRINGS:
            value = body.get(key)
            if value is not None and not isinstance(value, str):
                errors[key] = [f"The {key} must be a string."]
            too_long = too_long or (isinstance(value, str) and len(value) > 191)
        for key in ("country_id", "shipping_country_id"):
            if key not in errors and body.get(key) not in (None, "") and not _known_country(body[key]):
                errors[key] = [f"The selected {key} is invalid."]
        if body.get("classification") and body["classification"] not in _CLASSIFICATIONS:
            errors["classification"] = ["The selected classification is invalid."]
        settings = body.get("settings")
        if settings is not None and (
            not isinstance(settings, dict) or not str(settings.get("currency_id", "1")).isdigit()
        ):
            errors["settings"] = ["The settings.currency_id must be a currency id."]
        contacts = body.get("contacts")
        if contacts is not None and not (
            isinstance(contacts, list) and all(isinstance(c, dict) for c in contacts)
        ):
            errors["contacts"] = ["The contacts must be an array of objects."]
        for i, contact in enumerate(contacts if isinstance(contacts, list) else []):
            for key in _CONTACT_STRINGS:
                value = contact.get(key) if isinstance(contact, dict) else None
                if value is not None and not isinstance(value, str):
                    errors[f"contacts.{i}.{key}"] = [f"The contacts.{i}.{key} must be a string."]
                too_long = too_long or (
                    isinstance(value, str) and len(value) > (100 if key == "email" else 191)
                )
            email = contact.get("email") if isinstance(contact, dict) else None
            if isinstance(email, str) and email and not _EMAIL.match(email):
                errors[f"contacts.{i}.email"] = [f"The contacts.{i}.email must be a valid email address."]
        for key in ("number", "id_number"):
            value = body.get(key)
            if value and any(c.get(key) == value and c is not current for c in self.clients.values()):
                errors[key] = [f"The {key} has already been taken."]
        if errors:
            return _invalid(errors)
        if too_long:
            return web.json_response({"message": "SQLSTATE[22001]: String data, right truncated"}, status=500)
        return None

    def _fill(self, record: dict[str, Any], body: dict[str, Any]) -> None:
        for key in _STRINGS:
            if key in body:
                record[key] = body[key] or ""
        for key in ("country_id", "shipping_country_id"):
            if key in body:
                record[key] = str(body[key] or "")
        if "settings" in body:
            record["settings"] = dict(body["settings"] or {})
        if "contacts" in body:
            self._replace_contacts(record, body["contacts"] or [])
        record["updated_at"] = int(time.time())

    def _replace_contacts(self, record: dict[str, Any], wanted: list[dict[str, Any]]) -> None:
        """Matched by id: updated; without (or unknown) id: created; missing: deleted."""
        old = {c["id"]: c for c in record.get("contacts", [])}
        contacts = []
        for item in wanted or [{}]:  # an empty list still leaves one blank contact
            contact = old.pop(item.get("id"), None) or {"id": self._hashed_id(), "send_email": True}
            for key in _CONTACT_STRINGS:
                if key in item or key not in contact:
                    contact[key] = item.get(key) or ""
            contacts.append(contact)
        for i, contact in enumerate(contacts):
            contact["is_primary"] = i == 0
        record["contacts"] = contacts

    def _set_state(self, record: dict[str, Any], action: str) -> None:
        now = int(time.time())
        if action == "archive":
            record["archived_at"] = record.get("archived_at") or now
        elif action == "restore":
            record["archived_at"], record["is_deleted"] = 0, False
        elif action == "delete":
            # IN's archive is Laravel's soft delete (deleted_at); its delete adds is_deleted.
            record["archived_at"], record["is_deleted"] = record.get("archived_at") or now, True
        record["updated_at"] = now

    # --- routes -----------------------------------------------------------------------------
    async def _list(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            page, per_page = max(1, int(q.get("page", "1"))), min(5000, max(1, int(q.get("per_page", "20"))))
        except ValueError:
            return _invalid({"page": ["The page must be an integer."]})
        states = set(q["status"].split(",")) if q.get("status") else {"active", "archived"}
        # The filters are all conjunctive, so they run exact ones first, each over what the one
        # before kept (a provider has indexes; this double must not spend a core scanning a
        # large account).
        tests: list[Callable[[dict[str, Any]], bool]] = []
        for key in ("id_number", "number"):  # ClientFilters: where(key, value)
            if value := q.get(key):
                tests.append(_equals(key, value))
        if email := q.get("email", "").casefold():
            tests.append(lambda c: any(k["email"].casefold() == email for k in c["contacts"]))
        if name := q.get("name", "").casefold():  # ClientFilters::name: like %name% (case-insensitive)
            tests.append(lambda c: name in c["name"].casefold())
        if term := q.get("filter", "").casefold():  # ClientFilters::filter
            tests.append(lambda c: any(term in str(v).casefold() for v in _filter_columns(c)))
        tests.append(lambda c: _state(c) in states)
        rows = list(self.clients.values())
        for test in tests:
            rows = [c for c in rows if test(c)]
        total_pages = max(1, -(-len(rows) // per_page))
        chunk = rows[(page - 1) * per_page : page * per_page]
        pagination = {"total": len(rows), "count": len(chunk), "per_page": per_page,
                      "current_page": page, "total_pages": total_pages, "links": {}}  # fmt: skip
        return web.json_response({"data": chunk, "meta": {"pagination": pagination}})

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if (invalid := self._check(body, None)) is not None:
            return invalid
        now = int(time.time())
        record: dict[str, Any] = {key: "" for key in _STRINGS}
        record.update(id=self._hashed_id(), country_id="", shipping_country_id="", settings={}, contacts=[],
                      is_deleted=False, archived_at=0, created_at=now)  # fmt: skip
        record["number"] = body.get("number") or f"{len(self.clients) + 1:04d}"
        if "country_id" not in body:  # StoreClientRequest: the company's country
            record["country_id"] = str(self.readings.company_countries[0])
        self._fill(record, {"contacts": [], **{k: v for k, v in body.items() if k != "number"}})
        self.clients[record["id"]] = record
        return web.json_response({"data": record})

    async def _companies(self, request: web.Request) -> web.Response:
        data = [
            {"id": self._hashed_id(), "settings": {"country_id": str(country)}}
            for country in self.readings.company_countries
        ]
        pagination = {"total": len(data), "count": len(data), "per_page": 20, "current_page": 1,
                      "total_pages": 1, "links": {}}  # fmt: skip
        return web.json_response({"data": data, "meta": {"pagination": pagination}})

    async def _get(self, request: web.Request) -> web.Response:
        record = self._lookup(request)
        return record if isinstance(record, web.Response) else web.json_response({"data": record})

    async def _update(self, request: web.Request) -> web.Response:
        record = self._lookup(request)
        if isinstance(record, web.Response):
            return record
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if (invalid := self._check(body, record)) is not None:
            return invalid
        self._fill(record, body)
        return web.json_response({"data": record})

    async def _delete(self, request: web.Request) -> web.Response:
        record = self._lookup(request)
        if isinstance(record, web.Response):
            return record
        self._set_state(record, "delete")
        return web.json_response({"data": record})

    async def _bulk(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        action, ids = body.get("action"), body.get("ids")
        if action not in ("archive", "restore", "delete") or not isinstance(ids, list):
            return _invalid({"action": ["The selected action is invalid."]} if ids else {"ids": ["required"]})
        found = [self.clients[i] for i in ids if isinstance(i, str) and i in self.clients]
        for record in found:
            self._set_state(record, action)
        return web.json_response({"data": found})


def _filter_columns(record: dict[str, Any]) -> list[Any]:
    contacts = [c.get(k) for c in record["contacts"] for k in ("first_name", "last_name", "email")]
    return [record.get("name"), record.get("id_number"), *contacts, *(record.get(k) for k in _CUSTOM)]


def _equals(key: str, value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda c: c.get(key) == value


def _state(record: dict[str, Any]) -> str:
    if record.get("is_deleted"):
        return "deleted"
    return "archived" if record.get("archived_at") else "active"


def _invalid(errors: dict[str, list[str]]) -> web.Response:
    return web.json_response({"message": "The given data was invalid.", "errors": errors}, status=422)
