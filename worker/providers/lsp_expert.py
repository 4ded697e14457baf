"""LSP.expert Clients API (`/v2/clients`), docs: https://docs.lsp.expert/clients.

- Auth: HTTP Basic, the API key as user name and an empty password (`curl -u {key}:`).
- Idempotency: none documented, and no field is documented as unique or searchable, so a
  record is never recognised exactly: `identity` declares only `similar` keys (a contact's
  email, the client's name), which `worker.identity` uses to settle an unclear create
  (whole payload + created at or after the intent + linked to nobody) and otherwise asks an
  operator. No field is stamped by default: the client object has no reference/external-id
  field (docs.lsp.expert/clients, "The Client object"). `CLIENTSYNC_LSP_EXPERT_ID_FIELD`
  can name a writable top-level field to stamp (e.g. `details`); whatever that field held,
  including a canonical field mapped to it, is overwritten on every write, and `search`
  then scans every page for it (no list filter is documented).
- Create: `POST /v2/clients` with the documented create parameters only. `archived` is an
  update-only parameter ("Update a client" lists `archived`/`pinned`; "Create a client"
  does not), so an archived client is created, then archived by one `PUT`.
- Update: `PUT` is partial ("any parameters not provided will be left unchanged"); a field
  cleared at the source is sent as "" (the docs' bodies are form-encoded, where "" is the
  only way to say "empty"; whether LSP.expert clears on "" is unconfirmed [?]). The `PUT`
  answers the client with its embedded `contacts`, so an update is ONE call when no contact
  changes (it was 3-4: GET, PUT, contacts, GET).
- Contacts are a sub-resource (docs.lsp.expert/clients/contacts documents `GET` and `POST
  /v2/clients/:id/contacts`, `fullName` required). LSP clients have no email or phone: the
  client's own email/phone travel as its first contact. Update pairs the wanted contacts
  with the held ones (by email, then full name, then in order): a missing one is posted, a
  changed one is `PUT` and a dropped one `DELETE`d at `/v2/clients/{id}/contacts/{cid}`.
  Those two routes are NOT documented [?] (inferred from the notes sub-resource's
  documented `PUT /v2/clients/:id/notes/:noteId`). Where they answer 404/405, the adapter
  checks the client: gone -> `NotFound` (really deleted); contact gone -> nothing to change
  (a PUT becomes a POST); otherwise a `PermanentError` saying the account offers no such
  route (never "the client was deleted").
- Delete: `DELETE /v2/clients/{id}` is inferred [?]; hard or soft is not stated.
  `archived: true` (canonical status "archived") is the documented soft path.
- Lists: `page` (1-based) -> `{items, pageSize, page, totalPages, totalItems, hasNextPage,
  hasPreviousPage}` (docs.lsp.expert/pagination), 20 a page. No page-size parameter is
  documented; `pageSize` (the envelope's own field name) is sent as a hint and paging
  follows `hasNextPage`, so it works if the server ignores it. After the first page (which
  gives `totalPages`), `CLIENTSYNC_LSP_EXPERT_PAGE_READS` pages (default 4) are read at once,
  yielded in order. Any other answer shape is a `PermanentError` naming it.
- Identity lookups read every page; the lookups of concurrent jobs share passes over them
  (`worker.providers.shared`), never a pass that began before the lookup asked.

Calls: create 1 (+1 per contact, +1 to archive, +1 GET when either happened); update 1
(+1 per contact change, +1 GET when one happened); delete 1.

Unconfirmed [?]: the client paths themselves, JSON bodies (the docs' examples are
form-encoded), "" as "clear", the read shape of `address` beyond `name`, error codes for
401/422/429, rate limits (none documented), the contact update/delete routes, whether
unknown body fields are rejected.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, ClassVar

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from worker.errors import LocalValidationError, PermanentError, ProviderError
from worker.models import Address, Client, Contact, mask_email
from worker.providers.base import Identity, ProviderAdapter, ProviderConfig, RemoteClient, wire_text
from worker.providers.shared import SharedScan

CLIENTS = "/v2/clients"
_CONTACT_KEYS = ("fullName", "email", "phone")


class LSPExpertConfig(ProviderConfig):
    """`CLIENTSYNC_LSP_EXPERT_*`: the API key from the app's "API settings"."""

    model_config = SettingsConfigDict(env_prefix="CLIENTSYNC_LSP_EXPERT_", extra="ignore", frozen=True)

    api_key: SecretStr | None = None
    page_reads: int = Field(
        4, ge=1, le=16,
        description="List pages read at once after the first (an identity lookup reads every page: no list filter "
        "is documented). 1 reads them one after another.",
    )

    def is_configured(self) -> bool:
        return bool(self.api_key and self.api_key.get_secret_value())

    def missing(self) -> str:
        return "" if self.is_configured() else "set CLIENTSYNC_LSP_EXPERT_API_KEY (the API key)"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class _Contact(_Wire):
    id: str | None = None
    full_name: str = Field("", alias="fullName")
    email: str | None = None
    phone: str | None = None


