"""The exactly-once Lua scripts against a real redis-server: claims, leases, locks, marks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from worker import keys
from worker.store import SyncStore

P, C = "invoice_ninja", "client-1"


def _intent(event_id: str, at: float = 1.0, token: str | None = None) -> str:
    return json.dumps({"event_id": event_id, "at": at, "token": token or f"t-{event_id}-{at}",
                       "client": json.dumps({"id": C, "name": "Acme"})})


@pytest.fixture
async def store(fresh_redis_url: str) -> AsyncIterator[SyncStore]:
    client = aioredis.from_url(fresh_redis_url)
    yield SyncStore(client, idempotency_ttl=3600, lease_seconds=5)
    await client.aclose()


async def test_a_completed_key_returns_its_stored_outcome(store: SyncStore) -> None:
    first = await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    assert first.status == "go" and first.state is not None and not first.state.takeover
    await store.finish("k1", P, C, owner="w1", outcome={"result": "created", "provider_id": "X"}, link="X")
    again = await store.begin("k1", P, C, fingerprint="fp", owner="w2", now_ms=2000)
    assert again.status == "done" and again.outcome == {"result": "created", "provider_id": "X"}
    assert await store.link(P, C) == "X"


async def test_the_same_key_with_another_payload_is_a_conflict(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp-a", owner="w1", now_ms=1000)
    assert (await store.begin("k1", P, C, fingerprint="fp-b", owner="w2", now_ms=1001)).status == "conflict"


async def test_a_live_claim_is_in_flight_and_an_expired_one_is_taken_over(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    busy = await store.begin("k1", P, C, fingerprint="fp", owner="w2", now_ms=2000)
    assert busy.status == "inflight" and busy.wait_seconds == pytest.approx(4.0)
    # w1 died: its lock key expires with the lease, and its claim is older than the lease.
    await store.redis.delete(keys.client_lock(P, C))
    taken = await store.begin("k1", P, C, fingerprint="fp", owner="w2", now_ms=7000)
    assert taken.status == "go" and taken.state is not None and taken.state.takeover
    # The dead holder cannot finish over the new owner.
    assert await store.finish("k1", P, C, owner="w1", outcome={"result": "created"}) == "lost"
    assert await store.finish("k1", P, C, owner="w2", outcome={"result": "updated"}) == "ok"


async def test_another_event_for_a_locked_client_waits(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    other = await store.begin("k2", P, C, fingerprint="fp2", owner="w2", now_ms=1001)
    assert other.status == "locked" and 0 < other.wait_seconds <= 5
    # The waiter claimed nothing, so after the holder aborts it goes ahead.
    await store.abort("k1", P, C, owner="w1")
    assert (await store.begin("k2", P, C, fingerprint="fp2", owner="w2", now_ms=1002)).status == "go"


async def test_an_aborted_claim_can_be_run_again_by_a_retry(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    await store.abort("k1", P, C, owner="w1")
    assert (await store.begin("k1", P, C, fingerprint="fp", owner="w2", now_ms=1001)).status == "go"


async def test_the_intent_survives_an_abort_and_is_cleared_by_finish(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    assert await store.mark_intent("k1", P, C, owner="w1", intent=_intent("e1"), now_ms=1000)
    await store.abort("k1", P, C, owner="w1")
    retry = await store.begin("k1", P, C, fingerprint="fp", owner="w2", now_ms=1001)
    assert retry.state is not None and [i["event_id"] for i in retry.state.intents] == ["e1"]
    await store.finish("k1", P, C, owner="w2", outcome={"result": "adopted"}, link="X")
    nxt = await store.begin("k2", P, C, fingerprint="fp2", owner="w3", now_ms=1002)
    assert nxt.state is not None and nxt.state.intent is None and nxt.state.link == "X"


async def test_only_the_lock_holder_can_record_an_intent(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    assert not await store.mark_intent("k1", P, C, owner="intruder", intent=_intent("e9"), now_ms=1000)


async def test_marks_and_tombstones_are_recorded_and_compared(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    await store.finish("k1", P, C, owner="w1", outcome={"result": "deleted"}, unlink=True,
                       mark=(-1, 5_000_000), deleted=True)
    state = (await store.begin("k2", P, C, fingerprint="fp", owner="w2", now_ms=1001)).state
    assert state is not None and state.deleted and state.link is None
    assert state.supersedes((-1, 4_000_000), upsert=False)  # older by time: stale
    assert not state.supersedes((-1, 6_000_000), upsert=False)


def test_versions_win_over_time_when_both_sides_have_one() -> None:
    from worker.store import ClientState

    applied = ClientState(link="X", mark_version=7, mark_micros=9_000, deleted=False, intent=None)
    assert applied.supersedes((6, 99_000), upsert=False)  # lower version, later time: still stale
    assert not applied.supersedes((8, 1_000), upsert=False)  # higher version, earlier time: applies
    assert applied.supersedes((-1, 8_000), upsert=False)  # no version: time decides


def test_idempotency_keys_are_derived_not_random() -> None:
    a = keys.idempotency_key("evt-1", "qonto", "upsert")
    assert a == keys.idempotency_key("evt-1", "qonto", "upsert")
    assert a != keys.idempotency_key("evt-1", "qonto", "delete")
    assert a != keys.idempotency_key("evt-1", "grow_crm", "upsert")


async def test_a_stale_change_leaves_the_intent_of_an_unfinished_create(store: SyncStore) -> None:
    # u2 sent its create, then crashed before recording the result: its intent must survive...
    await store.begin("u2", P, C, fingerprint="fp2", owner="w1", now_ms=1000)
    assert await store.mark_intent("u2", P, C, owner="w1", intent=_intent("u2"), now_ms=1000)
    await store.abort("u2", P, C, owner="w1")
    # ...an older change skipped as stale in between...
    await store.begin("u0", P, C, fingerprint="fp0", owner="w2", now_ms=1001)
    assert await store.finish("u0", P, C, owner="w2", outcome={"result": "skipped", "reason": "stale"}) == "ok"
    # ...so the retry of u2 still looks the client up before creating.
    retry = await store.begin("u2", P, C, fingerprint="fp2", owner="w3", now_ms=1002)
    assert retry.state is not None and [i["event_id"] for i in retry.state.intents] == ["u2"]


async def test_finish_is_refused_once_the_client_lock_is_someone_elses(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    # w1's lease ran out mid-call and another change took the client.
    await store.redis.set(keys.client_lock(P, C), "w2")
    assert await store.finish("k1", P, C, owner="w1", outcome={"result": "created"}, link="X") == "lost"
    assert await store.link(P, C) is None
    assert await store.redis.get(keys.client_lock(P, C)) == b"w2"


async def test_recording_an_intent_renews_both_leases(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    await store.redis.pexpire(keys.client_lock(P, C), 100)
    assert await store.mark_intent("k1", P, C, owner="w1", intent=_intent("k1"), now_ms=4000)
    assert await store.redis.pttl(keys.client_lock(P, C)) > 4000
    assert int(await store.redis.hget(keys.idempotency("k1"), "lease")) == 9000


def test_an_upsert_that_ties_a_delete_is_stale_but_ties_between_upserts_apply() -> None:
    from worker.store import ClientState

    deleted = ClientState(link=None, mark_version=5, mark_micros=1_000, deleted=True, intent=None)
    assert deleted.supersedes((5, 2_000), upsert=True)
    assert not deleted.supersedes((6, 500), upsert=True)
    live = ClientState(link="X", mark_version=5, mark_micros=1_000, deleted=False, intent=None)
    assert not live.supersedes((5, 1_000), upsert=True)
    assert live.supersedes((4, 9_000), upsert=True)


# --- identity: the reverse link (a provider record belongs to at most one client) ----------
async def test_the_reverse_link_is_written_and_removed_with_the_link(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    assert await store.finish("k1", P, C, owner="w1", outcome={"result": "created"}, link="X") == "ok"
    assert await store.owners(P, ["X", "Y"]) == {"X": C}
    await store.begin("k2", P, C, fingerprint="fp2", owner="w1", now_ms=2000)
    assert await store.finish("k2", P, C, owner="w1", outcome={"result": "deleted"}, unlink=True) == "ok"
    assert await store.owners(P, ["X"]) == {}
    assert await store.link(P, C) is None


async def test_a_record_owned_by_another_client_is_never_linked_or_claimed(store: SyncStore) -> None:
    await store.begin("k1", P, "other", fingerprint="fp", owner="w1", now_ms=1000)
    assert await store.finish("k1", P, "other", owner="w1", outcome={"result": "created"}, link="X") == "ok"
    await store.begin("k2", P, C, fingerprint="fp", owner="w2", now_ms=1000)
    assert await store.claim_record(P, C, "X", owner="w2") == "other"
    assert await store.finish("k2", P, C, owner="w2", outcome={"result": "adopted"}, link="X") == "owned:other"
    assert await store.link(P, C) is None
    assert await store.owners(P, ["X"]) == {"X": "other"}
    # An unowned record is claimed once, for this client, and stays claimed for its retries.
    assert await store.mark_intent("k2", P, C, owner="w2", intent=_intent("k2"), now_ms=1000)
    assert await store.claim_record(P, C, "Y", owner="w2") == "ok"
    assert await store.claim_record(P, C, "Y", owner="w2") == "ok"
    # The claim is the link, at once: it must outlive the adopting write should that end
    # unclearly (and change the record). The record found answers the unanswered create.
    await store.abort("k2", P, C, owner="w2", unsettle_seconds=1.0, now_ms=1000)
    assert await store.link(P, C) == "Y"
    state = (await store.begin("k3", P, C, fingerprint="fp", owner="w3", now_ms=1_000_000)).state
    assert state is not None and state.link == "Y" and state.intents == []
    assert await store.claim_record(P, "third", "Y", owner="w2") == "lost"  # w2 holds no lock on "third"


async def test_moving_a_link_releases_the_old_record(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    await store.finish("k1", P, C, owner="w1", outcome={"result": "created"}, link="X")
    await store.begin("k2", P, C, fingerprint="fp2", owner="w1", now_ms=2000)
    await store.finish("k2", P, C, owner="w1", outcome={"result": "created"}, link="Z")
    assert await store.owners(P, ["X", "Z"]) == {"Z": C}


# --- lifecycle: unsettled clients, marks kept apart, lease renewal ---------------------------
async def test_an_unclear_write_keeps_every_writer_out_until_it_settles(store: SyncStore) -> None:
    await store.begin("old", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    await store.abort("old", P, C, owner="w1", unsettle_seconds=3, now_ms=1000)
    newer = await store.begin("new", P, C, fingerprint="fp2", owner="w2", now_ms=2000)
    assert newer.status == "unsettled" and newer.wait_seconds == pytest.approx(2.0)
    again = await store.begin("old", P, C, fingerprint="fp", owner="w3", now_ms=3500)
    assert again.status == "unsettled"
    settled = await store.begin("new", P, C, fingerprint="fp2", owner="w2", now_ms=4001)
    assert settled.status == "go" and settled.state is not None and settled.state.unsettled
    # A clear write answers it; a skip would not.
    assert await store.finish("new", P, C, owner="w2", outcome={"result": "updated"}, link="X",
                              settled=True) == "ok"
    assert await store.redis.hget(keys.client_state(P, C), "unsettled") is None


async def test_a_clean_failure_leaves_the_client_settled(store: SyncStore) -> None:
    await store.begin("old", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    await store.abort("old", P, C, owner="w1", now_ms=1000)
    assert (await store.begin("new", P, C, fingerprint="fp2", owner="w2", now_ms=1001)).status == "go"


async def test_an_unversioned_change_never_erases_the_version_mark(store: SyncStore) -> None:
    """A(v5) -> B(no version, later) -> C(v4, even later): C is stale."""
    for key, mark in (("a", (5, 1_000)), ("b", (-1, 2_000))):
        begin = await store.begin(key, P, C, fingerprint=key, owner="w", now_ms=1000)
        assert begin.state is not None and not begin.state.supersedes(mark, upsert=True)
        await store.finish(key, P, C, owner="w", outcome={"result": "updated"}, link="X", mark=mark)
    begin = await store.begin("c", P, C, fingerprint="c", owner="w", now_ms=1000)
    assert begin.state is not None
    assert (begin.state.mark_version, begin.state.mark_micros) == (5, 2_000)
    assert begin.state.supersedes((4, 3_000), upsert=True)
    assert not begin.state.supersedes((6, 500), upsert=True)  # a newer version applies, whatever its time
    assert begin.state.supersedes((-1, 1_500), upsert=True)  # no version: older than the time mark


async def test_renewing_keeps_the_lease_and_fails_once_it_is_someone_elses(store: SyncStore) -> None:
    await store.begin("k1", P, C, fingerprint="fp", owner="w1", now_ms=1000)
    await store.redis.pexpire(keys.client_lock(P, C), 100)
    assert await store.renew("k1", P, C, owner="w1", now_ms=3000)
    assert await store.redis.pttl(keys.client_lock(P, C)) > 4000
    assert int(await store.redis.hget(keys.idempotency("k1"), "lease")) == 8000
    await store.redis.set(keys.client_lock(P, C), "w2")
    assert not await store.renew("k1", P, C, owner="w1")


async def test_unanswered_creates_are_kept_as_a_list_with_what_each_sent(store: SyncStore) -> None:
    """A second create after an unclear first one must still recognise the first's record."""
    for n, key in enumerate(("c1", "c2"), 1):
        await store.begin(key, P, C, fingerprint=key, owner="w", now_ms=1000 * n)
        assert await store.mark_intent(key, P, C, owner="w", intent=_intent(key, at=float(n)), now_ms=1000 * n)
        await store.abort(key, P, C, owner="w")
    state = (await store.begin("c3", P, C, fingerprint="c3", owner="w", now_ms=5000)).state
    assert state is not None
    assert [(i["event_id"], i["at"]) for i in state.intents] == [("c1", 1.0), ("c2", 2.0)]
    assert state.intent_time == 1.0


