"""kombu's Redis transport with every delivery owned from the moment it leaves the queue.

`BLMOVE queue inbox` instead of `BRPOP queue`, then one script (`worker.inflight.DELIVER_LUA`)
records the message in kombu's unacked hash together with its holder; the ack removes both.
A process that dies anywhere along the way leaves its message in its inbox or held set, and
a reaper (`worker.inflight.Reaper`) puts it back on its queue as soon as the process's
heartbeat (`worker.inflight.OwnerBeat`) expires. See `worker.inflight` for the whole scheme.

Used by the Celery app (`broker_transport = "tasks.transport:Transport"`); publishing is
kombu's own. One queue is watched per BLMOVE (clientsync consumes one queue; with several, the
consumer rotates between them each poll). kombu's priority sub-queues are not consumed: the
reaper moves what foreign producers put there onto the queue.
"""

from __future__ import annotations

import logging
import threading
from time import monotonic
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tasks.intake import OPTION as INTAKE_OPTION
from tasks.intake import Gate
from worker import keys
from worker.inflight import DELIVER_LUA, FLUSH_INBOX_LUA, OwnerBeat, deliver_keys, process_owner
from worker.settings import Settings

log = logging.getLogger("clientsync.transport")

# kombu's type stubs do not cover the transport's internals this module overrides.
_RedisQoS: Any = kombu_redis.QoS
_RedisChannel: Any = kombu_redis.Channel
_RedisTransport: Any = kombu_redis.Transport


#: deliveries this process recorded as its own (unacked, held) but never handed to Celery, because
#: Redis failed between the two (the intake gate's own Redis calls): delivery tag -> (queue,
#: 'restore' | 'forget'). No reaper takes them back (the process is alive) and no channel holds
#: them in memory, so the next poll of any of this process's channels does: a message Celery never
#: saw goes back to its queue; one the gate refused (already dead-lettered) is dropped.
_undelivered: dict[str, tuple[str, str]] = {}
_undelivered_lock = threading.Lock()


