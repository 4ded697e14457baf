"""Every failure clientsync knows, as types; retryability is data on the type."""

from __future__ import annotations

from typing import ClassVar


class ClientSyncError(Exception):
    """Base of every clientsync error."""

    retryable: ClassVar[bool] = False
    #: short machine-readable class shown in the ledger and metrics
    kind: ClassVar[str] = "error"
    #: False for an error raised before its provider call left this process (our own rate
    #: limit had no slot for it): whatever that call would have written, nothing was sent
    sent: ClassVar[bool] = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProviderError(ClientSyncError):
    """A provider call failed; carries the provider's own status, message and field errors."""

    kind = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        field_errors: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        self.field_errors: dict[str, list[str]] = dict(field_errors or {})
        #: a write that may have been applied although we got no clear answer (5xx after
        #: sending, dropped connection, timeout): the client is unsettled at this provider
        self.unclear = False

    def __str__(self) -> str:
        head = f"{self.provider or 'provider'}"
        if self.status is not None:
            head += f" {self.status}"
        text = f"{head}: {self.message}"
        if self.field_errors:
            details = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(self.field_errors.items()))
            text += f" ({details})"
        return text


class TransientError(ProviderError):
    """Worth retrying: connection errors, timeouts, 5xx, 429, a busy 409."""

    retryable = True
    kind = "transient"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        #: seconds the server asked us to wait (Retry-After or a reset header), if any
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    """The provider answered 429 (or our shared bucket is empty)."""

    kind = "rate_limited"


class ProviderUnavailable(TransientError):
    """Connection refused/reset, DNS, timeout, or a 5xx."""

    kind = "unavailable"


class PermanentError(ProviderError):
    """Retrying cannot help: 400/401/403/404/422 or a local validation failure."""

    kind = "permanent"


class AuthError(PermanentError):
    """Credentials rejected (401/403)."""

    kind = "auth"


class NotFound(PermanentError):
    """The provider does not know that id (404, or Invoice Ninja's 400)."""

    kind = "not_found"


class ProviderValidationError(PermanentError):
    """The provider rejected the payload (422 or 400 with field errors)."""

    kind = "validation"


class LocalValidationError(PermanentError):
    """Rejected before any call: the client cannot be expressed for this provider."""

    kind = "local_validation"


class Unsupported(ClientSyncError):
    """The provider has no such operation (e.g. Request Finance has no delete)."""

    kind = "unsupported"


class IdempotencyConflict(ClientSyncError):
    """The same idempotency key was presented with a different payload."""

    kind = "idempotency_conflict"


class Busy(ClientSyncError):
    """Another worker holds this job or this client right now; try again shortly."""

    retryable = True
    kind = "busy"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(ClientSyncError):
    """Settings are missing or invalid."""

    kind = "config"


class InternalError(TransientError):
    """An unexpected exception inside clientsync (a bug, or Redis trouble): retried, then dead."""

    kind = "internal"


class LeaseLost(ClientSyncError):
    """The job's lease on the client ran out (renewal refused): it stops before its next call.

    Spends an attempt, so a job that keeps losing its lease ends dead instead of looping."""

    retryable = True
    kind = "lease_lost"


class NeedsAttention(ClientSyncError):
    """Several provider records could be this client: an operator must choose (adopt one, or create)."""

    kind = "needs_attention"

    def __init__(self, message: str, *, candidates: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.candidates = candidates