async def test_a_create_the_provider_clearly_refused_leaves_no_intent(store: SyncStore) -> None:
    await store.begin("r1", P, C, fingerprint="r1", owner="w", now_ms=1000)
    assert await store.mark_intent("r1", P, C, owner="w", intent=_intent("r1", token="a"), now_ms=1000)
    await store.abort("r1", P, C, owner="w")  # unclear: the intent stays
    await store.begin("r2", P, C, fingerprint="r2", owner="w", now_ms=2000)
    assert await store.mark_intent("r2", P, C, owner="w", intent=_intent("r2", at=2.0, token="b"), now_ms=2000)
    await store.abort("r2", P, C, owner="w")  # unclear too
    # The retry of r2 creates again and is clearly refused (a 422, a 429): that create made
    # nothing, but r2's first, unclear create may have landed: its intent stays.
    assert await store.begin("r2", P, C, fingerprint="r2", owner="w", now_ms=9000)
    assert await store.mark_intent("r2", P, C, owner="w", intent=_intent("r2", at=9.0, token="c"), now_ms=9000)
    await store.abort("r2", P, C, owner="w", refused_create="c")
    state = (await store.begin("r3", P, C, fingerprint="r3", owner="w", now_ms=10000)).state
    assert state is not None
    assert [(i["event_id"], i["token"]) for i in state.intents] == [("r1", "a"), ("r2", "b")]


def test_a_change_fingerprint_stays_the_same_across_releases() -> None:
    # Claims and idempotency keys keep fingerprints for days: a new canonical form would turn
    # every resend after an upgrade into a conflict.
    from worker.models import ClientChange, fingerprint_of

    change = ClientChange.model_validate({
        "event_id": "evt-fp-1", "occurred_at": "2026-01-02T03:04:05Z", "version": 7, "action": "upsert",
        "client": {"id": "c-1", "name": "Zoë Café", "email": "zoe@example.com", "tags": ["vip"]}})
    assert change.fingerprint() == "181ad7f2ca5fbc598939f7c0374cc59918c4bf4d6c16a5c5cac885d3843c39fb"
    assert fingerprint_of(change.model_dump(mode="json")) == change.fingerprint()