class QoS(_RedisQoS):  # type: ignore[misc]
    """kombu's ack emulation; the unacked entry of a tracked delivery is already written."""

    channel: Channel

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag in self.channel.tracked:
            virtual.QoS.append(self, message, delivery_tag)  # in memory only: DELIVER_LUA wrote Redis
        else:
            super().append(message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        """Ack, reject and restore all end here: drop the holder record with kombu's entry."""
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        queue = self.channel.tracked.pop(delivery_tag, None)
        if queue is not None:
            pipe.hdel(keys.HOLDERS, delivery_tag).srem(keys.held(queue, self.channel.owner), delivery_tag)
        return pipe


class Channel(_RedisChannel):  # type: ignore[misc]
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("clientsync's transport does not support kombu's global_keyprefix")
        self.owner = process_owner()
        #: delivery tag -> queue, for the deliveries this channel holds
        self.tracked: dict[Any, str] = {}
        self._blmove_queue: str | None = None
        #: queues consumed without acks (kombu's pidbox replies: `celery inspect`, Flower): no
        #: ownership to record and no task to check, popped as stock kombu pops them
        self._no_ack: set[str] = set()
        self._plain_poll = False
        self._inbox_dirty = False
        self._scripts: dict[str, Any] = {}
        url = Settings().redis_url
        if url:
            OwnerBeat.ensure(url)
        options = self.connection.client.transport_options.get(INTAKE_OPTION) or {}
        #: the intake gate (tasks.intake): every entry is checked before Celery parses it
        self.gate: Gate | None = (
            Gate(options["redis_url"], max_jobs=int(options.get("max_jobs", 100_000)))
            if options.get("redis_url") else None
        )

    def _script(self, source: str) -> Any:
        if source not in self._scripts:
            self._scripts[source] = self._create_client().register_script(source)
        return self._scripts[source]

    def _flush_inboxes(self) -> None:
        """Put back what a broken connection left in our inboxes (we are alive: no reaper will)."""
        for queue in self.active_queues:
            n = self._script(FLUSH_INBOX_LUA)(keys=[keys.inbox(queue, self.owner), queue])
            if n:
                log.warning("put %d undelivered message(s) back on %s", n, queue)
        self._inbox_dirty = False

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: Any) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack.discard(queue)
        return result

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if self._inbox_dirty:
            self._flush_inboxes()
        if _undelivered:
            self._settle_undelivered()
        queue = queues[0]
        self._blmove_queue = queue
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._plain_poll = queue in self._no_ack
        if self._plain_poll:
            self.client.connection.send_command("BRPOP", queue, timeout or 0)
            return
        self.client.connection.send_command("BLMOVE", queue, keys.inbox(queue, self.owner), "RIGHT", "LEFT",
                                            timeout or 0)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                item = self.client.parse_response(self.client.connection,
                                                  "BRPOP" if self._plain_poll else "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self._inbox_dirty = True
                raise
            queue = self._blmove_queue
            if item is None or queue is None:
                raise virtual.Empty()
            self._queue_cycle.rotate(queue)
            if self._plain_poll:  # an unacked reply: delivered as kombu delivers it
                self.connection._deliver(loads(bytes_to_str(item[1])), queue)
                return True
            recorded = self._record(queue, "inbox", item)
            if recorded is None:
                raise virtual.Empty()
            payload, raw = recorded
            self._deliver_guarded(payload, queue, raw)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _record(self, queue: str, mode: str, item: Any = "") -> tuple[Any, bytes] | None:
        """Move the message into kombu's unacked hash with its holder, then through the intake
        gate; returns it decoded with its raw entry, or None (gone, or refused: a dead letter)."""
        try:
            out = self._script(DELIVER_LUA)(keys=deliver_keys(queue, self.owner, mode=mode),
                                            args=[self.owner, queue, mode, item])
        except self.connection_errors:
            self._inbox_dirty = True
            raise
        if not out:
            return None
        raw, tracked = out
        raw = raw if isinstance(raw, bytes) else str(raw).encode()
        if self.gate is not None:
            try:
                payload = self.gate.admit(raw, queue)
            except self.connection_errors:
                if int(tracked):  # recorded as ours, but Celery will never see it: give it back later
                    self._note_undelivered(raw, queue, "restore")
                raise
            if payload is None:
                if int(tracked):  # refused after being recorded: forget the unacked record
                    try:
                        self._forget(raw)
                    except self.connection_errors:
                        self._note_undelivered(raw, queue, "forget")
                        raise
                return None
        else:
            payload = loads(bytes_to_str(raw))
        if int(tracked):
            self.tracked[payload["properties"]["delivery_tag"]] = queue
        return payload, raw

    @staticmethod
    def _tag_of(raw: bytes) -> Any:
        try:
            return loads(bytes_to_str(raw))["properties"]["delivery_tag"]
        except Exception:  # recorded means it had a readable tag; be safe anyway
            return None

    def _forget(self, raw: bytes) -> None:
        tag = self._tag_of(raw)
        if tag is not None:
            self.qos.ack(tag)

    def _note_undelivered(self, raw: bytes, queue: str, action: str) -> None:
        tag = self._tag_of(raw)
        if tag is not None:
            with _undelivered_lock:
                _undelivered[tag] = (queue, action)
            log.warning("Redis failed while taking delivery %s from %s; it will be %s on the next poll", tag, queue,
                        "put back" if action == "restore" else "dropped (it was refused)")

    def _settle_undelivered(self) -> None:
        """Give back (or drop, if refused) the deliveries recorded as ours that Celery never saw
        (`_undelivered`). A Redis error leaves the rest for the next poll."""
        with _undelivered_lock:
            pending = list(_undelivered.items())
        for tag, (queue, action) in pending:
            self.tracked[tag] = queue  # so the holder records go with kombu's entry
            try:
                if action == "restore":
                    self.qos.restore_by_tag(tag)
                else:
                    self.qos._remove_from_indices(tag).execute()
            except BaseException:
                self.tracked.pop(tag, None)
                raise
            with _undelivered_lock:
                _undelivered.pop(tag, None)
            log.warning("delivery %s that Celery never saw was %s %s", tag,
                        "put back on" if action == "restore" else "dropped from", queue)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        recorded = self._record(queue, "pop")
        if recorded is None:
            raise virtual.Empty()
        return recorded[0]

    def _get_and_deliver(self, queue: str, callback: Any) -> None:
        recorded = self._record(queue, "pop")
        if recorded is None:
            raise virtual.Empty()
        self._deliver_guarded(recorded[0], queue, recorded[1], callback)

    def _deliver_guarded(self, message: dict[str, Any], queue: str, raw: bytes, callback: Any = None) -> None:
        """Hand the message to Celery; if Celery still raises on it, ack it and dead-letter it."""
        try:
            (callback or self.connection._deliver)(message, queue)
        except self.connection_errors:
            raise
        except Exception as exc:  # whatever Celery raised, the worker must live on
            if self.gate is None:
                raise
            tag = message["properties"]["delivery_tag"]
            try:
                self.qos.ack(tag)
            except self.connection_errors:
                log.warning("could not ack the refused message %s", tag)
            self.gate.dead_letter(raw, "celery_error", "celery", f"Celery could not take the message: {exc!r}",
                                  queue=queue)


class Transport(_RedisTransport):  # type: ignore[misc]
    Channel = Channel
