"""Message ownership and the reaper (worker.inflight) against a real redis-server.

Each test builds the state a real process leaves behind at the moment it dies (a message
moved into its inbox by BLMOVE, or recorded as held by `DELIVER_LUA`), with the owner's
heartbeat expired, and checks that one reaper round gives exactly that work back. The
whole path through real Celery workers killed with SIGKILL is in tests/test_lifecycle_crash.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.helpers import change
from worker import keys
from worker.inflight import DELIVER_LUA, PRIORITY_SEPARATOR, Reaper, deliver_keys, purge
from worker.ledger import Ledger
from worker.models import ClientChange
from worker.monitor import Monitor, NotAllowed
from worker.producer import Producer

Q = "celery"
DEAD, ALIVE = "host:1:dead", "host:2:alive"


@pytest.fixture
async def r(fresh_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fresh_redis_url)
    yield client
    await client.aclose()


async def redis_ms(r: aioredis.Redis) -> int:
    sec, usec = await r.time()
    return int(sec) * 1000 + int(usec) // 1000


async def beat(r: aioredis.Redis, owner: str, *, age_seconds: float = 0) -> None:
    """Record `owner`'s last heartbeat `age_seconds` ago (Redis's clock)."""
    await r.zadd(keys.OWNERS, {owner: await redis_ms(r) - int(age_seconds * 1000)})


async def push(r: aioredis.Redis, event_id: str, queue: str = Q) -> bytes:
    """Enqueue a change as the receiver does; returns the raw message."""
    await Producer(r, queue=queue, event_ttl=60).enqueue(
        ClientChange.model_validate(change(event_id, "c-1")), received_at=time.time())
    raw: bytes = (await r.lrange(queue, 0, 0))[0]
    return raw


async def deliver(r: aioredis.Redis, owner: str, queue: str = Q) -> bytes:
    """What tasks.transport does: BLMOVE into the owner's inbox, then DELIVER_LUA."""
    item = await r.blmove(queue, keys.inbox(queue, owner), 1, "RIGHT", "LEFT")
    assert item is not None
    out = await r.eval(DELIVER_LUA, 8, *deliver_keys(queue, owner, mode="inbox"), owner, queue, "inbox", item)
    assert out[1] == 1
    raw: bytes = out[0]
    return raw


def reaper(r: aioredis.Redis, *queues: str) -> Reaper:
    return Reaper(r, Ledger(r), queues=list(queues) or [Q])


async def test_a_message_moved_to_a_dead_owners_inbox_goes_back_to_its_queue(r: aioredis.Redis) -> None:
    raw = await push(r, "e1")
    await beat(r, DEAD, age_seconds=60)
    # The worker's BLMOVE took it, then the worker died before recording it as held.
    await r.blmove(Q, keys.inbox(Q, DEAD), 1, "RIGHT", "LEFT")
    await r.sadd(keys.owner_queues(DEAD), Q)
    assert await r.llen(Q) == 0
    done = await reaper(r).sweep()
    assert (done.owner, done.messages) == (DEAD, 1)
    assert await r.lrange(Q, 0, -1) == [raw]
    assert await r.exists(keys.inbox(Q, DEAD)) == 0


async def test_a_message_held_by_a_dead_owner_goes_back_unchanged_and_its_records_go(r: aioredis.Redis) -> None:
    raw = await push(r, "e1")
    await beat(r, DEAD)
    assert await deliver(r, DEAD) == raw
    tag = json.loads(raw)["properties"]["delivery_tag"]
    # What kombu's ack emulation reads: the unacked entry and its index.
    entry = json.loads(await r.hget(keys.KOMBU_UNACKED, tag))
    assert entry[0] == json.loads(raw) and entry[2] == Q
    assert await r.zscore(keys.KOMBU_UNACKED_INDEX, tag) is not None
    assert (await reaper(r).sweep()).owner is None  # the owner is alive: nothing to do
    assert await r.llen(Q) == 0
    await beat(r, DEAD, age_seconds=60)
    done = await reaper(r).sweep()
    assert (done.owner, done.messages) == (DEAD, 1)
    assert await r.lrange(Q, 0, -1) == [raw]
    assert await r.hexists(keys.KOMBU_UNACKED, tag) == 0
    assert await r.zscore(keys.KOMBU_UNACKED_INDEX, tag) is None
    assert await r.hexists(keys.HOLDERS, tag) == 0
    # The owner had nothing left: it is forgotten.
    assert await r.zscore(keys.OWNERS, DEAD) is None
    assert (await reaper(r).sweep()).owner is None


async def test_a_live_owners_messages_are_left_alone(r: aioredis.Redis) -> None:
    await push(r, "e1")
    await beat(r, ALIVE)
    await deliver(r, ALIVE)
    done = await reaper(r).sweep()
    assert done.owner is None
    assert await r.llen(Q) == 0 and await r.scard(keys.held(Q, ALIVE)) == 1


async def test_each_message_goes_back_to_its_own_queue(r: aioredis.Redis) -> None:
    a = await push(r, "e1", queue="qa")
    b = await push(r, "e2", queue="qb")
    await beat(r, DEAD)
    await deliver(r, DEAD, "qa")
    await deliver(r, DEAD, "qb")
    await beat(r, DEAD, age_seconds=60)
    await reaper(r, "qa").sweep()
    assert await r.lrange("qa", 0, -1) == [a]
    assert await r.lrange("qb", 0, -1) == [b]


