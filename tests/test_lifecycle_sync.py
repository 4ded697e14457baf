"""Lifecycle of one client at one provider under unclear endings, without Celery.

`apply_change` against every provider's sandbox over loopback HTTP and a real redis-server:
an update that lands after we gave up, a delete whose answer was lost, a job slower than its
lease, and events with and without versions. Each ends with the provider holding the newest
change's data. And a run whose client passed to another worker before its create: it can
neither record a create intent nor answer one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.helpers import ENDINGS, change
from worker import keys
from worker.errors import Busy, LeaseLost, ProviderUnavailable, ProviderValidationError
from worker.models import ClientChange
from worker.providers import adapter_class
from worker.providers.base import ProviderAdapter
from worker.sandbox.server import RunningSandbox, start_sandbox
from worker.store import SyncStore
from worker.sync import Outcome, apply_change

PROVIDERS = ["invoice_ninja", "grow_crm", "lsp_expert", "qonto", "request_finance"]
WITH_DELETE = [p for p in PROVIDERS if p != "request_finance"]  # Request Finance has no delete
TIMEOUT = 0.5


@pytest.fixture
async def store(fresh_redis_url: str) -> AsyncIterator[SyncStore]:
    client = aioredis.from_url(fresh_redis_url)
    yield SyncStore(client, idempotency_ttl=3600, lease_seconds=5)
    await client.aclose()


class World:
    def __init__(self, name: str, sandbox: RunningSandbox, adapter: ProviderAdapter, store: SyncStore) -> None:
        self.name, self.sandbox, self.adapter, self.store = name, sandbox, adapter, store
        self.t0 = datetime.now(UTC) - timedelta(hours=1)
        self.n = 0

    def change(self, client_id: str, *, name: str, version: int | None = None, action: str = "upsert",
               at: datetime | None = None) -> ClientChange:
        self.n += 1
        body = change(f"evt-{client_id}-{self.n}", client_id, action=action, name=name, version=version,
                      at=at or self.t0 + timedelta(seconds=self.n), first_name="Ada", last_name="Lovelace",
                      email=f"{client_id}@example.com")
        return ClientChange.model_validate(body)

    async def apply(self, c: ClientChange, *, lock_wait: float = 0.0, owner: str = "t") -> Outcome:
        return await apply_change(c, self.adapter, self.store, owner=f"{owner}-{c.event_id}", lock_wait=lock_wait)

    async def apply_when_settled(self, c: ClientChange) -> Outcome:
        """Run `c` the way the task layer would: a Busy (locked, unsettled) comes back later."""
        for _ in range(600):
            try:
                return await self.apply(c)
            except Busy as exc:
                await asyncio.sleep(min(exc.retry_after or 0.1, 0.5))
        raise AssertionError(f"{c.event_id} never got its turn")

    async def faults(self, **knobs: Any) -> None:
        self.sandbox.simulators[self.name].faults.__dict__.update(knobs)

    async def held_name(self, client_id: str) -> str | None:
        link = await self.store.link(self.name, client_id)
        assert link is not None
        view = self.adapter.from_wire((await self.adapter.get(link)).data)
        return view.name or view.display_name

    def patient(self) -> None:
        """An adapter whose calls may take longer than a lease (for the slow-job tests)."""
        cls = type(self.adapter)
        self.adapter = cls(cls.settings_class(timeout=10, settle_seconds=1), self.adapter.session)

    def records(self) -> list[dict[str, Any]]:
        sim = self.sandbox.simulators[self.name]
        return [r for r in sim.clients.values() if not r.get("is_deleted") and not r.get("deleted")]


@pytest.fixture
async def world(request: pytest.FixtureRequest, store: SyncStore,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    name: str = request.param
    sandbox = await start_sandbox(names=[name])
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(f"CLIENTSYNC_{name.upper()}_TIMEOUT", str(TIMEOUT))
    # The sandbox's late writes land after `hang_seconds`; the settle time covers that with room.
    monkeypatch.setenv(f"CLIENTSYNC_{name.upper()}_SETTLE_SECONDS", "4")
    async with aiohttp.ClientSession() as session:
        cls = adapter_class(name)
        yield World(name, sandbox, cls(cls.settings_class(), session), store)
    await sandbox.stop()


@pytest.mark.parametrize("world", PROVIDERS, indirect=True)
async def test_an_update_that_lands_after_we_gave_up_never_overwrites_a_newer_one(world: World) -> None:
    """Issue 11 (1): U1 times out on our side and lands later; U2, newer, must be the final state."""
    assert (await world.apply(world.change("c1", name="Created"))).result == "created"
    await world.faults(apply_late_next=1, hang_seconds=1.5)
    u1 = world.change("c1", name="Old update", version=None)
    with pytest.raises(ProviderUnavailable) as info:
        await world.apply(u1)
    assert info.value.unclear
    u2 = world.change("c1", name="Newest update")
    # The client is unsettled: the newer change is turned away without a call...
    with pytest.raises(Busy):
        await world.apply(u2)
    # ...and applies once the unclear write has settled (it landed meanwhile).
    assert (await world.apply_when_settled(u2)).result == "updated"
    # The old job's retry is stale now, and skipped.
    assert (await world.apply_when_settled(u1)).reason == "stale"
    assert await world.held_name("c1") == "Newest update"


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("world", WITH_DELETE, indirect=True)
async def test_a_delete_whose_answer_was_lost_then_a_newer_upsert_brings_the_client_back(
    world: World, ending: str
) -> None:
    """Issue 7 (5): the provider applied the delete; the next upsert must not die on a 404."""
    assert (await world.apply(world.change("c2", name="Here"))).result == "created"
    await world.faults(**{ending: 1}, hang_seconds=1.5, write_match="DELETE")
    unclear: ProviderUnavailable | None = None
    outcome: Outcome | None = None
    try:
        outcome = await world.apply(world.change("c2", name="Here", action="delete"))
    except ProviderUnavailable as exc:
        unclear = exc
    if unclear is not None:
        assert unclear.unclear
    else:
        # aiohttp re-sends an idempotent request once when a reused connection drops: the
        # repeat finds the client gone (404), which counts as deleted. A clear ending too.
        assert ending == "drop_after_commit_next" and outcome is not None and outcome.result == "deleted"
    outcome = await world.apply_when_settled(world.change("c2", name="Back again"))
    assert outcome.result in ("created", "updated")
    assert await world.held_name("c2") == "Back again"
    assert len(world.records()) == 1


@pytest.mark.parametrize("world", ["invoice_ninja"], indirect=True)
async def test_a_job_slower_than_its_lease_keeps_the_client_to_itself(world: World) -> None:
    """Issue 11 (2): the lock is renewed while a job works, so a newer change cannot run in between."""
    store = SyncStore(world.store.redis, idempotency_ttl=3600, lease_seconds=1.5)
    world.store = store
    world.patient()
    assert (await world.apply(world.change("c3", name="Start"))).result == "created"
    await world.faults(latency_ms=1500)  # an update is a GET and a PUT: twice the lease
    slow = asyncio.create_task(world.apply(world.change("c3", name="Slow")))
    while await store.redis.get(keys.client_lock(world.name, "c3")) is None:
        await asyncio.sleep(0.01)
    newer = world.change("c3", name="Newer")
    turned_away = 0
    while not slow.done():
        with pytest.raises(Busy):
            await world.apply(newer)
        turned_away += 1
        await asyncio.sleep(0.2)
    assert (await slow).result == "updated"
    assert turned_away > 0
    await world.faults(latency_ms=0)
    assert (await world.apply(newer)).result == "updated"
    assert await world.held_name("c3") == "Newer"


@pytest.mark.parametrize("world", ["invoice_ninja"], indirect=True)
async def test_a_job_that_lost_its_lease_makes_no_further_call_and_spends_an_attempt(world: World) -> None:
    store = SyncStore(world.store.redis, idempotency_ttl=3600, lease_seconds=1.5)
    world.store = store
    world.patient()
    assert (await world.apply(world.change("c4", name="Start"))).result == "created"
    await world.faults(latency_ms=1200)
    job = asyncio.create_task(world.apply(world.change("c4", name="Mine")))
    # Another run takes the client over while the job waits on its first call (the GET).
    lock = keys.client_lock(world.name, "c4")
    while await store.redis.get(lock) is None:
        await asyncio.sleep(0.01)
    await store.redis.set(lock, "someone-else")
    with pytest.raises(LeaseLost):
        await job
    calls = world.sandbox.simulators[world.name].calls
    assert not [c for c in calls if c.method == "PUT"], "no write after the lease was lost"


async def _take_over(world: World, client_id: str, *, token: str) -> None:
    """Another worker takes `client_id` over, as once the holder's lease ran out (a long pause,
    Redis out of its reach): it claims a newer change of the client as `current` and records the
    create it is about to send, its intent named `token`."""
    store = world.store
    await store.redis.delete(keys.client_lock(world.name, client_id))  # the holder's lease ran out
    newer = world.change(client_id, name="Current")
    idem = keys.idempotency_key(newer.event_id, world.name, newer.action)
    begin = await store.begin(idem, world.name, client_id, fingerprint=newer.fingerprint(), owner="current")
    assert begin.status == "go"
    intent = json.dumps({"event_id": newer.event_id, "at": round(time.time(), 3), "token": token,
                         "client": newer.client.model_dump_json()})
    assert await store.mark_intent(idem, world.name, client_id, owner="current", intent=intent)


async def _intent_tokens(world: World, client_id: str) -> list[str]:
    raw = await world.store.redis.hget(keys.client_state(world.name, client_id), "intent")
    return [i["token"] for i in json.loads(raw)] if raw else []


@pytest.mark.parametrize("world", ["request_finance"], indirect=True)
async def test_a_run_that_lost_the_client_records_no_create_intent_and_sends_no_create(world: World) -> None:
    """The intent script's lock check (test_store) seen through `apply_change`: the run's lease
    runs out during its identity lookups and another worker takes the client. The run's owner
    token holds nothing now, so its create intent is refused: it sends no create, and the new
    holder's lock and intent stay as the holder left them."""
    # A lease no renewal comes near during the test: the refusal is the intent's, not the lease guard's.
    world.store = SyncStore(world.store.redis, idempotency_ttl=3600, lease_seconds=60)
    taken: list[bool] = []

    async def take_over_at_the_first_lookup(provider: str) -> None:
        if not taken:
            await _take_over(world, "c8", token="current")
            taken.append(True)

    world.adapter.before_call = take_over_at_the_first_lookup
    with pytest.raises(LeaseLost, match="before creating it"):
        await world.apply(world.change("c8", name="Stale"), owner="stale")
    assert taken, "the run looked the client up before creating it"
    sim = world.sandbox.simulators[world.name]
    assert [c.method for c in sim.calls if c.method != "GET"] == [], "no create was sent"
    assert await world.store.redis.get(keys.client_lock(world.name, "c8")) == b"current"
    assert await _intent_tokens(world, "c8") == ["current"]


