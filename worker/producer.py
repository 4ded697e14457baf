"""Enqueue `clientsync.sync_client` jobs without blocking: Celery protocol v2 over redis.asyncio.

The receiver claims the event id and pushes the Celery message in one Lua script, so the
claim and the enqueue succeed or fail together: a 2xx always means "durably queued", and
a failure leaves no claim behind to swallow the sender's retry. The message is exactly
what `celery.send_task` would write to the Redis list (see
shared/external/celery-redis-messages/ and Celery's docs/internals/protocol.rst).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from worker import keys
from worker.models import ClientChange, fingerprint_of, mask_emails

SYNC_TASK = "clientsync.sync_client"

log = logging.getLogger("clientsync.producer")

#: what a 2xx promises (`CLIENTSYNC_DURABILITY`): `none` = in Redis's memory (on disk within
#: Redis's own `appendfsync` policy); `aof` = written and fsynced to Redis's AOF (WAITAOF, Redis
#: 7.2+ with appendonly); `auto` = `aof` when the Redis supports it, else `none`
Durability = Literal["none", "aof", "auto"]

# The claim holds "<task id> <payload fingerprint>": a second send of the event id with the
# same payload is a duplicate (0), with another payload a conflict (2). A claim written before
# fingerprints were kept (no space) cannot tell: a duplicate.
# One call claims and pushes a whole batch of changes, each on its own: one change's error (its
# claim key holding something else: WRONGTYPE) is that change's reply alone. A push that fails
# after its claim was set takes the claim back, so the sender's retry is not a "duplicate".
# KEYS: queue, then each change's event claim; ARGV: TTL, then each change's task id, message and
# fingerprint -> per change: 1 queued, 0 duplicate, 2 conflict, or an error reply
_CLAIM_AND_PUSH = """
local ttl = tonumber(ARGV[1])
local function claim_and_push(claim, task_id, message, fingerprint)
  if redis.call('SET', claim, task_id .. ' ' .. fingerprint, 'NX', 'EX', ttl) then
    local pushed, err = pcall(redis.call, 'LPUSH', KEYS[1], message)
    if not pushed then
      redis.call('DEL', claim)  -- not queued: no claim may swallow the sender's retry
      error(err)
    end
    return 1
  end
  local held = redis.call('GET', claim)
  local space = held and string.find(held, ' ', 1, true)
  if space and string.sub(held, space + 1) ~= fingerprint then return 2 end
  return 0
end
local replies = {}
for i = 2, #KEYS do
  local at = 2 + (i - 2) * 3
  local ok, reply = pcall(claim_and_push, KEYS[i], ARGV[at], ARGV[at + 1], ARGV[at + 2])
  if ok then
    replies[i - 1] = reply
  else
    replies[i - 1] = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  end
end
return replies
"""


def _masked(value: Any) -> Any:
    """`value` as JSON-ready data with every email in its strings masked (the reference for
    `_masked_json`, and its path for what orjson cannot write)."""
    if isinstance(value, str):
        return mask_emails(value) if "@" in value else value
    if value is None:
        return value
    if isinstance(value, dict):  # keys: strings, or numbers and the like (JSON makes them strings)
        return {_masked(k): _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    if isinstance(value, bool | int | float):
        return value
    return _masked(str(value))


def _string_at(text: bytes, at: int) -> tuple[int, int]:
    """The bounds [start, end) of a JSON string literal, quotes included, within the one that holds
    `text[at]` and ending with it.

    Inside a string a quote is escaped when an odd number of backslashes precede it, and the first
    unescaped quote after `at` closes the literal. The nearest quote before `at` opens it, or is an
    escaped quote inside it: then what follows it up to the close is still a whole literal.
    """
    start = text.rindex(b'"', 0, at)
    end = at
    while True:
        end = text.index(b'"', end)
        run = end
        while text[run - 1] == 0x5C:  # backslash
            run -= 1
        if (end - run) % 2 == 0:
            return start, end + 1
        end += 1


def _masked_json(text: bytes) -> bytes:
    """`text` (orjson's JSON of some value) with every email in its strings masked: what
    `orjson.dumps(_masked(value))` writes, but for two keys of one object that mask to the same
    text, which both stay here where `_masked`'s dict keeps the last (a property test holds them
    equal as JSON values, and byte for byte on a change).

    Only the string literals that hold an '@' are decoded, masked and written again: walking the
    whole value in Python cost about a twentieth of the receiver's time per webhook.
    """
    at = text.find(b"@")
    if at < 0:
        return text
    parts: list[bytes] = []
    done = 0
    while at >= 0:
        start, end = _string_at(text, at)
        value = orjson.loads(text[start:end])
        masked = mask_emails(value)
        if masked != value:
            parts += (text[done:start], orjson.dumps(masked))
            done = end
        at = text.find(b"@", end)
    if not parts:
        return text
    parts.append(text[done:])
    return b"".join(parts)


def _json(value: Any) -> bytes:
    """`value` as UTF-8 JSON: orjson (measured at about a quarter of `json.dumps`'s time on a
    message envelope), or the standard library for what orjson refuses (integers past 64 bits,
    lone surrogates, non-string keys)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value).encode()


