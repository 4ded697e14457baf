"""The webhook receiver: Standard Webhooks signatures on raw bytes, and every answer it gives."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import standardwebhooks
from aiohttp.test_utils import TestClient

from tests.helpers import change, signed_headers
from worker import keys
from worker.redis_server import free_port
from worker.settings import Settings
from worker.web.app import create_app
from worker.web.signatures import SignatureError, decode_secret, sign, verify

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # vector SW1 in shared/WEBHOOK-VECTORS.md
OLD_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"  # SW2: a rotated-out key still accepted
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def client(aiohttp_client: Client, fresh_redis_url: str) -> TestClient[Any, Any]:
    settings = Settings(webhook_secret=f"{SECRET},{OLD_SECRET}", max_body_bytes=4096)
    return await aiohttp_client(create_app(settings, fresh_redis_url))


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


# --- the reference vectors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("secret", "msg_id", "ts", "payload", "expected"),
    [
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
         b'{"test": 2432232314}', "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
        ("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553,
         b'{"email":"test@example.com","username":"test_user"}', "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="),
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
         b'{"test": 2432232314}', "v1,LVOXivKoo4FWasi/IaHvzhE/u+7/cu2AME+zS/nXqzk="),
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBr", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
         b'{"test": 2432232314}', "v1,yK2tMbA6BHPrMEJ1lLv7UlJJbgFoqGenJkiajZ29evg="),
    ],
)
def test_signing_matches_the_standard_webhooks_vectors(
    secret: str, msg_id: str, ts: int, payload: bytes, expected: str
) -> None:
    assert sign(decode_secret(secret), msg_id, ts, payload) == expected
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": expected}
    assert verify(headers, payload, [decode_secret(secret)], now=ts) == msg_id


@pytest.mark.parametrize(
    "signature",
    [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",  # SW3: one character off
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",  # SW10: right bytes, wrong version
        "invalid_signature",  # SW11
        "v1,invalid_signature",
        "v1,",
        "garbage v1,dawfeoifkpqwoekfpqoekf",
    ],
)
def test_bad_signatures_are_rejected(signature: str) -> None:
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": signature}
    with pytest.raises(SignatureError):
        verify(headers, b'{"test": 2432232314}', [decode_secret(SECRET)], now=1614265330)


def test_re_serialised_json_does_not_verify() -> None:  # SW8
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
    with pytest.raises(SignatureError):
        verify(headers, b'{"test":2432232314}', [decode_secret(SECRET)], now=1614265330)


def test_one_valid_entry_among_several_is_enough() -> None:  # SW5
    now = int(time.time())
    body = b'{"test": 2432232314}'
    good = sign(decode_secret(SECRET), "msg_p5jXN8AQM9LWM0D4loKWxJek", now, body)
    bogus = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    header = f"{bogus} v2,{bogus[3:]} {good} {bogus}"
    assert verify({"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": str(now),
                   "webhook-signature": header}, body, [decode_secret(SECRET)])


# --- the receiver ------------------------------------------------------------------------------
async def test_a_webhook_signed_by_the_reference_package_is_queued(
    client: TestClient[Any, Any], fresh_redis_url: str
) -> None:
    payload = body_of(change("evt-ref-1", "c-1", name="Réf SA"))
    msg_id, now = "msg_reference", __import__("datetime").datetime.now(__import__("datetime").UTC)
    signature = standardwebhooks.Webhook(SECRET).sign(msg_id, now, payload.decode())
    resp = await client.post("/webhooks/clients", data=payload, headers={
        "Webhook-Id": msg_id, "WEBHOOK-TIMESTAMP": str(int(now.timestamp())), "webhook-SIGNATURE": signature,
        "Content-Type": "application/json",
    })
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["event_id"] == "evt-ref-1"
    # What sits on the queue is a Celery protocol-v2 message carrying the change.
    raw = redis.Redis.from_url(fresh_redis_url).lrange("celery", 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == "clientsync.sync_client"
    assert message["properties"]["body_encoding"] == "base64"
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args[0]["event_id"] == "evt-ref-1" and args[0]["client"]["name"] == "Réf SA"


async def test_a_rotated_secret_is_still_accepted(client: TestClient[Any, Any]) -> None:
    payload = body_of(change("evt-rot", "c-1"))
    resp = await client.post("/webhooks/clients", data=payload, headers=signed_headers(OLD_SECRET, payload))
    assert resp.status == 202


@pytest.mark.parametrize("case", ["tampered", "wrong_secret", "stale", "future", "garbage", "missing", "bad_ts"])
async def test_unauthentic_webhooks_are_401_never_500(client: TestClient[Any, Any], case: str) -> None:
    payload = body_of(change(f"evt-{case}", "c-1"))
    other = "whsec_" + base64.b64encode(b"x" * 24).decode()
    headers = {
        "tampered": signed_headers(SECRET, payload),
        "wrong_secret": signed_headers(other, payload),
        "stale": signed_headers(SECRET, payload, ts=int(time.time()) - 301),
        "future": signed_headers(SECRET, payload, ts=int(time.time()) + 301),
        "garbage": {**signed_headers(SECRET, payload), "webhook-signature": "garbage v1,!!!"},
        "missing": {"content-type": "application/json"},
        "bad_ts": {**signed_headers(SECRET, payload), "webhook-timestamp": "hello"},
    }[case]
    data = payload.replace(b"c-1", b"c-2") if case == "tampered" else payload
    resp = await client.post("/webhooks/clients", data=data, headers=headers)
    assert resp.status == 401
    assert "invalid signature" in (await resp.json())["error"]


async def test_a_duplicate_event_is_200_and_not_queued_again(
    client: TestClient[Any, Any], fresh_redis_url: str
) -> None:
    payload = body_of(change("evt-dup", "c-1"))
    first = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
    again = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
    assert (first.status, again.status) == (202, 200)
    assert (await again.json())["status"] == "duplicate"
    assert redis.Redis.from_url(fresh_redis_url).llen("celery") == 1


async def test_a_body_over_the_limit_is_413(client: TestClient[Any, Any]) -> None:
    payload = body_of(change("evt-big", "c-1", notes="x" * 900) | {"pad": "y" * 5000})
    resp = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
    assert resp.status == 413
    assert "larger than" in (await resp.json())["error"]


async def test_a_body_that_is_not_json_is_400(client: TestClient[Any, Any]) -> None:
    payload = b"{not json"
    resp = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
    assert resp.status == 400
    assert "not valid JSON" in (await resp.json())["error"]


async def test_an_invalid_change_is_422_naming_each_field_and_rule(client: TestClient[Any, Any]) -> None:
    bad = change("evt-bad", "c-1", currency="EURO", billing_address={"country": "XX"})
    bad["action"] = "merge"
    payload = body_of(bad)
    resp = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
    assert resp.status == 422
    errors = {e["field"]: e["message"] for e in (await resp.json())["errors"]}
    assert "action" in errors and "upsert" in errors["action"]
    assert "ISO 4217" in errors["client.currency"]
    assert "ISO 3166-1" in errors["client.billing_address.country"]


async def test_redis_down_is_503_and_the_senders_retry_then_succeeds(aiohttp_client: Client) -> None:
    from worker.redis_server import EmbeddedRedis

    server = EmbeddedRedis(port=free_port()).start()
    app = create_app(Settings(webhook_secret=SECRET), server.url)
    client = await aiohttp_client(app)
    payload = body_of(change("evt-503", "c-1"))
    try:
        server.stop()
        resp = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        # Redis comes back on the same port: the retry is accepted, not taken for a duplicate.
        server = EmbeddedRedis(port=server.port).start()
        resp = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
        assert resp.status == 202
        assert redis.Redis.from_url(server.url).exists(keys.event("evt-503"))
    finally:
        server.stop()


async def test_without_a_configured_secret_every_webhook_is_401(aiohttp_client: Client, fresh_redis_url: str) -> None:
    client = await aiohttp_client(create_app(Settings(), fresh_redis_url))
    payload = body_of(change("evt-nosecret", "c-1"))
    resp = await client.post("/webhooks/clients", data=payload, headers=signed_headers(SECRET, payload))
    assert resp.status == 401


def test_a_secret_without_the_whsec_prefix_is_a_settings_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="whsec_"):
        Settings(webhook_secret="plain-secret")