async def test_a_copy_redelivered_to_another_owner_is_not_restored_with_the_first(r: aioredis.Redis) -> None:
    raw = await push(r, "e1")
    await beat(r, DEAD)
    await deliver(r, DEAD)
    # kombu's visibility timeout put the same message (same delivery tag) back; ALIVE took it.
    await r.hdel(keys.KOMBU_UNACKED, json.loads(raw)["properties"]["delivery_tag"])
    await r.rpush(Q, raw)
    await beat(r, ALIVE)
    await deliver(r, ALIVE)
    await beat(r, DEAD, age_seconds=60)
    await reaper(r).sweep()
    assert await r.llen(Q) == 0, "ALIVE runs the only copy; nothing may be pushed back"
    assert await r.scard(keys.held(Q, ALIVE)) == 1


async def test_after_a_gap_in_sweeping_live_owners_get_one_ttl_to_beat(r: aioredis.Redis) -> None:
    await push(r, "e1")
    await beat(r, DEAD)
    await deliver(r, DEAD)
    await beat(r, DEAD, age_seconds=60)
    # The last sweep was long ago (Redis was down, or restarted from its AOF).
    await r.set(keys.REAPER_LAST, await redis_ms(r) - 60_000)
    assert (await reaper(r).sweep()).owner is None
    assert await r.llen(Q) == 0
    await r.set(keys.REAPER_GRACE, 0)  # one TTL later
    assert (await reaper(r).sweep()).messages == 1


async def test_a_dead_owners_running_job_is_requeued_from_its_stored_change(r: aioredis.Redis) -> None:
    ledger = Ledger(r)
    c = ClientChange.model_validate(change("e1", "c-1"))
    running = await ledger.enqueued(c, "qonto")
    await ledger.running(running, owner=DEAD, queue=Q)
    finished = await ledger.enqueued(ClientChange.model_validate(change("e2", "c-2")), "qonto")
    await ledger.running(finished, owner=DEAD, queue=Q)
    await ledger._move(ledger.transition_call(finished, "succeeded", mode="force"))
    await beat(r, DEAD, age_seconds=60)
    done = await reaper(r).sweep()
    assert (done.owner, done.jobs) == (DEAD, 1)
    job = await ledger.get(running)
    assert job is not None and job.state == "queued" and "died" in job.fields["note"]
    (message,) = await r.lrange(Q, 0, -1)
    m = json.loads(message)
    assert m["headers"]["task"] == "clientsync.apply_change" and m["headers"]["clientsync_job"] == running
    assert (await ledger.counts())["running"] == 0
    assert await r.exists(keys.running_jobs(DEAD)) == 0
    assert int(await r.hget(keys.stats("qonto"), "requeued") or 0) == 1


async def test_a_running_job_can_be_replayed_only_once_its_worker_is_dead(r: aioredis.Redis) -> None:
    ledger = Ledger(r)
    job_id = await ledger.enqueued(ClientChange.model_validate(change("e1", "c-1")), "qonto")
    await ledger.running(job_id, owner=ALIVE, queue=Q)
    await beat(r, ALIVE)
    monitor = Monitor(r, queue=Q)
    with pytest.raises(NotAllowed, match="worker is alive"):
        await monitor.replay(job_id)
    await beat(r, ALIVE, age_seconds=60)
    assert (await monitor.replay(job_id))["status"] == "queued"
    assert await r.llen(Q) == 1
    assert await r.exists(keys.running_jobs(ALIVE)) == 0


async def test_foreign_priority_messages_are_moved_onto_the_queue(r: aioredis.Redis) -> None:
    await r.lpush(Q + PRIORITY_SEPARATOR + "6", b'{"foreign": 1}')
    await reaper(r).sweep()
    assert await r.lrange(Q, 0, -1) == [b'{"foreign": 1}']


async def test_purge_empties_the_queue_and_dead_owners_copies_so_no_sweep_brings_them_back(
        r: aioredis.Redis) -> None:
    for i in range(5):
        await push(r, f"e{i}")
    await beat(r, DEAD)
    await beat(r, ALIVE)
    await deliver(r, DEAD)
    await deliver(r, ALIVE)
    await beat(r, DEAD, age_seconds=60)
    await r.lpush(Q + PRIORITY_SEPARATOR + "3", b"{}")
    assert await purge(r, Q, batch=2) == {"queued": 4, "tracked": 1}
    assert await r.llen(Q) == 0
    await reaper(r).sweep()
    assert await r.llen(Q) == 0, "a purged message came back"
    assert await r.scard(keys.held(Q, ALIVE)) == 1, "a live worker's message is its own"


def test_clientsync_purge_empties_the_named_queue_only(fresh_redis_url: str) -> None:
    import subprocess
    import sys

    import redis as sync_redis

    from tests.conftest import REPO, clean_env

    r = sync_redis.Redis.from_url(fresh_redis_url)
    r.lpush("other", b"keep")
    r.lpush("mine", b"a", b"b", b"c")
    out = subprocess.run([sys.executable, "-m", "worker", "purge", "--queue", "mine"], capture_output=True,
                         text=True, env=clean_env(CLIENTSYNC_REDIS_URL=fresh_redis_url), timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "purged mine: 3 queued message(s)" in out.stdout
    assert r.llen("mine") == 0 and r.lrange("other", 0, -1) == [b"keep"]
