"""The use case: apply one `ClientChange` to one provider, exactly once in effect.

Plain async code, no Celery: the task layer calls `apply_change` and maps what it raises
to a retry or a dead letter. The exactly-once rules (DESIGN.md) in the order they apply:

1. idempotency claim + client lock (`SyncStore.begin`); a client whose last write ended
   unclearly is *unsettled* and nobody writes to it until the settle time has passed, so a
   late-landing old write can never be the provider's final state;
2. ordering marks and the tombstone (stale changes are skipped);
3. identity: a linked client is updated; an unlinked one is looked up by its exact keys
   (`worker.identity`) and an unowned match adopted (onboarding), else created after a
   recorded intent; after an unclear create, lookalikes that carry the whole payload are
   adopted; several candidates stop the job as `needs_attention` for an operator;
4. deletes act only on the client's own link (or its own stamped record) after a recorded
   intent; an upsert that finds its record gone after its own unclear delete recreates it;
5. the lock is renewed while the job works (`worker.lease` stops the next call if lost);
   `finish` records outcome, link + reverse link, marks and tombstone in one script.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from worker import keys, lease
from worker.errors import (
    Busy,
    IdempotencyConflict,
    LeaseLost,
    NeedsAttention,
    NotFound,
    PermanentError,
    ProviderError,
    Unsupported,
)
from worker.identity import exact_matches, lookalikes, namesakes
from worker.lease import LeaseGuard
from worker.models import Client, ClientChange, mask_email
from worker.providers.base import ProviderAdapter, ProviderConfig, RemoteClient
from worker.store import Begin, ClientState, SyncStore

log = logging.getLogger("clientsync.sync")

Result = Literal["created", "updated", "adopted", "deleted", "skipped"]
#: `SyncStore.finish`'s signature: (idem key, provider, client id, *, owner, outcome, **bookkeeping) -> answer
Finish = Callable[..., Awaitable[str]]


@dataclass(frozen=True)
class Outcome:
    """What happened at the provider."""

    result: Result
    provider_id: str | None = None
    reason: str | None = None  # for skipped: stale | unsupported | not_linked
    #: True when a completed idempotency key answered and the provider was not called
    replayed: bool = False
    #: canonical fields set on the client that this provider could not take (nothing dropped silently)
    unsupported: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("replayed")
        data["unsupported"] = list(self.unsupported)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, replayed: bool = False) -> Outcome:
        return cls(result=data["result"], provider_id=data.get("provider_id"), reason=data.get("reason"),
                   replayed=replayed, unsupported=tuple(data.get("unsupported") or ()))


async def apply_change(
    change: ClientChange,
    adapter: ProviderAdapter,
    store: SyncStore,
    *,
    owner: str,
    lock_wait: float,
    rng: random.Random | None = None,
    first: Begin | None = None,
    finish: Finish | None = None,
) -> Outcome:
    """Apply `change` at `adapter`'s provider; raises typed errors for the caller to route.

    `first`: the answer of a claim already tried (by the job's start script, `worker.steps`);
    `finish`: records the outcome in place of `SyncStore.finish` (the job's finish script), with
    the same arguments and answers.
    """
    provider = adapter.name
    client_id = change.client.id
    idem = keys.idempotency_key(change.event_id, provider, change.action)
    begin = await _claim(change, store, idem, provider, owner=owner, lock_wait=lock_wait, rng=rng, first=first)
    if begin.status == "done":
        return Outcome.from_json(begin.outcome or {"result": "skipped"}, replayed=True)
    assert begin.state is not None
    # The claim (here, or in the job's start script just before) began the lease: it runs at
    # least lease_seconds from now, less the few ms since.
    guard = LeaseGuard(f"client {client_id} at {provider}", valid_until=time.monotonic() + store.lease_seconds)
    renewer = asyncio.create_task(_keep_lease(store, idem, provider, client_id, owner, guard))
    lease_token = lease.current.set(guard)
    written = [0]
    writes_token = lease.writes.set(written)
    run = _Run(change, adapter, store, begin.state, owner, idem)
    try:
        outcome, bookkeeping = await run.apply()
    except BaseException as exc:
        # Release the claim and the lock now rather than waiting out the lease; after an unclear
        # write the client stays unsettled for the provider's settle time. Shielded so a
        # cancelled task still releases.
        unclear = isinstance(exc, ProviderError) and exc.unclear
        # A create the provider clearly refused before anything was written made nothing: its
        # intent is answered. One refused at a later call (a contact, a status) made a record.
        # So did none whose first write never left (our rate limit had no slot for it: every
        # write sent before it would have ended in a 2xx, counted, or raised its own error).
        clear = isinstance(exc, ProviderError) and (exc.status is not None or not exc.sent)
        refused = run.creating and clear and not unclear and written[0] == 0
        await asyncio.shield(store.abort(idem, provider, client_id, owner=owner,
                                         unsettle_seconds=settle_seconds(adapter.config) if unclear else None,
                                         refused_create=run.intent_token if refused else None))
        raise
    finally:
        renewer.cancel()
        lease.current.reset(lease_token)
        lease.writes.reset(writes_token)
    answer = await (finish or store.finish)(idem, provider, client_id, owner=owner, outcome=outcome.to_json(),
                                            settled=run.wrote, **bookkeeping)
    if answer == "lost":
        # Our lease ran out during the call and another run may own the client now. The
        # effect may have happened; the retry reconciles it (a recorded intent makes it look
        # the client up instead of creating it again; an update or delete is safe to repeat).
        # It spends an attempt: a job that keeps losing its lease ends dead, never loops.
        raise LeaseLost(f"lost the lease on client {client_id} at {provider} while applying {change.event_id}")
    if answer.startswith("owned:"):
        raise PermanentError(
            f"record {outcome.provider_id} at {provider} belongs to another client; not linked",
            provider=provider,
        )
    return outcome


def settle_seconds(config: ProviderConfig) -> float:
    """How long after an unclear write clientsync assumes it may still land at the provider."""
    return float(config.settle_seconds) if config.settle_seconds is not None else 2 * float(config.timeout)


def lease_problems(lease_seconds: float, configs: Mapping[str, ProviderConfig]) -> list[str]:
    """Start-up check: a crashed worker's client lock must outlive any write it left in flight.

    Another worker takes a dead holder's client over when the lease runs out; by then the dead
    holder's last call must have timed out and settled, or the takeover could race it."""
    problems = []
    for name, config in sorted(configs.items()):
        need = config.timeout + settle_seconds(config)
        if need >= lease_seconds:
            prefix = f"CLIENTSYNC_{name.upper()}_"
            problems.append(
                f"CLIENTSYNC_LEASE_SECONDS={lease_seconds:g} must exceed {prefix}TIMEOUT ({config.timeout:g}) + "
                f"{prefix}SETTLE_SECONDS ({settle_seconds(config):g}): a crashed worker's write could still land "
                "after another worker took the client over"
            )
    return problems


async def _keep_lease(store: SyncStore, idem: str, provider: str, client_id: str, owner: str,
                      guard: LeaseGuard) -> None:
    """Renew the client lock every third of the lease while the job works; trip the guard if
    refused. A renewal that succeeds moves `guard.valid_until`; while renewals fail (Redis away),
    the lease runs out at the last one, and `check_lease` refuses calls from then on (another
    worker may take the client over once it has run out in Redis)."""
    while True:
        await asyncio.sleep(store.lease_seconds / 3)
        asked = time.monotonic()
        try:
            ok = await store.renew(idem, provider, client_id, owner=owner)
        except Exception as exc:  # Redis trouble: try again at the next tick (`guard.valid_until` still holds)
            log.warning("could not renew the lease on client %s at %s: %r", client_id, provider, exc)
            continue
        if not ok:
            guard.lost = True
            return
        guard.valid_until = asked + store.lease_seconds


async def _claim(
    change: ClientChange,
    store: SyncStore,
    idem: str,
    provider: str,
    *,
    owner: str,
    lock_wait: float,
    rng: random.Random | None,
    first: Begin | None = None,
) -> Begin:
    """Claim the job and lock the client, waiting briefly while another worker holds either.

    `first`: the answer of a first try made elsewhere (the job's start script)."""
    rng = rng or random.Random()
    deadline = time.monotonic() + lock_wait
    pause = 0.01
    while True:
        begin = first or await store.begin(
            idem, provider, change.client.id,
            fingerprint=change.fingerprint(), owner=owner,
        )
        first = None
        if begin.status in ("go", "done"):
            return begin
        if begin.status == "conflict":
            raise IdempotencyConflict(
                f"event {change.event_id} was already received with a different payload; "
                "a new change needs a new event_id"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (begin.status == "unsettled" and begin.wait_seconds > remaining):
            if begin.status == "unsettled":
                raise Busy(f"client {change.client.id} at {provider} is unsettled after an unclear write; "
                           f"waiting {begin.wait_seconds:.1f}s for it to land", retry_after=begin.wait_seconds)
            what = "this event" if begin.status == "inflight" else f"client {change.client.id}"
            raise Busy(f"another worker is applying {what} at {provider}", retry_after=begin.wait_seconds)
        # Full jitter keeps many waiters on one client from polling in lock step.
        await asyncio.sleep(min(remaining, begin.wait_seconds or pause, rng.uniform(0, pause)))
        pause = min(pause * 2, 0.5)


def _candidate(adapter: ProviderAdapter, remote: RemoteClient) -> dict[str, Any]:
    """What an operator sees of one candidate record."""
    try:
        view = adapter.from_wire(remote.data)
        name, email = view.display_name, view.email
    except Exception:  # a record our model cannot read is still a candidate
        name, email = None, None
    created = adapter.created_at(remote)
    return {"provider_id": remote.id, "name": name, "email": mask_email(email), "created_at": created}


class _Run:
    """One run of one job once the claim and lock are held."""

    def __init__(self, change: ClientChange, adapter: ProviderAdapter, store: SyncStore, state: ClientState,
                 owner: str, idem: str) -> None:
        self.change, self.adapter, self.store, self.state = change, adapter, store, state
        self.owner, self.idem = owner, idem
        self.client = change.client
        self.mark = change.order_mark()
        #: a write got a clear answer: the client is settled
        self.wrote = False
        #: this run recorded a create intent and sent the create
        self.creating = False
        #: names this run's create intent (a clear refusal removes that one only)
        self.intent_token = ""


    async def apply(self) -> tuple[Outcome, dict[str, Any]]:
        state = self.state
        # A tie goes to the tombstone: an upsert at the same version/time as a delete stays deleted.
        if state.supersedes(self.mark, upsert=self.change.action == "upsert"):
            return Outcome("skipped", state.link, "stale"), {}
        if self.change.action == "delete":
            return await self._delete()
        self.adapter.validate(self.client)
        if state.link:
            return await self._update_link(state.link)
        self._wait_for_pending_creates()
        resolution = state.resolution if (state.resolution or {}).get("event_id") == self.change.event_id else None
        if resolution is not None:
            if resolution.get("action") == "adopt" and resolution.get("provider_id"):
                return await self._adopt(str(resolution["provider_id"]), update=True)
            return await self._create()  # the operator chose "create new"
        # Identity: the client's exact keys first (its stamp, keys the provider keeps unique).
        # This onboards an account that already holds the client, and settles an unclear create
        # wherever a stamp exists.
        exact = await self._unowned(await exact_matches(self.adapter, self.client))
        if len(exact) == 1:
            return await self._adopt(exact[0].id, update=True)
        if len(exact) > 1:
            raise self._ambiguous(exact, "match its exact keys")
        if state.intent:
            # A create was sent before and its answer never recorded: a record carrying the
            # whole payload that create sent, created since its intent and owned by nobody, is
            # that create (brought up to this change's data).
            similar = await self._our_lost_creates()
            log.info("client %s at %s: %d unanswered create(s) recorded; records found carrying their payload: %s",
                     self.client.id, self.adapter.name, len(state.intents), [r.id for r in similar])
            if len(similar) == 1:
                return await self._adopt(similar[0].id, update=True)
            if len(similar) > 1:
                raise self._ambiguous(similar, "carry the payload of its unanswered create")
        else:
            # Onboarding: records that share a non-unique key (an email, a name) and that no
            # stamp claims may be this client, made before clientsync ran. Never adopted on a
            # guess, never duplicated on a guess: an operator decides.
            epoch = await self.store.provider_epoch(self.adapter.name, time.time())
            others = await self._unowned(await namesakes(self.adapter, self.client, before=epoch))
            if others:
                raise self._ambiguous(others, "share its non-unique keys and may already be it")
        return await self._create()

    def _wait_for_pending_creates(self) -> None:
        """A create sent by a run that never recorded its answer (a crash, a lost lease, Redis
        restarted under it) may still be in flight: nothing is decided about this client until
        it had its call timeout and settle time to land."""
        times = [float(i["at"]) for i in self.state.intents if isinstance(i.get("at"), int | float)]
        if not times:
            return
        wait = max(times) + self.adapter.config.timeout + settle_seconds(self.adapter.config) - time.time()
        if wait > 0:
            raise Busy(f"a create of client {self.client.id} at {self.adapter.name} was sent and its answer never "
                       f"recorded; waiting {wait:.1f}s for it to land", retry_after=wait)

    async def _our_lost_creates(self) -> list[RemoteClient]:
        """Records that are this client's own unanswered creates: for each recorded intent, the
        records carrying the payload it sent, created since, unowned (stamped ones are found by
        `exact_matches` already)."""
        found: dict[str, RemoteClient] = {}
        for intent in self.state.intents:
            try:
                sent = Client.model_validate_json(intent["client"])
            except (KeyError, TypeError, ValueError):
                log.warning("unreadable create intent of client %s at %s", self.client.id, self.adapter.name)
                continue
            at = intent.get("at")
            for remote in await lookalikes(self.adapter, sent, since=float(at) if at is not None else None):
                found.setdefault(remote.id, remote)
        return await self._unowned(list(found.values()))

    async def _unowned(self, found: list[RemoteClient]) -> list[RemoteClient]:
        owners = await self.store.owners(self.adapter.name, [r.id for r in found])
        return [r for r in found if owners.get(r.id) in (None, self.client.id)]

    def _ambiguous(self, found: list[RemoteClient], why: str) -> NeedsAttention:
        return NeedsAttention(
            f"{len(found)} records at {self.adapter.name} {why} for client {self.client.id}; "
            "an operator must adopt one or create a new one",
            candidates=[_candidate(self.adapter, r) for r in found],
        )

    def _done(self, result: Result, remote_id: str) -> tuple[Outcome, dict[str, Any]]:
        self.wrote = True
        unsupported = tuple(self.adapter.unsupported_fields(self.client))
        return (Outcome(result, remote_id, unsupported=unsupported),
                {"link": remote_id, "mark": self.mark, "deleted": False})

    async def _update_link(self, link: str) -> tuple[Outcome, dict[str, Any]]:
        try:
            remote = await self.adapter.update(link, self.client)
        except NotFound as exc:
            if not self.state.del_intent:
                raise PermanentError(
                    f"the linked client {link} no longer exists at {self.adapter.name}; "
                    "it was deleted there, so clientsync will not recreate it silently",
                    provider=self.adapter.name, status=exc.status,
                ) from exc
            # Our own delete was sent and its answer lost, and it did land: this newer upsert
            # brings the client back (restored where the provider can, else created again).
            restore = getattr(self.adapter, "restore", None)
            if restore is not None:
                await restore(link)
                remote = await self.adapter.update(link, self.client)
                return self._done("updated", remote.id)
            return await self._create()
        return self._done("updated", remote.id)

    async def _adopt(self, remote_id: str, *, update: bool) -> tuple[Outcome, dict[str, Any]]:
        claimed = await self.store.claim_record(self.adapter.name, self.client.id, remote_id, owner=self.owner)
        if claimed == "lost":
            raise LeaseLost(f"lost the lock on client {self.client.id} at {self.adapter.name} before adopting")
        if claimed != "ok":
            raise Busy(f"record {remote_id} at {self.adapter.name} was just claimed by another client; "
                       "looking again")
        if update:
            remote = await self.adapter.update(remote_id, self.client)
            return self._done("adopted", remote.id)
        return self._done("adopted", remote_id)

    async def _create(self) -> tuple[Outcome, dict[str, Any]]:
        # The client is kept as JSON text: Redis's Lua cjson would turn its empty lists into objects.
        self.intent_token = secrets.token_hex(8)
        intent = json.dumps({"event_id": self.change.event_id, "at": round(time.time(), 3),
                             "token": self.intent_token, "client": self.client.model_dump_json()})
        if not await self.store.mark_intent(self.idem, self.adapter.name, self.client.id, owner=self.owner,
                                            intent=intent):
            # Our lease on the client ran out (a slow Redis or a long pause): another worker may
            # hold it now. Creating without a recorded intent could create twice; try again later.
            raise LeaseLost(f"lost the lock on client {self.client.id} at {self.adapter.name} before creating it")
        self.creating = True
        remote = await self.adapter.create(self.client)
        return self._done("created", remote.id)

    async def _delete(self) -> tuple[Outcome, dict[str, Any]]:
        tombstone: dict[str, Any] = {"mark": self.mark, "deleted": True}
        target = self.state.link
        if target is None and self.state.intent:
            self._wait_for_pending_creates()
            # A create whose answer was lost: only a record that is provably that create is ours
            # to delete: stamped with this client's own id, or carrying exactly the payload it
            # sent, created since, owned by nobody. A record found by an email or a name alone
            # may be someone else's and is never touched.
            ours: list[RemoteClient] = []
            if self.adapter.stamp_field:
                ours = await self._unowned(
                    [r for r in await self.adapter.search("stamp", self.client.id)
                     if self.adapter.stamped(r) == self.client.id])
            if not ours:
                ours = await self._our_lost_creates()
            if len(ours) > 1:
                raise self._ambiguous(ours, "carry the payload of its unanswered create (to delete)")
            if ours:
                claimed = await self.store.claim_record(self.adapter.name, self.client.id, ours[0].id,
                                                        owner=self.owner)
                if claimed == "lost":
                    raise LeaseLost(f"lost the lock on client {self.client.id} at {self.adapter.name}")
                target = ours[0].id if claimed == "ok" else None
        if target is None:
            return Outcome("skipped", None, "not_linked"), tombstone
        if not await self.store.mark_intent(self.idem, self.adapter.name, self.client.id, owner=self.owner,
                                            intent=f"{self.change.event_id}@{time.time():.3f}", delete=True):
            raise LeaseLost(f"lost the lock on client {self.client.id} at {self.adapter.name} before deleting it")
        try:
            await self.adapter.delete(target)
        except Unsupported:
            # Keep the link: the client still exists there, and a newer upsert should update it.
            return Outcome("skipped", target, "unsupported"), tombstone
        except NotFound:
            pass  # already gone at the provider (perhaps our own unclear delete): the effect we wanted
        self.wrote = True
        return Outcome("deleted", target), {**tombstone, "unlink": True}
