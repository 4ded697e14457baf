"""The receiver's app factory: `create_app(settings, redis_url)`; resources live in cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from worker.producer import DurableWrites, Producer
from worker.settings import Settings
from worker.web import monitor as monitor_web
from worker.web import routes
from worker.web.keys import METRICS, MONITOR, PRODUCER, REDIS, SETTINGS, WEBHOOK_KEYS
from worker.web.middlewares import error_middleware
from worker.web.signatures import decode_secret

log = logging.getLogger("clientsync.web")

__all__ = ["METRICS", "MONITOR", "PRODUCER", "REDIS", "SETTINGS", "WEBHOOK_KEYS", "create_app"]


def create_app(settings: Settings, redis_url: str) -> web.Application:
    """The receiver: webhooks, health, and (see `worker.web.monitor`) the operator's view."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[WEBHOOK_KEYS] = [decode_secret(s) for s in settings.webhook_secrets()]
    if not app[WEBHOOK_KEYS]:
        log.warning("CLIENTSYNC_WEBHOOK_SECRET is not set: every webhook will be answered 401")

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        # Short timeouts: a stuck Redis must turn into a quick 503, not a hung sender.
        client = aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=3)
        app[REDIS] = client
        app[PRODUCER] = Producer(client, queue=settings.queue, event_ttl=settings.event_ttl_seconds,
                                 durability=DurableWrites(settings.durability,
                                                          timeout_seconds=settings.durability_timeout_seconds))
        await app[PRODUCER].warm()
        yield
        await client.aclose()

    app.cleanup_ctx.append(redis_ctx)
    monitor_web.setup(app)  # the receiver's counters and middleware, the Monitor
    routes.register(app)  # every route: worker.web.routes.ROUTES
    return app

