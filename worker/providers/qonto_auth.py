"""Qonto's OAuth 2 access token: kept where every worker sees it, refreshed once, before it expires.

Facts from Qonto's docs (docs.qonto.com, "OAuth" > "Token endpoint" and "Refresh token
endpoint"; API reference "Create or refresh tokens"):

- `POST https://oauth.qonto.com/oauth2/token`, `application/x-www-form-urlencoded`, with
  `client_id`, `client_secret`, `grant_type=refresh_token`, `refresh_token` (the sandbox also
  needs `X-Qonto-Staging-Token`; an HTML answer means it is missing).
- The access token lives 1 hour (`expires_in: 3600`), the refresh token 90 days. Every refresh
  answers a NEW refresh token and invalidates the old one after a 60-second grace period, so
  the current refresh token must be stored with the access token (the configured one is only
  the seed) and shared by every worker.
- "Always opt for a proactive refresh vs a reactive refresh": refresh before expiry.

How clientsync does it:

- The token set (access token, refresh token, expiry, the seed it came from) lives in a
  `TokenStore`: `RedisTokenStore` in workers (keys in `worker.keys`), `MemoryTokenStore` in one
  process (CLI, tests). A changed `CLIENTSYNC_QONTO_REFRESH_TOKEN` (a new seed) wins over
  whatever is stored: that is how an operator repairs a refused refresh.
- Single flight: a worker that finds the token stale (within `leeway` seconds of expiry) takes
  a lock (SET NX with a lease); the others wait for its result instead of refreshing too. The
  result and the unlock are one Lua call.
- A refused refresh (`invalid_grant`, `invalid_client`, ...) raises `AuthError` naming the
  variables to fix, and is recorded with the seed, so other workers raise it at once rather
  than spending the (already dead) refresh token again. A transient failure (5xx, 429, timeout)
  raises a `TransientError` and records nothing. If a refresh's answer is lost, the old refresh
  token still works during Qonto's 60-second grace period, so the retry recovers.

authlib supplies the token model (`OAuth2Token`: `expires_at` from `expires_in`, `is_expired`)
and the token request body; aiohttp (the worker's pooled session) does the HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from worker import keys
from worker.errors import AuthError, PermanentError, ProviderError, ProviderUnavailable
from worker.providers.base import classify

DEFAULT_TOKEN_URL = "https://oauth.qonto.com/oauth2/token"  # noqa: S105 - a URL, not a secret
#: RFC 6749 section 5.2 errors that mean "these credentials will not work": fix them, don't retry
REFUSALS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_request", "unsupported_grant_type",
     "invalid_scope"}
)  # fmt: skip
FIX = (
    "set a fresh CLIENTSYNC_QONTO_REFRESH_TOKEN (and check CLIENTSYNC_QONTO_CLIENT_ID / "
    "CLIENTSYNC_QONTO_CLIENT_SECRET); the provider stays paused until then"
)
POLL_SECONDS = 0.05


class TokenStore(ABC):
    """Where the current token set lives, with a lock so one caller refreshes at a time."""

    lock_seconds: float = keys.OAUTH_REFRESH_LOCK_SECONDS

    @abstractmethod
    async def load(self) -> dict[str, str]:
        """The stored fields (empty when nothing is stored)."""

    @abstractmethod
    async def acquire(self, owner: str) -> bool:
        """Take the refresh lock (with a lease) if nobody holds it."""

    @abstractmethod
    async def save_and_release(self, owner: str, fields: dict[str, str]) -> None:
        """Replace the stored fields and release the lock if `owner` still holds it."""


class MemoryTokenStore(TokenStore):
    """One process only (the CLI, tests): what a worker without Redis falls back to."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self._owner: str | None = None
        self._until = 0.0

    async def load(self) -> dict[str, str]:
        return dict(self.fields)

    async def acquire(self, owner: str) -> bool:
        if self._owner is not None and time.monotonic() < self._until:
            return False
        self._owner, self._until = owner, time.monotonic() + self.lock_seconds
        return True

    async def save_and_release(self, owner: str, fields: dict[str, str]) -> None:
        self.fields = dict(fields)
        if self._owner == owner:
            self._owner = None