class _AddressRead(_Wire):
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = Field(None, alias="postalCode")
    country: str | None = None


class _Currency(_Wire):
    code: str | None = None


class _Invoice(_Wire):
    currency: _Currency | None = None


class _ClientRead(_Wire):
    id: str
    name: str | None = None
    address: _AddressRead | None = None
    archived: bool = False
    contacts: list[_Contact] = []
    details: str | None = None
    invoice: _Invoice | None = None
    vat_number: str | None = Field(None, alias="vatNumber")
    national_id: str | None = Field(None, alias="nationalIdentificationNumber")


class LSPExpert(ProviderAdapter):
    name = "lsp_expert"
    title = "LSP.expert"
    settings_class = LSPExpertConfig
    default_url = "https://api.lsp.expert"
    config: LSPExpertConfig

    identity = Identity(
        stamp=None,
        unique=(),
        similar=("email", "name"),
        notes=(
            "No documented field is unique or filterable (docs.lsp.expert/clients, 'The Client object'; "
            "docs.lsp.expert/pagination documents only page/sort/direction), and none holds an external id: "
            "nothing is exact. A contact's email and the client's name are matched only after an unclear "
            "create, with the whole payload and createdAt; otherwise an operator decides."
        ),
    )

    field_map: ClassVar[dict[str, str]] = {
        "id": "derived: kept in clientsync's link (no documented field holds an external id; "
        "CLIENTSYNC_LSP_EXPERT_ID_FIELD can name one to stamp)",
        "kind": "not supported (an LSP.expert client has no kind)",
        "name": "sent as name (else first_name + last_name)",
        "first_name": "sent as the client's own contact fullName (contacts sub-resource)",
        "last_name": "sent as the client's own contact fullName (contacts sub-resource)",
        "email": "sent as the client's own contact email (an LSP.expert client has no email field)",
        "phone": "sent as the client's own contact phone (an LSP.expert client has no phone field)",
        "website": "not supported (no website field is documented)",
        "vat_number": "sent as vatNumber",
        "tax_id": "sent as nationalIdentificationNumber",
        "billing_address": "sent as addressLine1/addressLine2/addressCity/addressState/addressPostalCode/"
        "addressCountry",
        "shipping_address": "not supported (one address per client)",
        "currency": "sent as currency (a cleared currency is left as it was: '' is not a currency)",
        "locale": "not supported (the document language is a document-config id, not a locale)",
        "notes": "sent as details",
        "tags": "not supported (labels are not writable through the documented API)",
        "status": "sent as archived (update only: an archived client is created, then archived)",
        "contacts": "sent as /v2/clients/{id}/contacts (fullName, email, phone)",
    }

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        #: concurrent searches share passes over the pages (no list filter is documented)
        self._scan = SharedScan(self.list, self._record_keys)

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key.get_secret_value() if self.config.api_key else ""
        token = base64.b64encode(f"{key}:".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def parse_error(self, status: int, body: Any) -> tuple[str, dict[str, list[str]]]:
        # `{message, name, code, id}`; a 422 may add Mongoose-style `errors: {field: {message}}`.
        message, fields = super().parse_error(status, body)
        if isinstance(body, dict) and isinstance(body.get("errors"), dict):
            fields = {
                str(k): [str(v.get("message", v)) if isinstance(v, dict) else str(v)]
                for k, v in body["errors"].items()
            }
        return message, fields

    # --- mapping -------------------------------------------------------------------------
    def validate(self, client: Client) -> None:
        if not client.display_name:
            raise LocalValidationError(
                "name is required by LSP.expert: set client.name or first_name/last_name",
                provider=self.name,
                field_errors={"name": ["required (client.name, or first_name/last_name)"]},
            )

    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        """The create body, or (with `existing`) the partial update body."""
        return self._body(client, update=existing is not None)

    def _body(self, client: Client, *, update: bool) -> dict[str, Any]:
        a = client.billing_address
        body: dict[str, Any] = {
            "name": client.display_name, "vatNumber": client.vat_number,
            "nationalIdentificationNumber": client.tax_id, "currency": client.currency,
            "details": client.notes,
            "addressLine1": a and a.line1, "addressLine2": a and a.line2, "addressCity": a and a.city,
            "addressState": a and a.region, "addressPostalCode": a and a.postal_code,
            "addressCountry": a and a.country,
        }  # fmt: skip
        kept = {k: v for k, v in body.items() if v is not None}
        if self.stamp_field:
            kept[self.stamp_field] = self.stamp_value(client.id)
        if not update:
            return kept
        # a partial PUT keeps omitted fields: say "empty" for what the source cleared (not currency)
        cleared = {k: "" for k, v in body.items() if v is None and k != "currency" and k != self.stamp_field}
        return kept | cleared | {"archived": client.status == "archived"}

    def contacts_to_wire(self, client: Client) -> list[dict[str, str]]:
        """The contacts to hold at LSP.expert ("" = none); the client's own email/phone lead."""
        out = [
            {"fullName": _full_name(c.first_name, c.last_name) or c.email or "", "email": c.email or "",
             "phone": c.phone or (client.phone if c.email and c.email == client.email else None) or ""}
            for c in client.contacts
        ]  # fmt: skip
        own_listed = client.email is not None and any(c.email == client.email for c in client.contacts)
        if (client.email or client.phone) and not own_listed:
            full = _full_name(client.first_name, client.last_name) or client.display_name or client.email
            out.insert(0, {"fullName": full or "", "email": client.email or "", "phone": client.phone or ""})
        return [c for c in out if c["fullName"]]

    def from_wire(self, data: dict[str, Any]) -> Client:
        w = _ClientRead.model_validate(data)
        a = w.address
        address = (
            Address(line1=a.line1, line2=a.line2, city=a.city, region=a.state,
                    postal_code=a.postal_code, country=a.country)
            if a and a.country else None
        )  # fmt: skip
        contacts = tuple(
            Contact(first_name=c.full_name.partition(" ")[0] or None,
                    last_name=c.full_name.partition(" ")[2] or None, email=c.email, phone=c.phone)
            for c in w.contacts if c.full_name or c.email
        )  # fmt: skip
        own = contacts[0] if contacts else None
        currency = w.invoice.currency.code if w.invoice and w.invoice.currency else None
        stamp = self.stamp_field
        return Client(
            id=w.id, name=w.name, email=own and own.email, phone=own and own.phone,
            vat_number=w.vat_number, tax_id=w.national_id, billing_address=address,
            currency=currency, notes=None if stamp == "details" else w.details, contacts=contacts,
            status="archived" if w.archived else "active",
        )  # fmt: skip

    def created_at(self, remote: RemoteClient) -> float | None:
        """`createdAt` (ISO 8601), documented on the client object."""
        return _timestamp(remote.data.get("createdAt"))

    # --- operations ----------------------------------------------------------------------
    async def create(self, client: Client) -> RemoteClient:
        self.validate(client)
        data = self._record(await self.request("POST", CLIENTS, json_body=self._body(client, update=False)), "POST")
        remote_id = str(data["id"])
        changed = await self._sync_contacts(remote_id, client, _contacts_of(data))
        if client.status == "archived":
            await self.request("PUT", f"{CLIENTS}/{remote_id}", json_body={"archived": True})
            changed = True
        return await self.get(remote_id) if changed else RemoteClient(id=remote_id, data=data)

    async def update(self, remote_id: str, client: Client) -> RemoteClient:
        self.validate(client)
        answer = await self.request("PUT", f"{CLIENTS}/{remote_id}", json_body=self._body(client, update=True))
        data = self._record(answer, "PUT")
        if not isinstance(data.get("contacts"), list):
            data = (await self.get(remote_id)).data  # the answer did not carry the contacts
        changed = await self._sync_contacts(remote_id, client, _contacts_of(data))
        return await self.get(remote_id) if changed else RemoteClient(id=str(data["id"]), data=data)

    async def delete(self, remote_id: str) -> None:
        await self.request("DELETE", f"{CLIENTS}/{remote_id}")

    async def get(self, remote_id: str) -> RemoteClient:
        data = self._record(await self.request("GET", f"{CLIENTS}/{remote_id}"), "GET")
        return RemoteClient(id=str(data["id"]), data=data)

    async def search(self, key: str, value: str) -> list[RemoteClient]:
        """No list filter is documented: every page is read and matched exactly here."""
        return await self.search_any([(key, value)])

    async def search_any(self, searches: Sequence[tuple[str, str]]) -> list[RemoteClient]:
        """Every search reads the same pages (no filter): one pass serves them all, and the
        searches of concurrent jobs share passes (`worker.providers.shared`)."""
        return await self._scan.search(k for key, value in searches if (k := self._search_key(key, value)) is not None)

    def _search_key(self, key: str, value: str) -> tuple[str, str] | None:
        """The exact key one search asks for (None: nothing can match, e.g. no stamp field)."""
        want = value.strip()
        if not want:
            return None
        if key == "stamp":
            return None if self.stamp_field is None else ("stamp", want)
        if key == "email":
            return ("email", want.casefold())
        if key == "name":
            return ("name", want)
        raise ValueError(f"{self.name} cannot search by {key!r}")

    def _record_keys(self, remote: RemoteClient) -> list[tuple[str, str]]:
        """The keys a listed record answers to, normalised as `_search_key` normalises a search."""
        name = wire_text(remote.data.get("name"))
        out = [("name", name)] if name else []
        out += [("email", e) for c in _contacts_of(remote.data) if (e := str(c.get("email") or "").strip().casefold())]
        if self.stamp_field is not None and (stamp := self.stamped(remote)) is not None:
            out.append(("stamp", stamp))
        return out

    async def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        """Every client, in the provider's order. The first page says how many pages there are;
        the rest are read `config.page_reads` at a time (in order), and paging then follows the
        last page's `hasNextPage` in case the account grew meanwhile."""
        first = await self._page(1, page_size)
        for record in first["items"]:
            yield record
        if not _has_next(first, 1):
            return
        page, total = 2, _total_pages(first, 1)
        while True:
            batch = range(page, max(page, min(total, page + self.config.page_reads - 1)) + 1)
            answers = await asyncio.gather(*(self._page(p, page_size) for p in batch), return_exceptions=True)
            for p, data in zip(batch, answers, strict=True):
                if isinstance(data, BaseException):
                    raise data
                for record in data["items"]:
                    yield record
                if not _has_next(data, p):
                    return
                total = max(total, _total_pages(data, p))
            page = batch[-1] + 1

    async def _page(self, page: int, page_size: int) -> dict[str, Any]:
        """One list page, its items as records."""
        data = await self.request("GET", CLIENTS, params={"page": page, "pageSize": page_size})
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            raise PermanentError(
                f"GET {CLIENTS} answered {_shape(data)}; the documented page is "
                "{items, page, totalPages, hasNextPage, ...}",
                provider=self.name,
            )
        items = []
        for item in data["items"]:
            record = self._record(item, "GET (list item)")
            items.append(RemoteClient(id=str(record["id"]), data=record))
        return {**data, "items": items}

    # --- helpers -------------------------------------------------------------------------
    def _record(self, body: Any, what: str) -> dict[str, Any]:
        if not isinstance(body, dict) or not body.get("id"):
            raise PermanentError(f"{what} {CLIENTS} answered {_shape(body)}, not a client", provider=self.name)
        return body

    async def _sync_contacts(self, remote_id: str, client: Client, held: Sequence[dict[str, Any]]) -> bool:
        """Make the held contacts the wanted ones; True when a call was made."""
        path = f"{CLIENTS}/{remote_id}/contacts"
        wanted = self.contacts_to_wire(client)
        pairs, missing, extra = _pair(wanted, list(held))
        # The client's own contact named after the company (no person name given): that name is
        # only a placeholder for the required fullName, so a rename does not touch the contact.
        placeholder = wanted[0] if wanted and _is_placeholder(client, wanted[0]) else None
        changed = False
        for want, have in pairs:
            compare = {k: v for k, v in want.items() if not (want is placeholder and k == "fullName")}
            if any(str(have.get(k) or "") != v for k, v in compare.items()):
                if not await self._contact_call(remote_id, "PUT", str(have["id"]), compare):
                    missing.append(want)  # removed meanwhile: post it again
                changed = True
        for want in missing:
            await self.request("POST", path, json_body={k: v for k, v in want.items() if v})
            changed = True
        for have in extra:
            await self._contact_call(remote_id, "DELETE", str(have["id"]), None)
            changed = True
        return changed

    async def _contact_call(self, remote_id: str, method: str, contact_id: str, body: Any) -> bool:
        """PUT/DELETE one contact (routes not documented); False when the contact is gone."""
        route = f"{CLIENTS}/{remote_id}/contacts/{contact_id}"
        try:
            await self.request(method, route, json_body=body)
            return True
        except ProviderError as exc:
            if exc.status not in (404, 405):
                raise
            # A 404 here may be the route, the contact or the client: look before saying which.
            current = await self.get(remote_id)  # NotFound: the client really is gone
            if all(str(c.get("id")) != contact_id for c in _contacts_of(current.data)):
                return False
            held = next(c for c in _contacts_of(current.data) if str(c.get("id")) == contact_id)
            raise PermanentError(
                f"LSP.expert answered {exc.status} to {method} {route}: this account does not offer that "
                "contact route (it is not in the documented API), so contact "
                f"{mask_email(str(held.get('email') or '')) or held.get('fullName')!s} cannot be "
                f"{'changed' if method == 'PUT' else 'removed'} through the API; the client itself "
                "exists and its own fields were updated. Change the contact in the LSP.expert app.",
                provider=self.name, status=exc.status,
            ) from exc


def _pair(
    wanted: list[dict[str, str]], held: list[dict[str, Any]]
) -> tuple[list[tuple[dict[str, str], dict[str, Any]]], list[dict[str, str]], list[dict[str, Any]]]:
    """(wanted, held) pairs by email, then full name, then in order; the unpaired of each side."""
    pairs: list[tuple[dict[str, str], dict[str, Any]]] = []
    free = list(held)
    left = list(wanted)
    for key in ("email", "fullName"):
        for want in list(left):
            value = want[key].strip().casefold()
            have = next((h for h in free if value and str(h.get(key) or "").strip().casefold() == value), None)
            if have is not None:
                pairs.append((want, have))
                free.remove(have)
                left.remove(want)
    while left and free:
        pairs.append((left.pop(0), free.pop(0)))
    return pairs, left, free


def _is_placeholder(client: Client, own: dict[str, str]) -> bool:
    """Whether `own` is the client's own contact named only after the company."""
    person = _full_name(client.first_name, client.last_name)
    listed = any(c.email and c.email == own["email"] for c in client.contacts)
    return not person and not listed and own["email"] == (client.email or "") and own["phone"] == (client.phone or "")


def _has_next(page: dict[str, Any], number: int) -> bool:
    """Whether a page after `number` exists, as the envelope says (`hasNextPage`, `totalPages`)."""
    return bool(page.get("hasNextPage")) and number < _total_pages(page, number)


def _total_pages(page: dict[str, Any], number: int) -> int:
    try:
        return int(page.get("totalPages") or number)
    except (TypeError, ValueError):
        return number


def _contacts_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    contacts = data.get("contacts")
    return [c for c in contacts if isinstance(c, dict)] if isinstance(contacts, list) else []


def _full_name(first: str | None, last: str | None) -> str:
    return " ".join(p for p in (first, last) if p)


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _shape(body: Any) -> str:
    """A short description of an unexpected answer (its keys, never its values)."""
    if isinstance(body, dict):
        return "an object with keys " + (", ".join(sorted(map(str, body))) or "(none)")
    if isinstance(body, list):
        return f"an array of {len(body)}"
    return "nothing" if body is None else f"a {type(body).__name__}"

