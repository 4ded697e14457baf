"""The event contract: `ClientChange` and the canonical client, validated at every way in."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

import orjson
import pycountry
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    model_validator,
)

#: the provider names clientsync knows; settings and `providers` lists use these
PROVIDER_NAMES: tuple[str, ...] = (
    "request_finance",
    "invoice_ninja",
    "grow_crm",
    "lsp_expert",
    "qonto",
)
ProviderName = Literal["request_finance", "invoice_ninja", "grow_crm", "lsp_expert", "qonto"]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Ids travel in Redis keys and URLs: printable, no spaces, no slashes.
_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,199}$"


@lru_cache(maxsize=512)
def _is_country(code: str) -> bool:
    return pycountry.countries.get(alpha_2=code) is not None


@lru_cache(maxsize=512)
def _is_currency(code: str) -> bool:
    return pycountry.currencies.get(alpha_3=code) is not None


def _country(value: str) -> str:
    code = value.strip().upper()
    if len(code) != 2 or not _is_country(code):
        raise ValueError("must be an ISO 3166-1 alpha-2 country code, e.g. 'FR'")
    return code


def _currency(value: str) -> str:
    code = value.strip().upper()
    if len(code) != 3 or not _is_currency(code):
        raise ValueError("must be an ISO 4217 currency code, e.g. 'EUR'")
    return code


def _email(value: str) -> str:
    value = value.strip()
    if not _EMAIL.match(value) or len(value) > 254:
        raise ValueError("must be an email address like name@example.com")
    return value


#: the most contacts and tags one client may carry (documented in the README)
MAX_CONTACTS = 50
MAX_TAGS = 100
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: Any) -> Any:
    """Only an RFC 3339 string (a datetime object passes from Python callers): no Unix numbers."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time string with a timezone offset, e.g. '2024-05-01T12:00:00Z'")
    return value


Country = Annotated[str, AfterValidator(_country)]
Currency = Annotated[str, AfterValidator(_currency)]
Email = Annotated[str, AfterValidator(_email)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
Identifier = Annotated[str, StringConstraints(pattern=_ID)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class Address(_Frozen):
    """A postal address; `region` is the state/province (Italy: the 2-letter province code)."""

    line1: ShortText | None = None
    line2: ShortText | None = None
    city: ShortText | None = None
    region: ShortText | None = None
    postal_code: Annotated[str, StringConstraints(strip_whitespace=True, max_length=32)] | None = None
    country: Country


class Contact(_Frozen):
    """A person at the client. The first contact (or the one marked primary) is the primary."""

    first_name: ShortText | None = None
    last_name: ShortText | None = None
    email: Email | None = None
    phone: ShortText | None = None
    is_primary: bool = False


class Client(_Frozen):
    """The canonical client, as the source system knows it."""

    id: Identifier = Field(description="Stable id of the client in the source system.")
    kind: Literal["company", "individual"] = "company"
    name: ShortText | None = Field(None, description="Company or display name.")
    first_name: ShortText | None = None
    last_name: ShortText | None = None
    email: Email | None = None
    phone: ShortText | None = None
    website: ShortText | None = None
    vat_number: ShortText | None = None
    tax_id: ShortText | None = None
    billing_address: Address | None = None
    shipping_address: Address | None = None
    currency: Currency | None = None
    locale: Annotated[str, StringConstraints(pattern=r"^[a-z]{2}([_-][A-Za-z]{2})?$")] | None = None
    notes: Text | None = None
    tags: tuple[ShortText, ...] = Field((), max_length=MAX_TAGS)
    status: Literal["active", "archived"] = "active"
    contacts: tuple[Contact, ...] = Field((), max_length=MAX_CONTACTS)

    @property
    def primary_contact(self) -> Contact | None:
        for contact in self.contacts:
            if contact.is_primary:
                return contact
        return self.contacts[0] if self.contacts else None

    @property
    def display_name(self) -> str | None:
        """The company name, else the person's name."""
        if self.name:
            return self.name
        person = " ".join(p for p in (self.first_name, self.last_name) if p)
        return person or None


class ClientChange(_Frozen):
    """One change to one client: the contract for every way in (webhook, Celery job, CLI)."""

    event_id: Identifier = Field(description="The sender's id for this change; the dedupe key.")
    occurred_at: Annotated[AwareDatetime, BeforeValidator(_rfc3339)] = Field(
        description="When the change happened (RFC 3339 with offset).")
    version: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Optional monotonic version per client; wins over occurred_at."
    )
    action: Literal["upsert", "delete"]
    client: Client
    providers: tuple[ProviderName, ...] | None = Field(
        None, description="Restrict the change to these providers (default: every enabled one)."
    )

    @model_validator(mode="after")
    def _upsert_needs_a_name_or_email(self) -> ClientChange:
        c = self.client
        if self.action == "upsert" and not (c.display_name or c.email):
            raise ValueError("an upsert needs client.name, client.first_name/last_name or client.email")
        return self

    def fingerprint(self) -> str:
        """A stable hash of the change's content, used to detect idempotency-key reuse."""
        return fingerprint_of(self.model_dump(mode="json"))

    def order_mark(self) -> tuple[int, int]:
        """(version or -1, occurred_at in microseconds): what ordering compares."""
        return (self.version if self.version is not None else -1, to_micros(self.occurred_at))


def fingerprint_of(payload: dict[str, Any]) -> str:
    """`ClientChange.fingerprint` from the change's `model_dump(mode="json")`, for a caller that has it.

    Stored with event claims and idempotency keys for days: the canonical form must never change.
    It is `json.dumps(payload, sort_keys=True, separators=(",", ":"))`. orjson writes the same
    bytes, at about a fifth of the time, for what a `ClientChange` dumps to (strings, integers,
    booleans, nulls, lists, objects: no floats, which it writes differently; a test keeps floats
    out of the model) whenever its output is ASCII without DEL: it escapes control characters as
    the standard library does, but writes non-ASCII characters and DEL as they are, where the
    standard library escapes them. Anything else takes the standard library.
    """
    try:
        fast = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # integers past 64 bits, non-string keys
        fast = b""
    if fast and fast.isascii() and b"\x7f" not in fast:
        return hashlib.sha256(fast).hexdigest()
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def change_json_schema() -> dict[str, Any]:
    """The published JSON Schema of `ClientChange`."""
    schema = ClientChange.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/clientsync/clientsync/schema/client-change.json"
    return schema


# Bounded parts (RFC 5321 lengths): unbounded ones made masking a long text without '@'
# quadratic, and a 1 MB log line or queue entry wedged the process.
_ANY_EMAIL = re.compile(r"[^@\s\"'<>(),;:]{1,64}@[^@\s\"'<>(),;:]{1,255}\.[A-Za-z]{2,63}")


def mask_emails(text: str) -> str:
    """Every email address in free text (a provider's error message, an exception) masked."""
    return _ANY_EMAIL.sub(lambda m: mask_email(m.group(0)) or "", text)


def mask_email(email: str | None) -> str | None:
    """`jane.doe@example.com` -> `j***@e***.com`, for logs and dashboards."""
    if not email or "@" not in email:
        return email
    local, _, domain = email.partition("@")
    host, dot, tld = domain.rpartition(".")
    if not dot:
        host, tld = domain, ""
    return f"{local[:1]}***@{host[:1]}***{dot}{tld}"
