"""The spine end to end: real Redis, real Celery workers, the Invoice Ninja sandbox over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator

import aiohttp
import pytest
import redis
from celery import Celery

from tests.conftest import DATA, running_stack, uid
from tests.helpers import (
    change,
    minutes_ago,
    post_webhook,
    sandbox_clients,
    set_faults,
    wait_jobs,
)
from worker import keys
from worker.launcher import Stack

IN = "invoice_ninja"


@pytest.fixture(scope="module")
def stack(redis_server_url: str) -> Iterator[Stack]:
    with running_stack(
        redis_server_url, providers=[IN], workers=2, concurrency=8,
        CLIENTSYNC_RETRY_BASE_SECONDS="0.2", CLIENTSYNC_RETRY_CAP_SECONDS="1",
    ) as s:
        yield s


def sandbox(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.sandbox_port}/{IN}"


def secret(stack: Stack) -> str:
    return stack.env["CLIENTSYNC_WEBHOOK_SECRET"]


def foreign_python_producer(stack: Stack) -> Celery:
    """Another system's Celery app: it knows only the broker and the task name."""
    return Celery("foreign", broker=stack.redis_url)


def push_node_style(stack: Stack, args: list[object]) -> str:
    """LPUSH a message shaped exactly like celery-node's (captured in tests/data)."""
    captured = json.loads((DATA / "celery-redis-messages/celery-node-0.5.9-producer.json").read_text())
    task_id = str(uuid.uuid4())
    captured["body"] = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    captured["headers"].update(task="clientsync.sync_client", id=task_id)
    captured["properties"].update(correlationId=task_id, delivery_tag=str(uuid.uuid4()))
    redis.Redis.from_url(stack.redis_url).lpush("celery", json.dumps(captured))
    return task_id


def named(clients: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [c for c in clients if c.get("name") == name]


async def test_a_signed_webhook_reaches_the_provider(stack: Stack, http: aiohttp.ClientSession) -> None:
    cid, name = uid("c-"), uid("Webhook Co ")
    event = change(uid("e-"), cid, name=name, billing_address={"country": "DE", "city": "Berlin"})
    assert await post_webhook(http, stack.receiver_url, secret(stack), event) == 202
    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, event["event_id"])])
    job = records[keys.job_id(IN, event["event_id"])]
    assert job["state"] == "succeeded" and job["result"] == "created"
    [created] = named(await sandbox_clients(http, sandbox(stack)), name)
    assert created["id"] == job["provider_id"]
    assert created["country_id"] in ("276", 276)


async def test_the_same_event_delivered_20_times_creates_one_client(stack: Stack, http: aiohttp.ClientSession) -> None:
    cid, name = uid("c-"), uid("Twenty Ltd ")
    event = change(uid("e-"), cid, name=name)
    statuses = [await post_webhook(http, stack.receiver_url, secret(stack), event) for _ in range(20)]
    assert statuses == [202] + [200] * 19
    # A foreign producer that retries without our inbound dedupe: 20 more copies on the queue.
    producer = foreign_python_producer(stack)
    for _ in range(20):
        producer.send_task("clientsync.sync_client", args=[event])
    await wait_jobs(stack.redis_url, [keys.job_id(IN, event["event_id"])])
    await asyncio.sleep(2)  # let every redelivered copy run to its end
    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, event["event_id"])])
    assert records[keys.job_id(IN, event["event_id"])]["state"] == "succeeded"
    assert len(named(await sandbox_clients(http, sandbox(stack)), name)) == 1


async def test_50_concurrent_first_time_upserts_of_one_client_create_one(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid, name = uid("c-"), uid("Fifty GmbH ")
    events = [change(uid("e-"), cid, name=name, version=i) for i in range(50)]
    statuses = await asyncio.gather(*(post_webhook(http, stack.receiver_url, secret(stack), e) for e in events))
    assert set(statuses) == {202}
    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, e["event_id"]) for e in events])
    assert {r["state"] for r in records.values()} <= {"succeeded", "skipped"}
    assert [r["result"] for r in records.values()].count("created") == 1
    [only] = named(await sandbox_clients(http, sandbox(stack)), name)
    link = redis.Redis.from_url(stack.redis_url).hget(keys.client_state(IN, cid), "link")
    assert link is not None and link.decode() == only["id"]


async def test_an_older_change_is_skipped_as_stale(stack: Stack, http: aiohttp.ClientSession) -> None:
    cid = uid("c-")
    newer = change(uid("e-"), cid, name=uid("Newer "), at=minutes_ago(1))
    older = change(uid("e-"), cid, name=uid("Older "), at=minutes_ago(10))
    assert await post_webhook(http, stack.receiver_url, secret(stack), newer) == 202
    await wait_jobs(stack.redis_url, [keys.job_id(IN, newer["event_id"])])
    assert await post_webhook(http, stack.receiver_url, secret(stack), older) == 202
    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, older["event_id"])])
    assert records[keys.job_id(IN, older["event_id"])]["state"] == "skipped"
    assert records[keys.job_id(IN, older["event_id"])]["reason"] == "stale"
    clients = await sandbox_clients(http, sandbox(stack))
    assert len(named(clients, newer["client"]["name"])) == 1
    assert named(clients, older["client"]["name"]) == []


