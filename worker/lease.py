"""The running job's lease on its client, as seen by the adapters' HTTP layer.

`worker.sync` renews the client lock while a job works; if a renewal is refused (another
run took the client over), the guard trips and the adapter's next call raises `LeaseLost`
instead of being sent. Adapters only call `check_lease()`; they never import the store.
"""

from __future__ import annotations

import math
import time
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


#: seconds the running job spent waiting on its provider: its own HTTP calls, and the shared
#: passes over a provider's pages it waited for (`worker.providers.shared`). Set by `worker.jobs`;
#: each attempt records it as `provider_ms` beside its `duration_ms`, so the time a job spent in
#: clientsync itself (queues, Redis, rate-limit waits) is the rest.
provider_time: ContextVar[list[float] | None] = ContextVar("clientsync_provider_time", default=None)


def add_provider_time(seconds: float) -> None:
    box = provider_time.get()
    if box is not None:
        box[0] += seconds
