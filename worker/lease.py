"""The running job's lease on its client, as seen by the adapters' HTTP layer.

`worker.sync` renews the client lock while a job works; if a renewal is refused (another
run took the client over), the guard trips and the adapter's next call raises `LeaseLost`
instead of being sent. Adapters only call `check_lease()`; they never import the store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from worker.errors import LeaseLost


class LeaseGuard:
    """Set by the renewer when the lease is gone; read before every provider call.

    `valid_until` (`time.monotonic()`): when the lease runs out unless renewed. Renewals that
    fail (Redis away) leave it as it was, so a call that would go out after it is refused even
    before any renewal is refused."""

    def __init__(self, what: str, valid_until: float = math.inf) -> None:
        self.what = what
        self.lost = False
        self.valid_until = valid_until


current: ContextVar[LeaseGuard | None] = ContextVar("clientsync_lease", default=None)


def check_lease() -> None:
    guard = current.get()
    if guard is not None and (guard.lost or time.monotonic() >= guard.valid_until):
        raise LeaseLost(f"lost the lease on {guard.what}; stopping before the next provider call")


#: successful (2xx) provider writes made by the running job: a create refused by a later call
#: (a contact, a status) has still made a record, so its intent must stay
writes: ContextVar[list[int] | None] = ContextVar("clientsync_writes", default=None)


def count_write() -> None:
    box = writes.get()
    if box is not None:
        box[0] += 1


#: provider calls made by the running job (the circuit must know whether a job reached its
#: provider at all); counted by `ProviderAdapter.request`, set by `worker.jobs`
calls: ContextVar[list[int] | None] = ContextVar("clientsync_calls", default=None)


def count_call() -> None:
    box = calls.get()
    if box is not None:
        box[0] += 1


class ProviderTime:
    """The time (monotonic) a job's attempt spent with at least one provider call (or shared
    pass) out: calls sent together count once, so it never exceeds the time the attempt took."""

    def __init__(self) -> None:
        self.seconds = 0.0
        #: when the job's attempt began, on the same clock (its `duration_ms` is measured from it)
        self.began = time.monotonic()
        self._out = 0
        self._since = 0.0

    def elapsed_ms(self) -> float:
        """The attempt's time so far, on the clock `seconds` is measured on (a wall-clock step
        cannot make the provider's part exceed it)."""
        return round((time.monotonic() - self.began) * 1000, 1)

    def provider_ms(self) -> float:
        """The time at the provider so far, in ms as the ledger shows it."""
        return round(self.seconds * 1000, 1)

    def enter(self) -> None:
        if self._out == 0:
            self._since = time.monotonic()
        self._out += 1

    def leave(self) -> None:
        self._out -= 1
        if self._out == 0:
            self.seconds += time.monotonic() - self._since


#: the running job's time at its provider: its own HTTP calls (not their rate-limit slot waits),
#: and the shared passes over a provider's pages it waited for (`worker.providers.shared`), whole:
#: a pass's own rate-limit waits, and the earlier pass a search may not join, count too. Set by
#: `worker.jobs`; each attempt records it as `provider_ms` beside its `duration_ms`, so the time
#: a job spent in clientsync itself (queues, Redis, its own rate-limit waits) is the rest.
provider_time: ContextVar[ProviderTime | None] = ContextVar("clientsync_provider_time", default=None)


@contextmanager
def at_provider() -> Iterator[None]:
    """Counts the time inside as the running job's time at its provider."""
    clock = provider_time.get()
    if clock is None:
        yield
        return
    clock.enter()
    try:
        yield
    finally:
        clock.leave()