@pytest.mark.parametrize("world", ["request_finance"], indirect=True)
async def test_a_run_that_lost_the_client_cannot_answer_an_intent_with_its_refused_create(world: World) -> None:
    """A create the provider clearly refused answers its own intent, by its token (the abort
    script: test_store), and only while its run holds the client; here through `apply_change`.
    The holder's refused create answers its intent (c9). For c10 the lease runs out between the
    run's intent and its POST, another worker takes the client and records its own create, then
    the provider refuses the stale POST (422): the stale run's abort names its intent token under
    an owner token that holds nothing, so every intent stays (its own too: the client's state is
    the holder's now), and so does the holder's lock."""
    world.store = SyncStore(world.store.redis, idempotency_ttl=3600, lease_seconds=60)
    sim = world.sandbox.simulators[world.name]
    recorded: dict[str, list[str]] = {}

    def refuse_the_create(client_id: str, *, take_over: bool) -> Callable[[str], Awaitable[None]]:
        async def before_call(provider: str) -> None:
            # The first call after the run's intent is its create's POST (Request Finance's
            # create is that one call): the provider will refuse it.
            if client_id in recorded or not await _intent_tokens(world, client_id):
                return
            recorded[client_id] = await _intent_tokens(world, client_id)
            if take_over:
                await _take_over(world, client_id, token="current")
            sim.faults.fail_next, sim.faults.error_status = 1, 422

        return before_call

    world.adapter.before_call = refuse_the_create("c9", take_over=False)
    with pytest.raises(ProviderValidationError):
        await world.apply(world.change("c9", name="Holder"), owner="holder")
    assert len(recorded["c9"]) == 1 and await _intent_tokens(world, "c9") == [], "the holder's refusal answers it"

    world.adapter.before_call = refuse_the_create("c10", take_over=True)
    with pytest.raises(ProviderValidationError):
        await world.apply(world.change("c10", name="Stale"), owner="stale")
    (stale_token,) = recorded["c10"]
    assert [(c.method, c.status) for c in sim.calls if c.method != "GET"] == [("POST", 422)] * 2
    assert await _intent_tokens(world, "c10") == [stale_token, "current"]
    assert await world.store.redis.get(keys.client_lock(world.name, "c10")) == b"current"


