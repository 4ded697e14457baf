"""What every provider adapter shares: settings, HTTP, error classification, the interface.

An adapter declares its API (paths, auth, wire mapping); all HTTP goes through
`ProviderAdapter.request`, which turns every outcome into data or a typed error in one
fixed order (see `classify`). Adapters never retry: the task layer owns retries.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import aiohttp
import orjson
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import (
    AuthError,
    NotFound,
    PermanentError,
    ProviderError,
    ProviderUnavailable,
    ProviderValidationError,
    RateLimitedError,
    TransientError,
)
from worker.lease import at_provider, check_lease, count_call, count_write
from worker.models import Client

#: every digit as '0', every other byte as it is: a run of 19 digits becomes 19 zeros
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19


def _decode(raw: bytes) -> Any:
    """A provider's answer as JSON, else its text: what the standard library's parser reads.

    orjson reads it in about 40% of the time (LSP.expert's pages, read whole for every identity
    pass, were a tenth of the worker loop's time), and reads the same values, except an integer
    past 64 bits, which it turns into a float: that would silently change a record id
    (tests/providers/test_contract.py). An answer with a run of 19 or more digits anywhere
    (such an integer needs one; a long digit string in a text value costs only the slower path)
    and whatever orjson refuses (NaN, a lone surrogate, 1e400) take the standard library.
    """
    if _NINETEEN_DIGITS not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


class ProviderConfig(BaseSettings):
    """Settings every provider has. Subclasses add credentials and set `env_prefix`."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, env_ignore_empty=True)

    url: str | None = Field(None, description="Base URL; unset = the provider's public API.")
    timeout: float = Field(15.0, gt=0, description="Seconds for one HTTP call.")
    rate_limit: int | None = Field(None, ge=1, description="Calls per rate_period, all workers together.")
    rate_period: float = Field(1.0, gt=0)
    max_attempts: int | None = Field(None, ge=1, description="Overrides CLIENTSYNC_MAX_ATTEMPTS.")
    settle_seconds: float | None = Field(
        None,
        gt=0,
        description="After a write ends unclearly (timeout, 5xx, dropped connection) it may still land for "
        "this long; no write to that client starts before. Unset = twice the timeout.",
    )
    id_field: str | None = Field(
        None,
        description="Provider field stamped with the source client id (unset = the adapter's default; "
        "'none' = no stamp). Whatever the field held is overwritten on every write.",
    )
    retry_base: float | None = Field(None, gt=0)
    retry_cap: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_unset(cls, data: Any) -> Any:
        # Compose and .env files pass unset variables as "": a blank value is no value, so a
        # provider is never enabled (nor a default replaced) by an empty string.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
        return data

    def is_configured(self) -> bool:
        """True when the credentials this provider needs are set."""
        raise NotImplementedError

    def missing(self) -> str:
        """Which env vars to set, for the start-up message of a disabled provider."""
        raise NotImplementedError


@dataclass(frozen=True)
class Identity:
    """How a provider record is recognised as one source client's (DESIGN.md, rule 3).

    Data, not code: `worker.identity` is the one mechanism that uses it. In order of trust:

    - `stamp`: a provider field clientsync writes the source client id into on every create
      and update, and can search exactly (None when the API has no such field). A record
      stamped with another id is never this client's.
    - `unique`: canonical `Client` fields the provider itself keeps unique per account
      (e.g. a login email): a match on them is exact.
    - `similar`: canonical fields the provider can be searched by that are NOT unique (an email
      at most providers, a name). Used only to settle a create whose answer was lost: a
      candidate must then carry the whole payload that was sent, be created at or after the
      recorded intent and be linked to nobody.
    - `notes`: the evidence (doc pages, sections), rendered into the README's identity table.
    """

    stamp: str | None = None
    unique: tuple[str, ...] = ()
    similar: tuple[str, ...] = ()
    notes: str = ""


@dataclass(frozen=True)
class RemoteClient:
    """A client as a provider stores it: its id there and the wire record."""

    id: str
    data: dict[str, Any] = field(default_factory=dict)


def wire_text(value: Any) -> str | None:
    """A provider's field as optional text: None, blanks and whitespace become None."""
    text = str(value).strip() if value is not None else ""
    return text or None


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or HTTP date) or a rate-limit reset header."""
    now = time.time() if now is None else now
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError, IndexError):
                return None
    for name in ("X-RateLimit-Reset", "RateLimit-Reset", "X-Rate-Limit-Reset"):
        value = headers.get(name)
        if not value:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        # A reset header is either an epoch timestamp or seconds from now.
        return max(0.0, number - now) if number > 1_000_000_000 else max(0.0, number)
    return None


def classify(
    status: int,
    headers: Mapping[str, str],
    message: str,
    field_errors: dict[str, list[str]],
    *,
    provider: str,
    busy_on_409: bool = False,
) -> ProviderError:
    """Turn a non-2xx answer into a typed error; the order of the checks is the policy."""
    kw: dict[str, Any] = {"provider": provider, "status": status, "field_errors": field_errors}
    if status == 429:
        return RateLimitedError(message or "rate limited", retry_after=retry_after_seconds(headers), **kw)
    if status >= 500 or status == 408:
        return ProviderUnavailable(message or "server error", retry_after=retry_after_seconds(headers), **kw)
    if status == 409 and busy_on_409:
        return TransientError(message or "busy", retry_after=retry_after_seconds(headers), **kw)
    if status in (401, 403):
        return AuthError(message or "authentication failed", **kw)
    if status == 404:
        return NotFound(message or "not found", **kw)
    if status in (400, 422):
        return ProviderValidationError(message or "invalid request", **kw)
    return PermanentError(message or f"unexpected status {status}", **kw)


class ProviderAdapter(ABC):
    """One provider's Clients API. Subclasses declare; the base does the HTTP."""

    #: registry name (see `worker.models.PROVIDER_NAMES`)
    name: ClassVar[str]
    title: ClassVar[str]
    settings_class: ClassVar[type[ProviderConfig]]
    default_url: ClassVar[str]
    #: a 409 from this provider means "busy, try again" rather than a business rule
    busy_on_409: ClassVar[bool] = False
    #: how a record is recognised as one source client's (see `Identity`)
    identity: ClassVar[Identity] = Identity()
    #: canonical `Client` field -> how this provider takes it: "sent as <wire field> ...",
    #: "derived: ..." or "not supported ..." (docs/providers.md is generated from it)
    field_map: ClassVar[dict[str, str]] = {}
    #: written before the source id in the stamp field, so a value the provider or a person put
    #: there (Invoice Ninja numbers every client itself) is never read as a source id
    STAMP_PREFIX: ClassVar[str] = "cs:"

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.base_url = (config.url or self.default_url).rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        #: awaited with the provider name before every HTTP call; the worker runtime sets it to
        #: take a token from the shared rate limit (it may wait, or raise to park the job)
        self.before_call: Callable[[str], Awaitable[None]] | None = None

    # --- hooks -------------------------------------------------------------------------
    @abstractmethod
    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate every call."""

    def parse_error(self, status: int, body: Any) -> tuple[str, dict[str, list[str]]]:
        """The provider's own message and field errors from an error body."""
        if isinstance(body, dict):
            message = str(body.get("message") or body.get("error") or "")
            raw = body.get("errors")
            errors: dict[str, list[str]] = {}
            if isinstance(raw, dict):
                for key, value in raw.items():
                    errors[str(key)] = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            return message, errors
        return (str(body)[:500] if body else ""), {}

    def refine_error(self, error: ProviderError, body: Any) -> ProviderError:
        """Adjust a classified error to a provider's quirks (e.g. a 400 that means not found)."""
        return error

    # --- HTTP (the only place that does it) ----------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One HTTP call; returns the decoded JSON (or None for an empty body) or raises."""
        url = f"{self.base_url}{path}"
        check_lease()  # a job that lost its lease on the client makes no further call
        if self.before_call is not None:
            await self.before_call(self.name)
            check_lease()  # the wait for a rate-limit slot may have outlasted the lease
        count_call()
        all_headers = {"Accept": "application/json", **self.auth_headers(), **(headers or {})}
        try:
            with at_provider():
                async with self.session.request(
                    method, url, json=json_body, params=params, headers=all_headers, timeout=self._timeout
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    resp_headers = resp.headers
        except TimeoutError as exc:
            timed_out = ProviderUnavailable(f"timed out after {self.config.timeout:g}s", provider=self.name)
            timed_out.unclear = method != "GET"  # the provider may still apply it
            raise timed_out from exc
        except aiohttp.ClientError as exc:
            failed = ProviderUnavailable(f"connection failed: {exc}", provider=self.name)
            # Refused before anything was sent is clear; a connection lost after sending is not.
            failed.unclear = method != "GET" and not isinstance(exc, aiohttp.ClientConnectorError)
            raise failed from exc
        body: Any = None
        if raw:
            body = _decode(raw)
        if 200 <= status < 300:
            if method != "GET":
                count_write()
            return body
        message, field_errors = self.parse_error(status, body)
        error = self.refine_error(classify(
            status, resp_headers, message, field_errors, provider=self.name, busy_on_409=self.busy_on_409
        ), body)
        error.unclear = method != "GET" and (status >= 500 or status == 408)
        raise error

    # --- the Clients API ---------------------------------------------------------------
    def validate(self, client: Client) -> None:  # noqa: B027 - optional hook: most providers check little
        """Raise `LocalValidationError` naming the field and rule if the provider would reject it."""

    @abstractmethod
    def to_wire(self, client: Client, *, existing: RemoteClient | None = None) -> dict[str, Any]:
        """The provider's payload for `client`; `existing` is the current record on update."""

    @abstractmethod
    def from_wire(self, data: dict[str, Any]) -> Client:
        """The canonical view of a provider record (its `id` is the provider's id)."""

    @abstractmethod
    async def create(self, client: Client) -> RemoteClient: ...

    @abstractmethod
    async def update(self, remote_id: str, client: Client) -> RemoteClient: ...

    @abstractmethod
    async def delete(self, remote_id: str) -> None:
        """Delete at the provider; raise `Unsupported` if it has no delete."""

    @abstractmethod
    async def get(self, remote_id: str) -> RemoteClient:
        """Fetch one client; raise `NotFound` if the provider does not know it."""

    def unsupported_fields(self, client: Client) -> list[str]:
        """The canonical fields set on `client` (not at their default) that this provider cannot
        take, per `field_map`; recorded on the job so nothing is dropped silently. Adapters add
        the cases a field map cannot say (a value of the right field in a form it cannot hold)."""
        return [
            name for name, how in self.field_map.items()
            if name != "id" and how.startswith("not supported")
            and getattr(client, name) not in (None, "", (), Client.model_fields[name].default)
        ]  # fmt: skip

    # --- identity (data for `worker.identity`; see `Identity`) ---------------------------
    @property
    def stamp_field(self) -> str | None:
        """The field stamped with the source client id: the declared one unless the user chose
        another (`CLIENTSYNC_<PROVIDER>_ID_FIELD`) or turned stamping off (`none`)."""
        chosen = getattr(self.config, "id_field", None)
        if chosen is None:
            return self.identity.stamp
        return None if chosen.lower() == "none" else chosen

    async def search(self, key: str, value: str) -> list[RemoteClient]:
        """Every live record whose `key` equals `value` exactly (the adapter re-checks locally
        whatever the API's filter does). `key` is "stamp" or a canonical field named in
        `identity.unique` / `identity.similar`; for "stamp" the value is the source client id (search
        for `stamp_value(value)`). An answer of an unknown shape raises
        `PermanentError`, never an empty list."""
        raise NotImplementedError(f"{self.name} declares no searchable identity keys")

    async def search_any(self, searches: Sequence[tuple[str, str]]) -> list[RemoteClient]:
        """Records matching any of the `(key, value)` searches, each once, in the order of the
        searches and then of each one's answer. One `search` per pair here, all at once (they are
        reads: a create waits for the slowest, not for their sum); an adapter whose searches all
        read the same list (no API filter) overrides this with a single pass. A search that fails
        fails the lot, after the others have ended (none is left running)."""
        answers = await asyncio.gather(*(self.search(key, value) for key, value in searches),
                                       return_exceptions=True)
        found: dict[str, RemoteClient] = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            for remote in answer:
                found.setdefault(remote.id, remote)
        return list(found.values())

    def stamp_value(self, client_id: str) -> str:
        """What the stamp field holds for `client_id` (written on create and update, searched exactly)."""
        return f"{self.STAMP_PREFIX}{client_id}"

    def stamped(self, remote: RemoteClient) -> str | None:
        """The source client id clientsync stamped in a record (None: no stamp of ours, or no
        stamp field). A value without our prefix is someone else's use of the field."""
        field_name = self.stamp_field
        if field_name is None:
            return None
        raw = wire_text(remote.data.get(field_name))
        if raw is None or not raw.startswith(self.STAMP_PREFIX):
            return None
        return raw[len(self.STAMP_PREFIX):] or None

    def created_at(self, remote: RemoteClient) -> float | None:
        """When the provider created the record (unix seconds), if it says."""
        return None

    def same_payload(self, remote: RemoteClient, client: Client) -> bool:
        """True when `remote` holds everything a create of `client` sends (the test a candidate
        found by non-unique fields must pass before it is adopted after an unclear create)."""
        return self.to_wire(self.from_wire(remote.data).model_copy(update={"id": client.id})) == self.to_wire(client)

    @abstractmethod
    def list(self, *, page_size: int = 100) -> AsyncIterator[RemoteClient]:
        """Every client, page by page."""
