"""`clientsync_provider_responses_total{provider,status}`: every provider answer, counted across
every worker process.

An aiohttp `TraceConfig` on the worker's shared session counts each response by provider (the
request URL's longest matching provider base URL) and status (`error` when no answer came: a
timeout or a reset connection) in a per-process dict; nothing on the request's path waits for
Redis. A background task flushes the counts to one Redis hash (`keys.PROVIDER_RESPONSES`) with
HINCRBY in one pipeline every second, and once more at a clean stop; /metrics reads the hash.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from types import SimpleNamespace

import aiohttp
import redis.asyncio as aioredis

from worker import keys

log = logging.getLogger("clientsync.responses")

#: the status label of a call that got no HTTP answer
NO_ANSWER = "error"


def field(provider: str, status: str) -> str:
    """The hash field of one (provider, status) count."""
    return f"{provider}|{status}"


def parse_field(name: str) -> tuple[str, str] | None:
    provider, sep, status = name.rpartition("|")
    return (provider, status) if sep and provider else None


class ResponseCounter:
    """Per-process counts of provider responses, flushed to Redis (see the module docstring)."""

    def __init__(self, base_urls: Mapping[str, str]) -> None:
        # longest base first: a provider whose URL extends another's wins
        self._bases = sorted(((url.rstrip("/"), name) for name, url in base_urls.items() if url),
                             key=lambda x: len(x[0]), reverse=True)
        self.pending: Counter[tuple[str, str]] = Counter()

    def provider_of(self, url: str) -> str | None:
        for base, name in self._bases:
            if url == base or url.startswith((base + "/", base + "?")):
                return name
        return None

    def count(self, url: str, status: str) -> None:
        provider = self.provider_of(url)
        if provider is not None:
            self.pending[(provider, status)] += 1

    def trace_config(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def on_end(_: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
            self.count(str(params.url), str(params.response.status))

        async def on_error(_: aiohttp.ClientSession, __: SimpleNamespace,
                           params: aiohttp.TraceRequestExceptionParams) -> None:
            self.count(str(params.url), NO_ANSWER)

        config.on_request_end.append(on_end)
        config.on_request_exception.append(on_error)
        return config

    async def flush(self, redis: aioredis.Redis) -> None:
        """Add the pending counts to the shared hash in one pipeline; kept for the next flush on failure."""
        if not self.pending:
            return
        taken, self.pending = self.pending, Counter()
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for (provider, status), n in taken.items():
                    pipe.hincrby(keys.PROVIDER_RESPONSES, field(provider, status), n)
                await pipe.execute()
        except Exception:
            self.pending.update(taken)
            raise

    async def run_flusher(self, redis: aioredis.Redis, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush(redis)
            except Exception:  # Redis away: the counts wait in memory for the next flush
                log.warning("could not flush provider response counts", exc_info=True)