async def test_a_delete_then_a_late_upsert_leaves_the_client_deleted(stack: Stack, http: aiohttp.ClientSession) -> None:
    cid, name = uid("c-"), uid("Doomed SA ")
    create = change(uid("e-"), cid, name=name, at=minutes_ago(10))
    delete = change(uid("e-"), cid, action="delete", name=name, at=minutes_ago(1))
    late = change(uid("e-"), cid, name=name, at=minutes_ago(5))
    for event in (create, delete, late):
        assert await post_webhook(http, stack.receiver_url, secret(stack), event) == 202
        await wait_jobs(stack.redis_url, [keys.job_id(IN, event["event_id"])])
    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, e["event_id"]) for e in (create, delete, late)])
    assert [records[keys.job_id(IN, e["event_id"])].get("result") for e in (create, delete, late)] == [
        "created", "deleted", "skipped"]
    [record] = named(await sandbox_clients(http, sandbox(stack)), name)
    assert record["is_deleted"] is True


async def test_same_event_id_with_a_different_payload_is_a_conflict_not_applied(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid, event_id = uid("c-"), uid("e-")
    first = change(event_id, cid, name=uid("First "))
    second = change(event_id, cid, name=uid("Second "))
    producer = foreign_python_producer(stack)
    producer.send_task("clientsync.sync_client", args=[first])
    await wait_jobs(stack.redis_url, [keys.job_id(IN, event_id)])
    producer.send_task("clientsync.sync_client", args=[second])
    conflict = keys.job_id(IN, event_id)
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    for _ in range(100):
        found = [j for j in client.zrange(keys.jobs_in_state("dead"), 0, -1) if j.startswith(f"conflict:{conflict}:")]
        if found:
            break
        await asyncio.sleep(0.1)
    [dead_letter] = found
    assert client.hget(keys.job(dead_letter), "last_error_class") == "idempotency_conflict"
    assert json.loads(client.hget(keys.job(dead_letter), "raw"))["client"]["name"] == second["client"]["name"]
    # The change that was applied keeps its record.
    assert client.hget(keys.job(conflict), "state") == "succeeded"
    clients = await sandbox_clients(http, sandbox(stack))
    assert named(clients, second["client"]["name"]) == []
    assert len(named(clients, first["client"]["name"])) == 1


async def test_a_crash_between_the_providers_2xx_and_bookkeeping_adopts_instead_of_duplicating(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    cid, name = uid("c-"), uid("Adopted BV ")
    event = change(uid("e-"), cid, name=name)
    # The sandbox applies the next write, then answers 503: we never learn the new id.
    await set_faults(http, sandbox(stack), fail_after_commit_next=1)
    assert await post_webhook(http, stack.receiver_url, secret(stack), event) == 202
    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, event["event_id"])])
    job = records[keys.job_id(IN, event["event_id"])]
    assert job["state"] == "succeeded" and job["result"] == "adopted"
    assert int(job["attempts"]) == 2
    [only] = named(await sandbox_clients(http, sandbox(stack)), name)
    assert only["id"] == job["provider_id"]


async def test_jobs_from_a_python_and_a_node_producer_are_applied(stack: Stack, http: aiohttp.ClientSession) -> None:
    py_event = change(uid("e-"), uid("c-"), name=uid("From Python "))
    node_event = change(uid("e-"), uid("c-"), name=uid("From Node "))
    foreign_python_producer(stack).send_task("clientsync.sync_client", args=[py_event])
    push_node_style(stack, [node_event])
    records = await wait_jobs(stack.redis_url, [keys.job_id(IN, e["event_id"]) for e in (py_event, node_event)])
    assert {r["state"] for r in records.values()} == {"succeeded"}
    clients = await sandbox_clients(http, sandbox(stack))
    for event in (py_event, node_event):
        assert len(named(clients, event["client"]["name"])) == 1


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([{"event_id": "x", "action": "upsert"}], "occurred_at"),
        ([{"event_id": "x", "occurred_at": "yesterday", "action": "upsert", "client": {"id": "c"}}], "occurred_at"),
        (["not an object"], "(root)"),
        ([], "__args__"),
        ([{"a": 1}, {"b": 2}], "__args__"),
    ],
)
async def test_an_invalid_job_is_dead_lettered_with_the_reason_and_the_worker_goes_on(
    stack: Stack, http: aiohttp.ClientSession, args: list[object], field: str
) -> None:
    task_id = push_node_style(stack, args)
    valid = change(uid("e-"), uid("c-"), name=uid("After Bad "))
    push_node_style(stack, [valid])
    records = await wait_jobs(stack.redis_url, [f"invalid:{task_id}", keys.job_id(IN, valid["event_id"])])
    dead = records[f"invalid:{task_id}"]
    assert dead["state"] == "dead" and dead["last_error_class"] == "invalid_message"
    assert field in dead["last_error"]
    assert records[keys.job_id(IN, valid["event_id"])]["state"] == "succeeded"
