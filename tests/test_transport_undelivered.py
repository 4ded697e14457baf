"""A delivery recorded as this process's own but never handed to Celery goes back to its queue.

`tasks.transport` records each message it takes (kombu's unacked entry and its holder) before
the intake gate reads it; the gate may itself call Redis (an internal task's job, a dead
letter). If Redis fails in between, the message is held by a live process that never got it:
no reaper takes it back (the process is alive) and no channel holds it in memory. The
transport notes it and the next poll gives it back (or, if the gate had refused it, drops it).
Real redis-server, kombu's own Connection on clientsync's transport; the fault is a gate whose
Redis is away.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from tasks import transport
from tasks.intake import OPTION
from tests.helpers import change
from worker import keys
from worker.inflight import process_owner
from worker.producer import task_message

QUEUE = "celery"


class _GateAway:
    """The intake gate at the moment Redis goes away under it."""

    def admit(self, entry: Any, queue: str) -> Any:
        raise redis.exceptions.ConnectionError("Redis went away")


@pytest.fixture
def channel(fresh_redis_url: str) -> Iterator[Any]:
    with Connection(fresh_redis_url, transport="tasks.transport:Transport",
                    transport_options={OPTION: {"redis_url": fresh_redis_url}}) as conn:
        yield conn.channel()
    transport._undelivered.clear()


def _queue_one(r: redis.Redis) -> tuple[str, str]:
    task_id, tag = str(uuid.uuid4()), str(uuid.uuid4())
    r.lpush(QUEUE, task_message("clientsync.sync_client", [change(f"e-{task_id}", "c-1")], {"received_at": time.time()},
                                queue=QUEUE, task_id=task_id, delivery_tag=tag))
    return task_id, tag


def _held(r: redis.Redis, tag: str) -> dict[str, bool]:
    return {"unacked": bool(r.hexists(keys.KOMBU_UNACKED, tag)), "holder": bool(r.hexists(keys.HOLDERS, tag)),
            "held": bool(r.sismember(keys.held(QUEUE, process_owner()), tag))}


def test_a_delivery_the_gate_could_not_read_goes_back_to_its_queue_and_is_delivered_again(
    channel: Any, fresh_redis_url: str
) -> None:
    r = redis.Redis.from_url(fresh_redis_url)
    task_id, tag = _queue_one(r)
    gate, channel.gate = channel.gate, _GateAway()
    with pytest.raises(redis.exceptions.ConnectionError):
        channel._record(QUEUE, "pop")
    # Recorded as this process's, off the queue, and Celery never got it.
    assert r.llen(QUEUE) == 0 and _held(r, tag) == {"unacked": True, "holder": True, "held": True}
    assert tag not in channel.qos._delivered

    channel.gate = gate  # Redis is back: the next poll settles it before it waits for more
    channel._settle_undelivered()
    assert r.llen(QUEUE) == 1 and _held(r, tag) == dict.fromkeys(("unacked", "holder", "held"), False)
    assert transport._undelivered == {}
    recorded = channel._record(QUEUE, "pop")
    assert recorded is not None
    payload, _raw = recorded
    assert payload["headers"]["id"] == task_id and payload["properties"]["delivery_tag"] == tag
    assert _held(r, tag) == {"unacked": True, "holder": True, "held": True}


def test_a_refused_delivery_whose_record_could_not_be_dropped_is_dropped_on_the_next_poll(
    channel: Any, fresh_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = redis.Redis.from_url(fresh_redis_url)
    tag = str(uuid.uuid4())
    # A well-formed envelope for a task clientsync does not run: recorded, then refused by the real gate.
    r.lpush(QUEUE, task_message("someone.elses_task", [], {}, queue=QUEUE, task_id=str(uuid.uuid4()),
                                delivery_tag=tag))

    def away(raw: bytes) -> None:
        raise redis.exceptions.ConnectionError("Redis went away")

    forget = channel._forget
    monkeypatch.setattr(channel, "_forget", away)
    with pytest.raises(redis.exceptions.ConnectionError):
        channel._record(QUEUE, "pop")
    monkeypatch.setattr(channel, "_forget", forget)
    assert r.hget(keys.DEAD_LETTERS, "unknown_task") == b"1"  # the gate did refuse it
    assert _held(r, tag) == {"unacked": True, "holder": True, "held": True}  # ... but it is still held

    channel._settle_undelivered()
    assert _held(r, tag) == dict.fromkeys(("unacked", "holder", "held"), False)
    assert r.llen(QUEUE) == 0 and transport._undelivered == {}  # dropped, not run or dead-lettered again
    assert r.hget(keys.DEAD_LETTERS, "unknown_task") == b"1"


def test_the_next_poll_settles_what_celery_never_saw_before_it_waits_for_more(
    channel: Any, fresh_redis_url: str
) -> None:
    """The wiring: a consuming channel's poll (`_brpop_start`) gives the noted delivery back first,
    then its BLMOVE takes it again (here, into the process's inbox)."""
    r = redis.Redis.from_url(fresh_redis_url)
    _task_id, tag = _queue_one(r)
    gate, channel.gate = channel.gate, _GateAway()
    with pytest.raises(redis.exceptions.ConnectionError):
        channel._record(QUEUE, "pop")
    channel.gate = gate
    channel.basic_consume(QUEUE, False, lambda message: None, consumer_tag="t")
    channel.connection.cycle._register_BRPOP(channel)  # kombu's poller: connect, then `_brpop_start`
    assert transport._undelivered == {}
    assert _held(r, tag) == dict.fromkeys(("unacked", "holder", "held"), False)
    channel._brpop_read()  # the poll's own reply: BLMOVE took it again, and it is recorded
    assert r.llen(QUEUE) == 0 and _held(r, tag) == {"unacked": True, "holder": True, "held": True}
    channel.connection.cycle.discard(channel)
