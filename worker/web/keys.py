"""The receiver app's typed keys, apart from `app.py` so handlers never import the app factory."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from worker.metrics import ReceiverMetrics
from worker.monitor import Monitor
from worker.producer import Producer
from worker.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
PRODUCER = web.AppKey("producer", Producer)
WEBHOOK_KEYS: web.AppKey[list[bytes]] = web.AppKey("webhook_keys")
MONITOR = web.AppKey("monitor", Monitor)
METRICS = web.AppKey("metrics", ReceiverMetrics)