def _json_and_readable(value: Any, limit: int = 1000) -> tuple[bytes, str]:
    """`value` as JSON, and as Flower and `celery inspect` show it: emails masked, bounded."""
    try:
        text = orjson.dumps(value)
        shown = _masked_json(text).decode()
    except orjson.JSONEncodeError:
        text = json.dumps(value).encode()
        shown = _json(_masked(value)).decode()
    return text, shown if len(shown) <= limit else shown[: limit - 1] + "…"


_EMBED = b'{"callbacks":null,"errbacks":null,"chain":null,"chord":null}'
_origin = ""


def _set_origin() -> None:
    """`pid@host`, as Celery writes it: asked of the system once per process (and again in a forked
    child), not per message."""
    global _origin
    _origin = f"{os.getpid()}@{socket.gethostname()}"


_set_origin()
os.register_at_fork(after_in_child=_set_origin)


def uuid4_text(raw: bytes) -> str:
    """The version 4 UUID of 16 random bytes, as `str(uuid.uuid4())` writes it (without building
    the `UUID` object: a receiver makes two per webhook)."""
    b = bytearray(raw)
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def task_message(task: str, args: list[Any], kwargs: dict[str, Any], *, queue: str, task_id: str,
                 delivery_tag: str | None = None) -> bytes:
    """A Celery message protocol v2 envelope as kombu's Redis transport stores it.

    The body is `[args, kwargs, embed]` in JSON, written from the same texts as `argsrepr` and
    `kwargsrepr` (what Flower and `celery inspect` show: emails masked, bounded).
    """
    args_json, args_shown = _json_and_readable(args)
    kwargs_json, kwargs_shown = _json_and_readable(kwargs)
    body = b"".join((b"[", args_json, b",", kwargs_json, b",", _EMBED, b"]"))
    return _json({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": args_shown,
            "kwargsrepr": kwargs_shown,
            "origin": _origin,
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": delivery_tag or uuid4_text(os.urandom(16)),
        },
    })


@dataclass(frozen=True)
class Enqueued:
    #: conflict: the event id was already received with another payload (nothing queued)
    status: Literal["queued", "duplicate", "conflict"]
    task_id: str | None


class NotDurable(redis.exceptions.RedisError):
    """The write could not be confirmed on disk as `CLIENTSYNC_DURABILITY` asks: answer 503."""


async def aof_supported(client: aioredis.Redis) -> tuple[bool, str]:
    """Whether `WAITAOF` can confirm writes on this Redis (7.2+ with appendonly), and why not."""
    info = await client.info("server")
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < (7, 2):
        return False, f"Redis {version} has no WAITAOF (needs 7.2+)"
    persistence = await client.info("persistence")
    if not int(persistence.get("aof_enabled", 0)):
        return False, f"Redis {version} runs without appendonly"
    return True, f"Redis {version} with appendonly"


class DurableWrites:
    """After a push, wait until Redis has fsynced it to its AOF, if the setting asks for it.

    `WAITAOF 1 0 timeout` covers the writes of the connection it runs on, so the caller runs it
    on the connection that pushed. Support is checked once (INFO), and again after an error:
    one check at a time, however many webhooks arrive while it runs.
    """

    def __init__(self, mode: Durability = "auto", *, timeout_seconds: float = 2.0) -> None:
        self.mode = mode
        self.timeout_ms = max(1, int(timeout_seconds * 1000))
        self._use_waitaof: bool | None = None
        self._deciding = asyncio.Lock()

    async def prepare(self, conn: aioredis.Redis) -> None:
        """Before a push: fail (NotDurable) if the setting cannot be met, so nothing is queued for a 503."""
        await self._decide(conn)

    async def wanted(self, conn: aioredis.Redis) -> bool:
        """Before a push: whether it must be followed by `wait` (WAITAOF); fails like `prepare`."""
        return await self._decide(conn)

    async def _decide(self, conn: aioredis.Redis) -> bool:
        if self._use_waitaof is None:
            if self.mode == "none":
                self._use_waitaof = False
                return False
            async with self._deciding:
                if self._use_waitaof is None:  # another request may have decided while we waited
                    ok, why = await aof_supported(conn)
                    if not ok and self.mode == "aof":
                        raise NotDurable(f"CLIENTSYNC_DURABILITY=aof needs Redis 7.2+ with appendonly yes: {why}")
                    self._use_waitaof = ok
                    log.info("durability %s: %s", self.mode, f"2xx after WAITAOF ({why})" if ok else
                             f"2xx once in Redis's memory ({why})")
        return bool(self._use_waitaof)

    async def wait(self, conn: aioredis.Redis) -> None:
        """Return once this connection's writes are as durable as the setting asks; else raise NotDurable."""
        if not await self._decide(conn):
            return
        try:
            local, _replicas = await conn.execute_command(  # type: ignore[no-untyped-call]
                "WAITAOF", 1, 0, self.timeout_ms)
        except redis.exceptions.ResponseError as exc:
            self._use_waitaof = None  # Redis changed under us (downgraded, appendonly off): look again
            if self.mode == "aof":
                raise NotDurable(f"WAITAOF failed: {exc}") from exc
            log.warning("WAITAOF failed (%s); answering without it until Redis supports it again", exc)
            return
        if int(local) < 1:
            raise NotDurable(f"the AOF write was not confirmed within {self.timeout_ms} ms")


