"""Worker heartbeats live in one hash (worker.heartbeat): a beat writes its own entry and drops
those of workers silent for longer than KEEP_BEATS of their intervals; a reader lists the rest."""

from __future__ import annotations

import redis.asyncio as aioredis

from worker import heartbeat, keys


async def test_a_beat_keeps_recent_workers_and_drops_long_silent_and_unreadable_ones(r: aioredis.Redis) -> None:
    seconds, micros = await r.time()
    now_ms = seconds * 1000 + micros // 1000
    every = 10.0
    await r.hset(keys.HEARTBEATS, mapping={
        "host:old": f"{now_ms - int((heartbeat.KEEP_BEATS * every + 5) * 1000)} {every!r}",  # long silent
        "host:stale": f"{now_ms - int((heartbeat.FRESH_BEATS * every + 5) * 1000)} {every!r}",  # silent, kept
        "host:bad": "1",  # unreadable
    })
    await heartbeat.Heartbeat(r, "host:me", every).beat_once()
    assert sorted(await r.hkeys(keys.HEARTBEATS)) == ["host:me", "host:stale"]
    seen = await heartbeat.read(r)
    assert [(s.worker, s.live) for s in seen] == [("host:me", True), ("host:stale", False)]
    await heartbeat.Heartbeat(r, "host:me", every).forget()
    assert await r.hkeys(keys.HEARTBEATS) == ["host:stale"]
