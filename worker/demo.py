"""`clientsync demo`: start everything, send three changes, show what each provider did, exit."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis

from worker import keys
from worker.launcher import Stack
from worker.models import PROVIDER_NAMES, mask_email
from worker.web.signatures import decode_secret, sign

FINAL = {"succeeded", "skipped", "dead"}


def _changes(run: str) -> list[tuple[str, dict[str, Any]]]:
    now = datetime.now(UTC).isoformat()
    contact = {"first_name": "Camille", "last_name": "Martin", "email": f"camille.{run}@example.com"}
    return [
        ("webhook", {
            "event_id": f"demo-{run}-1", "occurred_at": now, "action": "upsert",
            "client": {"id": f"acme-{run}", "kind": "company", "name": "Acme SARL",
                       "email": f"billing.{run}@acme.example", "vat_number": "FR40303265045",
                       "currency": "EUR", "locale": "fr",
                       "billing_address": {"line1": "1 rue de Rivoli", "city": "Paris", "postal_code": "75001",
                                           "country": "FR"},
                       "contacts": [contact]},
        }),
        ("celery job", {
            "event_id": f"demo-{run}-2", "occurred_at": now, "action": "upsert",
            "client": {"id": f"jonas-{run}", "kind": "individual", "first_name": "Jonas", "last_name": "Weber",
                       "email": f"jonas.{run}@example.de", "currency": "EUR",
                       "billing_address": {"line1": "Hauptstr. 5", "city": "Berlin", "postal_code": "10115",
                                           "country": "DE"}},
        }),
        ("webhook", {
            # An Italian address without its province code: Qonto refuses it, the rest apply it.
            "event_id": f"demo-{run}-3", "occurred_at": now, "action": "upsert",
            "client": {"id": f"rossi-{run}", "kind": "company", "name": "Rossi S.r.l.",
                       "email": f"amministrazione.{run}@rossi.example", "currency": "EUR",
                       "billing_address": {"line1": "Via Roma 1", "city": "Milano", "postal_code": "20121",
                                           "country": "IT"},
                       "contacts": [{"first_name": "Giulia", "last_name": "Rossi",
                                     "email": f"giulia.{run}@rossi.example"}]},
        }),
    ]


def _post_webhook(url: str, secret: str, payload: dict[str, Any]) -> int:
    body = json.dumps(payload).encode()
    msg_id, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
    req = urllib.request.Request(f"{url}/webhooks/clients", data=body, method="POST", headers={  # noqa: S310
        "content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
        "webhook-signature": sign(decode_secret(secret), msg_id, ts, body)})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
        status: int = resp.status
        return status


async def _wait(redis_url: str, job_ids: list[str], within: float) -> dict[str, dict[str, str]]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + within
        while True:
            records = {j: cast(dict[str, str], await client.hgetall(keys.job(j))) for j in job_ids}
            if all(r.get("state") in FINAL for r in records.values()) or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.3)
    finally:
        await client.aclose()


def run_demo(timeout: float = 60.0) -> int:
    """Returns 0 when every change ended as expected (the Qonto rejection included)."""
    from celery import Celery

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIENTSYNC_") or k == "CLIENTSYNC_REDIS_URL"}
    run = uuid.uuid4().hex[:6]
    with Stack(env=env, log_dir=Path("var/demo-logs")) as stack:
        print("starting redis, sandbox providers, receiver and worker…", flush=True)
        stack.ensure_redis()
        stack.ensure_secrets()
        stack.start_sandbox()
        url = stack.start_receiver()
        stack.start_worker()
        secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
        foreign = Celery("another-system", broker=stack.redis_url)
        sent = []
        for way, change in _changes(run):
            if way == "webhook":
                status = _post_webhook(url, secret, change)
                print(f"sent {change['event_id']} as a signed webhook -> HTTP {status}")
            else:
                foreign.send_task("clientsync.sync_client", args=[change])
                print(f"sent {change['event_id']} as a Celery job (send_task, as another system would)")
            sent.append(change)
        job_ids = [keys.job_id(p, c["event_id"]) for c in sent for p in PROVIDER_NAMES]
        records = asyncio.run(_wait(stack.redis_url, job_ids, timeout))

    print()
    for change in sent:
        client = change["client"]
        print(f"{change['event_id']}  client {client['id']} <{mask_email(client.get('email'))}>")
        for provider in PROVIDER_NAMES:
            r = records[keys.job_id(provider, change["event_id"])]
            ok_detail = f"id {r.get('provider_id', '')}"
            detail = ok_detail if r.get("state") == "succeeded" else r.get("last_error", "")
            print(f"    {provider:16} {r.get('state', '?'):10} {r.get('result', '-'):8} {detail[:90]}")
    expected_dead = {keys.job_id("qonto", sent[2]["event_id"])}
    ok = all(
        (r.get("state") == "dead") if j in expected_dead else (r.get("state") == "succeeded")
        for j, r in records.items()
    )
    print()
    print("demo OK: every change applied; the Italian client without a province was refused by Qonto only"
          if ok else "demo FAILED: see the table above and var/demo-logs/")
    return 0 if ok else 1