#: one change to claim and push: its claim key, its task id, message and fingerprint
_Item = tuple[str, str, bytes, str]


class Producer:
    """Claims event ids and enqueues changes; at most one round trip per change (plus WAITAOF when
    asked): the changes that arrive while a round trip is out share the next one (`_push_waiting`)."""

    def __init__(self, redis: aioredis.Redis, *, queue: str, event_ttl: int,
                 durability: DurableWrites | None = None) -> None:
        self.redis = redis
        self.queue = queue
        self.event_ttl = event_ttl
        self.durability = durability or DurableWrites("none")
        self._claim_and_push = redis.register_script(_CLAIM_AND_PUSH)
        self._waiting: list[tuple[_Item, asyncio.Future[int]]] = []
        self._pusher: asyncio.Task[None] | None = None

    async def warm(self) -> None:
        """At start-up: load the script and settle the durability check once, so the first burst
        of webhooks does not each pay a NOSCRIPT reload and an INFO. Best effort: with Redis
        away, the first webhooks do it (and answer 503 until Redis is back)."""
        try:
            await self.redis.script_load(_CLAIM_AND_PUSH)
            async with self.redis.client() as conn:
                await self.durability.prepare(conn)
        except redis.exceptions.RedisError as exc:
            log.warning("could not prepare the receiver's Redis scripts at start-up: %s", exc)

    async def enqueue(self, change: ClientChange, *, received_at: float) -> Enqueued:
        """Queue `change` unless its event id was seen (then: a duplicate, or a conflict if the
        payload differs); raises redis errors to the caller."""
        raw = os.urandom(32)  # the task id and the delivery tag, from one system call
        task_id = uuid4_text(raw[:16])
        payload = change.model_dump(mode="json")
        message = task_message(SYNC_TASK, [payload], {"received_at": received_at}, queue=self.queue,
                               task_id=task_id, delivery_tag=uuid4_text(raw[16:]))
        item: _Item = (keys.event(change.event_id), task_id, message, fingerprint_of(payload))
        if not await self.durability.wanted(self.redis):
            pushed = await self._push(item)
        else:
            # One connection for the push and WAITAOF: WAITAOF confirms that connection's writes.
            async with self.redis.client() as conn:
                (reply,) = await self._run(conn, [item])
                pushed = self._reply(reply)
                if pushed == 1:
                    await self.durability.wait(conn)
        if pushed == 1:
            return Enqueued("queued", task_id)
        return Enqueued("conflict" if pushed == 2 else "duplicate", None)

    async def _push(self, item: _Item) -> int:
        """Claim and push one change, in the next batch out."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.create_task(self._push_waiting())
        return await done

    async def _push_waiting(self) -> None:
        """Claim and push every waiting change in one script call, answer each caller, and again
        while more wait.

        Group commit: under load, the webhooks that arrive while one call is out go together in
        the next, so redis-py's per-command cost, Redis's and the socket writes are paid once per
        batch, not per webhook (docs/benchmarks.md, Ingest). Each caller still hears its own
        change's reply, after Redis ran it: a 2xx still means queued. One change's error is that
        caller's alone.
        """
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                replies = await self._run(self.redis, [item for item, _ in batch])
            except asyncio.CancelledError:
                for _, done in batch:
                    done.cancel()
                raise
            except Exception as exc:  # the connection failed: every caller of this batch gets it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), reply in zip(batch, replies, strict=True):
                if done.done():  # its caller went away (the script ran all the same)
                    continue
                try:
                    done.set_result(self._reply(reply))
                except Exception as exc:  # its error reply (whatever class redis-py made of it)
                    done.set_exception(exc)

    async def _run(self, client: aioredis.Redis, items: list[_Item]) -> list[Any]:
        """The claim-and-push reply (or error) of each of `items`, in order, from one script call
        (redis-py's `Script` loads the script again if Redis lost it)."""
        script_keys = [self.queue] + [claim for claim, *_ in items]
        script_args: list[bytes | str | int] = [self.event_ttl]
        for _claim, task_id, message, fingerprint in items:
            script_args += (task_id, message, fingerprint)
        replies = await self._claim_and_push(keys=script_keys, args=script_args, client=client)
        return list(replies)

    @staticmethod
    def _reply(reply: Any) -> int:
        """1 queued, 0 duplicate, 2 conflict; a change's error reply is raised."""
        if isinstance(reply, Exception):
            raise reply
        return int(reply)
