"""The use case: apply one `ClientChange` to one provider, exactly once in effect.

Plain async code, no Celery: the task layer calls `apply_change` and maps what it raises
to a retry or a dead letter. The exactly-once rules (DESIGN.md) in the order they apply:
idempotency claim + client lock (`SyncStore.begin`), ordering mark and tombstone,
link → update, intent → lookup-before-create, then `finish` records it all at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from worker import keys
from worker.errors import Busy, IdempotencyConflict, NotFound, PermanentError, Unsupported
from worker.identity import exact_matches
from worker.models import ClientChange
from worker.providers.base import ProviderAdapter
from worker.store import Begin, ClientState, SyncStore

Result = Literal["created", "updated", "adopted", "deleted", "skipped"]


@dataclass(frozen=True)
class Outcome:
    """What happened at the provider."""

    result: Result
    provider_id: str | None = None
    reason: str | None = None  # for skipped: stale | unsupported | not_linked
    #: True when a completed idempotency key answered and the provider was not called
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("replayed")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, replayed: bool = False) -> Outcome:
        return cls(result=data["result"], provider_id=data.get("provider_id"), reason=data.get("reason"),
                   replayed=replayed)


async def apply_change(
    change: ClientChange,
    adapter: ProviderAdapter,
    store: SyncStore,
    *,
    owner: str,
    lock_wait: float,
    rng: random.Random | None = None,
) -> Outcome:
    """Apply `change` at `adapter`'s provider; raises typed errors for the caller to route."""
    provider = adapter.name
    client_id = change.client.id
    idem = keys.idempotency_key(change.event_id, provider, change.action)
    begin = await _claim(change, store, idem, provider, owner=owner, lock_wait=lock_wait, rng=rng)
    if begin.status == "done":
        return Outcome.from_json(begin.outcome or {"result": "skipped"}, replayed=True)
    assert begin.state is not None
    try:
        outcome, bookkeeping = await _apply(change, adapter, store, begin.state, owner, idem)
    except BaseException:
        # Release the claim and the lock now rather than waiting out the lease. Shielded
        # so a cancelled task still releases.
        await asyncio.shield(store.abort(idem, provider, client_id, owner=owner))
        raise
    if not await store.finish(idem, provider, client_id, owner=owner, outcome=outcome.to_json(), **bookkeeping):
        # Our lease ran out during the call and another run may own the client now. The
        # effect may have happened; the retry reconciles it (a recorded intent makes it look
        # the client up instead of creating it again; an update or delete is safe to repeat).
        raise Busy(f"lost the lease on client {client_id} at {provider} while applying {change.event_id}")
    return outcome


async def _claim(
    change: ClientChange,
    store: SyncStore,
    idem: str,
    provider: str,
    *,
    owner: str,
    lock_wait: float,
    rng: random.Random | None,
) -> Begin:
    """Claim the job and lock the client, waiting briefly while another worker holds either."""
    rng = rng or random.Random()
    deadline = time.monotonic() + lock_wait
    pause = 0.01
    while True:
        begin = await store.begin(
            idem, provider, change.client.id,
            fingerprint=change.fingerprint(), owner=owner,
        )
        if begin.status in ("go", "done"):
            return begin
        if begin.status == "conflict":
            raise IdempotencyConflict(
                f"event {change.event_id} was already received with a different payload; "
                "a new change needs a new event_id"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = "this event" if begin.status == "inflight" else f"client {change.client.id}"
            raise Busy(f"another worker is applying {what} at {provider}", retry_after=begin.wait_seconds)
        # Full jitter keeps many waiters on one client from polling in lock step.
        await asyncio.sleep(min(remaining, begin.wait_seconds or pause, rng.uniform(0, pause)))
        pause = min(pause * 2, 0.5)


async def _apply(
    change: ClientChange, adapter: ProviderAdapter, store: SyncStore, state: ClientState, owner: str, idem: str
) -> tuple[Outcome, dict[str, Any]]:
    mark = change.order_mark()
    # A tie goes to the tombstone: an upsert at the same version/time as a delete stays deleted.
    if state.supersedes(mark, upsert=change.action == "upsert"):
        return Outcome("skipped", state.link, "stale"), {}
    client = change.client
    if change.action == "delete":
        return await _delete(change, adapter, state, mark)

    adapter.validate(client)
    if state.link:
        try:
            remote = await adapter.update(state.link, client)
        except NotFound as exc:
            raise PermanentError(
                f"the linked client {state.link} no longer exists at {adapter.name}; "
                "it was deleted there, so clientsync will not recreate it silently",
                provider=adapter.name, status=exc.status,
            ) from exc
        return Outcome("updated", remote.id), {"link": remote.id, "mark": mark, "deleted": False}

    if state.intent:
        # A create was sent before and its result was never recorded (a crash between the
        # provider's 2xx and our bookkeeping): look before creating a second client.
        matches = await exact_matches(adapter, client)
        found = matches[0] if len(matches) == 1 else None
        if found is not None:
            remote = await adapter.update(found.id, client)
            return Outcome("adopted", remote.id), {"link": remote.id, "mark": mark, "deleted": False}
    intent = f"{change.event_id}@{time.time():.3f}"
    if not await store.mark_intent(idem, adapter.name, client.id, owner=owner, intent=intent):
        # Our lease on the client ran out (a slow Redis or a long pause): another worker may
        # hold it now. Creating without a recorded intent could create twice; try again later.
        raise Busy(f"lost the lock on client {client.id} at {adapter.name} before creating it")
    remote = await adapter.create(client)
    return Outcome("created", remote.id), {"link": remote.id, "mark": mark, "deleted": False}


async def _delete(
    change: ClientChange, adapter: ProviderAdapter, state: ClientState, mark: tuple[int, int]
) -> tuple[Outcome, dict[str, Any]]:
    tombstone: dict[str, Any] = {"mark": mark, "deleted": True}
    target = state.link
    if target is None and state.intent:
        matches = await exact_matches(adapter, change.client)
        target = matches[0].id if len(matches) == 1 else None
    if target is None:
        return Outcome("skipped", None, "not_linked"), tombstone
    try:
        await adapter.delete(target)
    except Unsupported:
        # Keep the link: the client still exists there, and a newer upsert should update it.
        return Outcome("skipped", target, "unsupported"), tombstone
    except NotFound:
        pass  # already gone at the provider: the effect we wanted
    return Outcome("deleted", target), {**tombstone, "unlink": True}
