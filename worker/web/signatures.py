"""Standard Webhooks signature verification, on the raw bytes, in constant time.

Scheme (https://www.standardwebhooks.com/, spec/standard-webhooks.md): the signed content
is `{webhook-id}.{webhook-timestamp}.{raw body}`, the key is the base64 tail of a
`whsec_…` secret, and `webhook-signature` is a space-separated list of `v1,<base64>`
entries; any v1 entry matching any configured secret (rotation) is accepted.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Mapping, Sequence


class SignatureError(Exception):
    """The request is not authentically signed; the message says why (never the secret)."""


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret; tolerates missing base64 padding like the reference libs."""
    raw = secret.strip()
    if raw.startswith("whsec_"):
        raw = raw[len("whsec_"):]
    if not raw:
        raise ValueError("empty webhook secret")
    try:
        return base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("webhook secret is not valid base64 after 'whsec_'") from exc


def sign(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The `v1,<base64>` entry for this message (used by tests and `clientsync send --webhook`)."""
    content = b"".join((f"{msg_id}.{timestamp}.".encode(), body))
    return "v1," + base64.b64encode(hmac.digest(key, content, "sha256")).decode()


def verify(
    headers: Mapping[str, str],
    body: bytes,
    keys: Sequence[bytes],
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> str:
    """Return the verified `webhook-id`, or raise `SignatureError`."""
    if not keys:
        raise SignatureError("no webhook secret is configured")
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    header = headers.get("webhook-signature")
    if not msg_id or not stamp or not header:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(stamp)
    except ValueError as exc:
        raise SignatureError("webhook-timestamp must be integer unix seconds") from exc
    now = time.time() if now is None else now
    if ts < now - tolerance:
        raise SignatureError("webhook-timestamp is too old")
    if ts > now + tolerance:
        raise SignatureError("webhook-timestamp is too far in the future")
    expected = [sign(k, msg_id, ts, body).encode() for k in keys]
    for entry in header.split():
        version, _, value = entry.partition(",")
        if version != "v1" or not value:
            continue
        given = f"v1,{value}".encode()
        # Compare against every key without stopping early on a match's position.
        if any(hmac.compare_digest(given, e) for e in expected):
            return msg_id
    raise SignatureError("no valid v1 signature for this body")