_SAVE_AND_RELEASE = """
-- KEYS[1] token hash, KEYS[2] lock; ARGV[1] owner, ARGV[2] ttl seconds, ARGV[3] JSON fields
redis.call('DEL', KEYS[1])
local fields = cjson.decode(ARGV[3])
for name, value in pairs(fields) do redis.call('HSET', KEYS[1], name, value) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


class RedisTokenStore(TokenStore):
    """Shared by every worker process: the token hash and the refresh lock in Redis."""

    def __init__(self, redis: aioredis.Redis, provider: str = "qonto") -> None:
        self.redis = redis
        self.key = keys.oauth_token(provider)
        self.lock_key = keys.oauth_refresh_lock(provider)
        self._save = redis.register_script(_SAVE_AND_RELEASE)

    async def load(self) -> dict[str, str]:
        raw: dict[Any, Any] = await self.redis.hgetall(self.key)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def acquire(self, owner: str) -> bool:
        return bool(await self.redis.set(self.lock_key, owner, nx=True, ex=int(self.lock_seconds)))

    async def save_and_release(self, owner: str, fields: dict[str, str]) -> None:
        await self._save(keys=[self.key, self.lock_key],
                         args=[owner, keys.OAUTH_TOKEN_TTL_SECONDS, json.dumps(fields)])  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class QontoOAuth:
    """Hands out a valid access token, refreshing it (once, for everyone) shortly before expiry."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        token_url: str,
        session: aiohttp.ClientSession,
        timeout: float,
        leeway: float,
        staging_token: str | None = None,
        provider: str = "qonto",
    ) -> None:
        self.client_id = client_id
        self._client_secret = client_secret
        self._seed_token = refresh_token
        self.token_url = token_url
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.leeway = leeway
        self.staging_token = staging_token
        self.provider = provider
        self.store: TokenStore = MemoryTokenStore()
        #: which configured credentials a stored token came from: new credentials win over it
        self.seed = hashlib.sha256(f"{client_id}\x1f{refresh_token}".encode()).hexdigest()[:24]

    def _fresh(self, fields: dict[str, str], stale: str | None) -> str | None:
        """The stored access token if it came from our seed and is not about to expire."""
        if fields.get("seed") != self.seed or not fields.get("access_token"):
            return None
        if stale is not None and fields["access_token"] == stale:
            return None  # the API refused this one: it is not fresh whatever its expiry says
        token = OAuth2Token({"access_token": fields["access_token"], "expires_at": fields.get("expires_at")})
        if token.is_expired(leeway=int(self.leeway)) is not False:
            return None
        return fields["access_token"]

    def _refused(self, fields: dict[str, str]) -> AuthError | None:
        if fields.get("seed") == self.seed and fields.get("refused"):
            return AuthError(fields["refused"], provider=self.provider)
        return None

    async def access_token(self, *, stale: str | None = None) -> str:
        """A valid access token. `stale`: one the API just refused (401), to be replaced."""
        deadline = time.monotonic() + 2 * self.store.lock_seconds + 5
        owner = uuid.uuid4().hex
        while True:
            fields = await self.store.load()
            if (token := self._fresh(fields, stale)) is not None:
                return token
            if (refused := self._refused(fields)) is not None:
                raise refused
            if await self.store.acquire(owner):
                return await self._refresh_holding_lock(owner, stale)
            if time.monotonic() > deadline:
                raise ProviderUnavailable(
                    "timed out waiting for another worker's OAuth token refresh", provider=self.provider
                )
            await asyncio.sleep(POLL_SECONDS)  # another worker is refreshing: wait for its result

    async def _refresh_holding_lock(self, owner: str, stale: str | None) -> str:
        fields = await self.store.load()  # re-read: the previous holder may have just finished
        if (token := self._fresh(fields, stale)) is not None:
            await self.store.save_and_release(owner, fields)
            return token
        current = fields.get("refresh_token") if fields.get("seed") == self.seed else None
        try:
            issued = await self._call(current or self._seed_token)
        except AuthError as exc:
            await self.store.save_and_release(owner, {"seed": self.seed, "refused": exc.message})
            raise
        except BaseException:
            await self.store.save_and_release(owner, fields)  # unchanged: just let go of the lock
            raise
        await self.store.save_and_release(owner, {
            "seed": self.seed, "access_token": issued["access_token"],
            "refresh_token": issued.get("refresh_token") or current or self._seed_token,
            "expires_at": str(issued.get("expires_at") or ""),
        })  # fmt: skip
        return str(issued["access_token"])

    async def _call(self, refresh_token: str) -> OAuth2Token:
        """One refresh at Qonto's token endpoint; every outcome is a token or a typed error."""
        body = prepare_token_request(
            "refresh_token", refresh_token=refresh_token, client_id=self.client_id,
            client_secret=self._client_secret,
        )  # fmt: skip
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if self.staging_token:
            headers["X-Qonto-Staging-Token"] = self.staging_token
        try:
            async with self.session.post(self.token_url, data=body, headers=headers, timeout=self.timeout) as resp:
                status, raw, resp_headers = resp.status, await resp.read(), resp.headers
        except (TimeoutError, aiohttp.ClientError) as exc:
            failed = f"OAuth token refresh failed: {exc or 'timeout'}"
            raise ProviderUnavailable(failed, provider=self.provider) from exc
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            if 200 <= status < 300 or status in (301, 302):
                # Qonto's docs: an HTML answer from the token endpoint means a missing staging token
                raise AuthError(
                    f"Qonto's token endpoint answered {status} without JSON (in Qonto's sandbox this means "
                    "a missing X-Qonto-Staging-Token: set CLIENTSYNC_QONTO_STAGING_TOKEN)",
                    provider=self.provider, status=status,
                )  # fmt: skip
            raise classify(status, resp_headers, raw.decode("utf-8", "replace")[:200], {}, provider=self.provider)
        error = str(answer.get("error") or "")
        if error in REFUSALS or (status in (400, 401) and error):
            detail = str(answer.get("error_description") or answer.get("error_hint") or "").strip()
            raise AuthError(
                f"Qonto refused the OAuth token refresh ({error}{': ' + detail if detail else ''}): {FIX}",
                provider=self.provider, status=status,
            )  # fmt: skip
        if not 200 <= status < 300:
            err: ProviderError = classify(status, resp_headers, error or f"status {status}", {}, provider=self.provider)
            if isinstance(err, AuthError):
                err = AuthError(f"Qonto refused the OAuth token refresh (status {status}): {FIX}",
                                provider=self.provider, status=status)  # fmt: skip
            raise err
        kind = str(answer.get("token_type") or "").lower()
        if not answer.get("access_token") or kind != "bearer" or not answer.get("expires_in"):
            raise PermanentError(
                "Qonto's token endpoint answered an unknown shape (expected access_token, token_type "
                f"bearer and expires_in; got the keys {sorted(answer)})", provider=self.provider, status=status,
            )  # fmt: skip
        return OAuth2Token(dict(answer))
