"""Grow CRM (NextLoop): the self-hosted `/api/clients` API (docs: https://docs-api.growcrm.io/clients,
/contacts; source nextloopdevs/growcrm-modules-docs-api: clients.md, contacts.md).

- Auth: `Authorization: Bearer <API key>`; every key acts as the main admin. Self-hosted, so
  there is no public URL: `CLIENTSYNC_GROW_CRM_URL` (…/api) is required.
- Ids: the numeric `client_id` (kept as a string in `RemoteClient.id`).
- Create `POST /clients` needs `first_name`, `last_name`, `email`: they make the client's
  account-owner user (clients.md "Create a client"). We derive them from the canonical client
  (an individual's own names, else the primary contact's) and fail locally when they cannot be.
- Update `PATCH /clients/{id}` takes only `client_*` fields and needs `client_company_name`; it
  never touches users (clients.md "Update a client"). The people are client users, kept in step
  through the Contacts API (contacts.md): the owner is `PATCH /contacts/{id}` (first_name,
  last_name, email required, email unique) or, when another of the client's users already has
  the wanted email, `PUT /contacts/{id}/account-owner`; the other canonical contacts are users
  created (`POST /contacts`), updated, or deleted (soft; then 404). Matching is by email, so a
  repeated update never makes a second user. Tags and status are `PUT /clients/{id}/tags|status`.
  Every write is made only when the value differs from the record read first.
- Identity: no field clientsync can write and search exactly (`/clients?search=` is free text
  on the company name; custom fields are not searchable), so nothing is stamped. A user's email
  is unique across all users (contacts.md "The contact object": "Unique across all users";
  clients.md: "Must be unique among client/team users"), and `/contacts?search=` matches email:
  a client found by a user's email is exact. The company name is only similar. Records carry
  `dates.created`.
- Idempotency: none; a repeated create answers 422 "The email has already been taken" (never a
  second client). Delete: `DELETE /clients/{id}` is hard and cascading (users, projects,
  invoices, files).
- Country is free text: alpha-2 ↔ English name via pycountry.
- Calls: create 1 (+1 per extra contact, +1 when the owner has a phone, +1 when archived);
  update 2 reads (client, its users) + only the writes whose value changed (PATCH client, one
  per changed user, tags, status); delete 1.

Unconfirmed against a live install: whether PATCH clears omitted fields (we send every client
field we own, `""` for unset ones; the sandbox runs both readings); JSON bodies (the docs show
form data); rate limits; whether a create with the email of an existing contact-type user
promotes it (clients.md) or is refused (the sandbox refuses).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, ClassVar

import pycountry
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError, NotFound, PermanentError, TransientError
from worker.models import Address, Client, Contact
from worker.providers.base import Identity, ProviderAdapter, ProviderConfig, RemoteClient, wire_text

_MAX_LIMIT = 100
_STATUS = {"active": "active", "archived": "suspended"}
_PERSON = ("first_name", "last_name", "email", "phone")


class GrowCRMConfig(ProviderConfig):
    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_GROW_CRM_", extra="ignore", frozen=True)

    api_key: SecretStr | None = Field(None, description="API key (Settings → API Keys), sent as Bearer.")

    def is_configured(self) -> bool:
        return self.url is not None and self.api_key is not None

    def missing(self) -> str:
        return "set CLIENTSYNC_GROW_CRM_URL (your install's https://…/api) and CLIENTSYNC_GROW_CRM_API_KEY"


def _country_name(code: str) -> str:
    country = pycountry.countries.get(alpha_2=code)
    return str(getattr(country, "common_name", None) or country.name) if country else code


def _country_code(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return str(pycountry.countries.lookup(name).alpha_2)
    except LookupError:
        return None


def _owner(client: Client) -> tuple[str | None, str | None, str | None]:
    """(first, last, email) of the account-owner user: the individual, else the primary contact."""
    contact = client.primary_contact or Contact()
    own = (client.first_name, client.last_name)
    theirs = (contact.first_name, contact.last_name)
    pairs = [own, theirs] if client.kind == "individual" else [theirs, own]
    first, last = next((p for p in pairs if all(p)), next((p for p in pairs if any(p)), (None, None)))
    return first, last, client.email or contact.email


def _users(client: Client) -> list[dict[str, str | None]]:
    """The client users Grow should hold: the owner first, then every other contact it can take
    (a user needs first_name, last_name and a unique email)."""
    first, last, email = _owner(client)
    primary = client.primary_contact
    wanted = [{"first_name": first, "last_name": last, "email": email, "phone": primary.phone if primary else None}]
    seen = {(email or "").casefold()}
    for contact in client.contacts:
        if contact is primary or not (contact.first_name and contact.last_name and contact.email):
            continue
        if contact.email.casefold() in seen:
            continue
        seen.add(contact.email.casefold())
        wanted.append({k: getattr(contact, k) for k in _PERSON})
    return wanted


def _billing(addr: Address | None) -> dict[str, str | None]:
    if addr is None:
        return dict.fromkeys(("street", "city", "state", "zip", "country"))
    return {
        "street": ", ".join(p for p in (addr.line1, addr.line2) if p) or None,
        "city": addr.city,
        "state": addr.region,
        "zip": addr.postal_code,
        "country": _country_name(addr.country),
    }


def _same_person(user: dict[str, Any], wanted: dict[str, str | None]) -> bool:
    return all((wire_text(user.get(k)) or "") == (wanted[k] or "") for k in _PERSON)


class GrowCRM(ProviderAdapter):
    name = "grow_crm"
    title = "Grow CRM"
    settings_class = GrowCRMConfig
    default_url = "https://example.invalid/api"
    identity = Identity(
        unique=("email",),
        similar=("name",),
        notes=(
            'No searchable field to stamp (docs-api.growcrm.io/clients "List / search clients": '
            "`search` is free text on the company name). A client user's email is unique across all "
            'users (/contacts "The contact object", /clients "Create a client") and `GET /contacts'
            '?search=` matches email (/contacts "List / search contacts"): exact. Company name: '
            "similar. Records carry `dates.created`."
        ),
    )
    #: canonical field -> how Grow CRM holds it (docs/providers.md is generated from this)
    field_map: ClassVar[dict[str, str]] = {
        "id": "not supported (nothing to stamp; the owner's unique email identifies the client)",
        "kind": "derived: an individual's own names make the account-owner user, a company's its primary contact's",
        "name": "sent as client_company_name (else the person's name)",
        "first_name": "sent as the account-owner user's first_name (POST /clients, PATCH /contacts/{id})",
        "last_name": "sent as the account-owner user's last_name",
        "email": "sent as the account-owner user's email (unique among users)",
        "phone": "sent as client_phone",
        "website": "sent as client_website",
        "vat_number": "sent as client_vat",
        "tax_id": "derived: sent as client_vat when vat_number is unset",
        "billing_address": "sent as client_billing_street (line1, line2), _city, _state, _zip, _country (English name)",
        "shipping_address": "not supported (the write API has no shipping fields)",
        "currency": "not supported (Grow clients have no currency in the API)",
        "locale": "not supported",
        "notes": "sent as client_description",
        "tags": "sent as tags (create) / PUT /clients/{id}/tags",
        "status": "sent as PUT /clients/{id}/status (archived = suspended)",
        "contacts": "sent as client users (/contacts): the primary is the account owner; a contact "
        "needs first_name, last_name and email",
    }

    config: GrowCRMConfig

    def auth_headers(self) -> dict[str, str]:
        assert self.config.api_key is not None, "adapter built without credentials"
        return {"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"}

    # --- mapping -----------------------------------------------------------------------
    def unsupported_fields(self, client: Client) -> list[str]:
        """The canonical fields set on `client` that Grow CRM cannot hold."""
        out = super().unsupported_fields(client)
        if client.vat_number and client.tax_id:
            out.append("tax_id")  # one client_vat: the VAT number wins
        taken = {(u["email"] or "").casefold() for u in _users(client)}
        if any((c.email or "").casefold() not in taken for c in client.contacts if c is not client.primary_contact):
            out.append("contacts")  # a contact without first_name, last_name or email, or a repeated email
        return out

    def validate(self, client: Client) -> None:
        first, last, email = _owner(client)
        missing = [n for n, v in (("first_name", first), ("last_name", last), ("email", email)) if not v]
        if missing:
            raise LocalValidationError(
                f"Grow CRM needs {', '.join(missing)} to create a client (they make its account-owner "
                "user): set them on the client (individuals) or on its primary contact",
                provider=self.name,
                field_errors={f"client.{n}": ["required by Grow CRM"] for n in missing},
            )

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        first, last, email = _owner(client)
        body: dict[str, Any] = {
            "client_company_name": client.display_name or " ".join(p for p in (first, last) if p),
            "client_description": client.notes,
            "client_phone": client.phone,
            "client_website": client.website,
            "client_vat": client.vat_number or client.tax_id,
        }
        body.update({f"client_billing_{k}": v for k, v in _billing(client.billing_address).items()})
        if existing is not None:  # PATCH: send every owned field so a removed value is cleared
            if not body["client_company_name"]:
                body["client_company_name"] = existing.data.get("company_name")
            return {k: "" if v is None else v for k, v in body.items()}
        body.update(first_name=first, last_name=last, email=email, tags=list(client.tags) or None)
        return {k: v for k, v in body.items() if v is not None}

    def from_wire(self, data: dict[str, Any]) -> Client:
        billing = data.get("billing") if isinstance(data.get("billing"), dict) else {}
        assert isinstance(billing, dict)
        code = _country_code(wire_text(billing.get("country")))
        address = None
        if code:
            address = Address(
                line1=wire_text(billing.get("street")),
                city=wire_text(billing.get("city")),
                region=wire_text(billing.get("state")),
                postal_code=wire_text(billing.get("zip")),
                country=code,
            )
        owner = data.get("account_owner") if isinstance(data.get("account_owner"), dict) else {}
        assert isinstance(owner, dict)
        first, last = wire_text(owner.get("first_name")), wire_text(owner.get("last_name"))
        if not owner and isinstance(data.get("owner"), dict):  # a record not read through `get`
            first, _, rest = (wire_text(data["owner"].get("name")) or "").partition(" ")
            first, last = first or None, rest or None
        users = [u for u in data.get("users") or () if isinstance(u, dict)]
        contacts = tuple(
            Contact(is_primary=u.get("id") == owner.get("id"), **{k: wire_text(u.get(k)) for k in _PERSON})
            for u in sorted(users, key=lambda u: u.get("id") != owner.get("id"))
        )
        return Client(
            id=str(data["id"]),
            kind="company",
            name=wire_text(data.get("company_name")),
            first_name=first,
            last_name=last,
            email=wire_text(owner.get("email")),
            notes=wire_text(data.get("description")),
            phone=wire_text(data.get("phone")),
            website=wire_text(data.get("website")),
            vat_number=wire_text(data.get("vat")),
            billing_address=address,
            tags=tuple(t for t in data.get("tags") or () if isinstance(t, str) and t.strip()),
            status="archived" if data.get("status") == "suspended" else "active",
            contacts=contacts,
        )

    def created_at(self, remote: RemoteClient) -> float | None:
        created = (remote.data.get("dates") or {}).get("created")
        try:
            return datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp() if created else None
        except ValueError:
            return None

    # --- the Clients API -----------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        remote = self._remote(await self.request("POST", "/clients", json_body=self.to_wire(client)))
        owner = remote.data.get("owner") if isinstance(remote.data.get("owner"), dict) else None
        if owner is None or owner.get("id") is None:
            raise PermanentError(f"created client without an owner: {str(remote.data)[:200]}", provider=self.name)
        first, last, email = _owner(client)
        made = {"id": owner["id"], "first_name": first, "last_name": last, "email": email, "phone": None}
        await self._sync_users(remote.id, client, [made], owner["id"])
        if client.status != "active":
            remote = await self._put(remote, "status", {"status": _STATUS[client.status]})
        return remote

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        existing = await self.get(remote_id)
        body = self.to_wire(client, existing=existing)
        remote = existing
        if body != self.to_wire(self.from_wire(existing.data), existing=existing):
            remote = self._remote(await self.request("PATCH", f"/clients/{existing.id}", json_body=body))
        owner_id = (existing.data.get("account_owner") or {}).get("id")
        await self._sync_users(existing.id, client, existing.data.get("users") or [], owner_id)
        if sorted(client.tags) != sorted(existing.data.get("tags") or []):
            remote = await self._put(remote, "tags", {"tags": list(client.tags)})
        if existing.data.get("status") != _STATUS[client.status]:
            remote = await self._put(remote, "status", {"status": _STATUS[client.status]})
        return remote

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"/clients/{_numeric(remote_id)}")

    async def get(self, remote_id: str) -> RemoteClient:
        """The client with its users (`users`) and account owner (`account_owner`): the client
        object names its owner but carries no email (clients.md "The client object")."""
        remote = self._remote(await self.request("GET", f"/clients/{_numeric(remote_id)}"))
        users = [u async for u in self._pages("/contacts", {"client_id": remote.id}, _MAX_LIMIT)]
        owner_id = (remote.data.get("owner") or {}).get("id")
        owner = next((u for u in users if u.get("id") == owner_id or u.get("account_owner") == "yes"), None)
        return RemoteClient(id=remote.id, data={**remote.data, "users": users, "account_owner": owner or {}})

    # --- identity --------------------------------------------------------------------------
    async def search(self, key: str, value: str) -> list[RemoteClient]:
        if key == "email":  # unique among users; the user names its client
            ids = [
                str(c["client"]["id"])
                async for c in self._pages("/contacts", {"search": value}, _MAX_LIMIT)
                if str(c.get("email") or "").strip().casefold() == value.casefold()
                and isinstance(c.get("client"), dict)
                and c["client"].get("id") is not None
            ]
        elif key == "name":  # free text on the company name: exact re-check here
            ids = [
                str(c["id"])
                async for c in self._pages("/clients", {"search": value}, _MAX_LIMIT)
                if wire_text(c.get("company_name")) == value
            ]
        else:
            raise PermanentError(f"Grow CRM cannot search clients by {key!r}", provider=self.name)
        found = []
        for client_id in dict.fromkeys(ids):
            try:
                found.append(await self.get(client_id))
            except NotFound:
                continue  # deleted between the list and the read
        return found

    # --- helpers -------------------------------------------------------------------------
    async def _sync_users(self, client_id: str, client: Client, users: list[dict[str, Any]], owner_id: Any) -> None:
        """Make the client's users the wanted ones (by email); every write only when needed."""
        wanted = _users(client)
        by_email = {str(u.get("email") or "").casefold(): u for u in users}
        owner = next((u for u in users if u.get("id") == owner_id), None)
        keep: set[Any] = set()
        for i, person in enumerate(wanted):
            user = by_email.get((person["email"] or "").casefold())
            if i == 0 and user is None and owner is not None:
                user = owner  # the owner's email changed: the same user takes the new one
            if user is None:
                made = await self.request(
                    "POST", "/contacts", json_body={**_person_body(person), "clientid": int(client_id)}
                )
                user = made.get("data") if isinstance(made, dict) else None
                if not isinstance(user, dict) or user.get("id") is None:
                    raise PermanentError(f"contact answer without an id: {str(made)[:200]}", provider=self.name)
            elif not _same_person(user, person):
                await self._contact_call("PATCH", f"/contacts/{user['id']}", _person_body(person))
            if i == 0 and user.get("id") != owner_id:
                await self._contact_call("PUT", f"/contacts/{user['id']}/account-owner")
            keep.add(user.get("id"))
        for user in users:
            if user.get("id") not in keep:
                await self._contact_call("DELETE", f"/contacts/{user['id']}")

    async def _contact_call(self, method: str, path: str, body: dict[str, str] | None = None) -> None:
        """A write to one user. Its 404 is about the user, never the client: gone is what a
        DELETE wants (contacts.md: a deleted contact answers 404); for a PATCH or promotion the
        user vanished meanwhile, and a retry re-reads the users."""
        try:
            await self.request(method, path, json_body=body)
        except NotFound as exc:
            if method == "DELETE":
                return
            raise TransientError(
                f"a user of the client vanished during the update ({method} {path}): {exc.message}",
                provider=self.name,
                status=404,
            ) from exc

    async def _pages(self, path: str, extra: dict[str, str], size: int) -> AsyncIterator[dict[str, Any]]:
        page, limit = 1, max(1, min(size, _MAX_LIMIT))
        while True:
            params: dict[str, str | int] = {"page": page, "limit": limit}
            params.update(extra)
            body = await self.request("GET", path, params=params)
            items = body.get("data") if isinstance(body, dict) else None
            meta = body.get("meta") if isinstance(body, dict) else None
            if not isinstance(items, list) or not isinstance(meta, dict) or "last_page" not in meta:
                raise PermanentError(f"unexpected list answer: {str(body)[:200]}", provider=self.name)
            for item in items:
                if isinstance(item, dict):
                    yield item
            if not items or int(meta.get("current_page", page)) >= int(meta["last_page"]):
                return
            page += 1

    async def _put(self, remote: RemoteClient, action: str, body: dict[str, Any]) -> RemoteClient:
        answer = await self.request("PUT", f"/clients/{remote.id}/{action}", json_body=body)
        data = answer.get("data") if isinstance(answer, dict) else None
        return self._remote(answer) if isinstance(data, dict) and data.get("id") else remote

    def _remote(self, body: Any) -> RemoteClient:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or data.get("id") is None:
            raise PermanentError(f"answer without a client id: {str(body)[:200]}", provider=self.name)
        return RemoteClient(id=str(data["id"]), data=data)

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        async for item in self._pages("/clients", {}, page_size):
            yield self._remote({"data": item})


def _person_body(person: dict[str, str | None]) -> dict[str, str]:
    """A contacts.md create/update body: first_name, last_name, email required; phone optional."""
    return {k: person[k] or "" for k in _PERSON}


def _numeric(remote_id: str) -> str:
    if not remote_id.isdigit():  # the route only matches numbers; answer as the API would
        raise NotFound(f"no client {remote_id!r} (Grow CRM client ids are numeric)", provider="grow_crm")
    return remote_id