@pytest.mark.parametrize("world", ["invoice_ninja"], indirect=True)
async def test_an_unversioned_event_never_erases_the_version_order(world: World) -> None:
    """Issue 11 (3): A(v5) -> B(no version, later) -> C(v4, even later): the provider keeps B."""
    base = datetime.now(UTC) - timedelta(minutes=5)
    a = world.change("c5", name="A v5", version=5, at=base)
    b = world.change("c5", name="B unversioned", at=base + timedelta(seconds=1))
    c = world.change("c5", name="C v4", version=4, at=base + timedelta(seconds=2))
    assert (await world.apply(a)).result == "created"
    assert (await world.apply(b)).result == "updated"
    assert (await world.apply(c)).reason == "stale"
    assert await world.held_name("c5") == "B unversioned"


def test_lease_budget_is_checked_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.providers.invoice_ninja import InvoiceNinjaConfig
    from worker.sync import lease_problems

    monkeypatch.setenv("CLIENTSYNC_INVOICE_NINJA_TOKEN", "t")
    ok = InvoiceNinjaConfig()
    assert lease_problems(60, {"invoice_ninja": ok}) == []  # 15 s timeout + 30 s settle < 60 s
    monkeypatch.setenv("CLIENTSYNC_INVOICE_NINJA_TIMEOUT", "40")
    problems = lease_problems(60, {"invoice_ninja": InvoiceNinjaConfig()})
    assert problems and "CLIENTSYNC_LEASE_SECONDS" in problems[0] and "CLIENTSYNC_INVOICE_NINJA_TIMEOUT" in problems[0]
