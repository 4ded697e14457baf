"""The one sync→async bridge: per worker process, one event loop and pooled sessions.

Celery task bodies are synchronous; the adapters and stores are async. Each worker process
starts one event loop in a daemon thread and opens, on it, one Redis client and one
aiohttp session shared by every adapter (connection pooling per host). Tasks submit
coroutines with `Runtime.run`; nothing calls `asyncio.run` per task. After a fork (the
prefork pool) the child builds its own runtime: loops and sockets do not survive a fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis

from worker.circuit import CircuitBreaker
from worker.heartbeat import Heartbeat
from worker.inflight import OwnerBeat, Reaper, process_owner
from worker.jobs import JobContext, RetryPolicy, before_call_hook
from worker.ledger import Ledger
from worker.parking import Parking
from worker.providers import adapter_class, load_configs
from worker.providers.qonto_auth import RedisTokenStore
from worker.ratelimit import RateLimiter, limit_for
from worker.responses import ResponseCounter
from worker.settings import Settings
from worker.store import SyncStore

T = TypeVar("T")
log = logging.getLogger("clientsync.runtime")


class Runtime:
    """Per-process resources; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise RuntimeError("CLIENTSYNC_REDIS_URL is not set")
        self.settings = settings
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="clientsync-loop", daemon=True)
        self._thread.start()
        self.context: JobContext = self.run(self._open())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the process's loop and wait for its result (from a task thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _open(self) -> JobContext:
        s = self.settings
        assert s.redis_url is not None
        # A blocking pool: under load a command waits for a free connection instead of failing
        # with MaxConnectionsError. Each job holds at most one connection at a time, and every
        # provider's first attempt runs at once: size for concurrency x providers.
        # A command holds a connection for one round trip, so the loop pool's hundreds of
        # changes in flight share far fewer (a command waits for a free one).
        concurrency = s.concurrency()
        self.redis_connections = min(256, max(32, concurrency * 6))
        self.http_per_host = max(20, concurrency * 2)
        pool = aioredis.BlockingConnectionPool.from_url(s.redis_url, max_connections=self.redis_connections,
                                                        timeout=30)
        self.redis = aioredis.Redis(connection_pool=pool)
        configs = load_configs()
        # Every provider answer counted by status, off the request's path (worker.responses).
        self.responses = ResponseCounter({name: str(c.url or adapter_class(name).default_url)
                                          for name, c in configs.items() if c.is_configured()})
        self._flush_task = asyncio.get_running_loop().create_task(self.responses.run_flusher(self.redis))
        # One session for every adapter: the connector pools connections per host.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(200, self.http_per_host * max(1, len(configs))),
                                     limit_per_host=self.http_per_host),
            headers={"User-Agent": "clientsync/0.1"},
            trace_configs=[self.responses.trace_config()],
        )
        adapters, policies, disabled, limits = {}, {}, {}, {}
        for name, config in configs.items():
            if not config.is_configured():
                disabled[name] = config.missing()
                continue
            adapters[name] = adapter_class(name)(config, self.session)
            policies[name] = RetryPolicy.for_provider(
                config, max_attempts=s.max_attempts, base=s.retry_base_seconds, cap=s.retry_cap_seconds,
            )
            limits[name] = limit_for(name, config)
        # The retry engine: shared rate limits, circuits and parked retries, all in Redis.
        limiter = RateLimiter(self.redis, limits, max_wait=s.rate_wait_seconds)
        for adapter in adapters.values():
            adapter.before_call = before_call_hook(limiter)
            if hasattr(adapter, "token_store"):  # OAuth providers share their token through Redis
                adapter.token_store = RedisTokenStore(self.redis, adapter.name)
        parking = Parking(self.redis, queue=s.queue)
        self._mover_task = asyncio.get_running_loop().create_task(parking.run_mover(s.park_poll_seconds))
        # This process owns the jobs it runs: its beat (a thread of its own) keeps them; when a
        # process's beat stops, any worker's reaper gives its messages and running jobs back.
        owner = process_owner()
        self.owner_beat = OwnerBeat.ensure(s.redis_url)
        # Liveness for /readyz and the summary: see worker.heartbeat for when a beat is fresh.
        self.heartbeat = Heartbeat(self.redis, owner, s.heartbeat_seconds)
        self._beat_task = asyncio.get_running_loop().create_task(self.heartbeat.run())
        ledger = Ledger(self.redis, max_jobs=s.ledger_max_jobs, max_age_seconds=s.ledger_max_age_seconds,
                        trim_every=s.ledger_trim_every, change_ttl_seconds=s.ledger_change_ttl_seconds)
        reaper = Reaper(self.redis, ledger, queues=[s.queue])
        self._sweep_task = asyncio.get_running_loop().create_task(reaper.run(s.reaper_interval_seconds))
        self._trim_task = asyncio.get_running_loop().create_task(
            ledger.run_retention(s.ledger_trim_interval_seconds))
        return JobContext(
            store=SyncStore(self.redis, idempotency_ttl=s.idempotency_ttl_seconds, lease_seconds=s.lease_seconds),
            ledger=ledger,
            adapters=adapters,
            policies=policies,
            disabled=disabled,
            owner=owner,
            lock_wait=s.lock_wait_seconds,
            rng=random.Random(),
            parking=parking,
            limiter=limiter,
            circuit=CircuitBreaker(
                self.redis, threshold=s.circuit_failure_threshold, cooldown=s.circuit_cooldown_seconds,
                max_cooldown=s.circuit_max_cooldown_seconds, probe_lease=s.circuit_probe_lease_seconds,
            ),
            retry_after_max=s.retry_after_max_seconds,
            circuit_recheck=s.circuit_recheck_seconds,
            countdown_max=s.visibility_timeout / 4,
        )

    async def _forget_heartbeat(self) -> None:
        """A clean stop removes this process's heartbeat at once: /readyz and the summary must
        not count a worker that is gone (a killed one stops counting once its last beat is stale)."""
        try:
            await self.heartbeat.forget()
        except Exception:  # Redis away: the beat ages out on its own
            log.warning("could not remove the heartbeat", exc_info=True)

    async def _close(self) -> None:
        self._beat_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._beat_task  # no beat in flight may land after the delete
        await self._forget_heartbeat()
        self._trim_task.cancel()
        self._mover_task.cancel()
        self._sweep_task.cancel()
        self._flush_task.cancel()
        await self.session.close()
        try:
            await self.responses.flush(self.redis)
        except Exception:  # Redis away at stop: these last counts are lost, nothing else is
            log.warning("could not flush provider response counts at stop", exc_info=True)
        await self.redis.aclose()

    def close(self) -> None:
        try:
            self.run(self._close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """This process's runtime, created on first use (and again in a forked child)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime(Settings())
            names = ", ".join(sorted(_runtime.context.adapters)) or "none"
            log.info("worker runtime ready (pid %s): providers enabled: %s; %s pool of %d, Redis pool of %d "
                     "connections, %d HTTP connections per host", os.getpid(), names, _runtime.settings.worker_pool,
                     _runtime.settings.concurrency(), _runtime.redis_connections, _runtime.http_per_host)
            for name, why in sorted(_runtime.context.disabled.items()):
                log.warning("provider %s is disabled: %s", name, why)
        return _runtime


def close_runtime() -> None:
    global _runtime
    with _lock:
        if _runtime is not None and _runtime.pid == os.getpid():
            _runtime.close()
        _runtime = None
