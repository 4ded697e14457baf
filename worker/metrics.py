"""Prometheus metrics for `GET /metrics`.

Two sources:

- **Shared, from Redis** (`Monitor.snapshot`): the ledger's per-provider counters and the
  receipt-to-applied latency histogram, which the workers' transition scripts keep in Redis
  (workers are separate processes from the receiver), the jobs per state, the queue depth,
  the circuit state and the rate-limit tokens. Read asynchronously first, then rendered by a
  collector over that snapshot, so a scrape never blocks the receiver's event loop.
- **Local to this receiver process**: webhooks received, duplicates and rejections by reason,
  plain prometheus-client counters in a per-app registry, updated by a middleware that looks
  at each webhook's status code.

Labels are provider names, states and fixed reasons only: no email, event id or secret.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from worker.ledger import STATES, bucket_label

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: webhook status -> rejection reason (anything else 4xx/5xx: `other`)
_REASONS = {400: "invalid_json", 401: "signature", 409: "conflict", 413: "too_large", 415: "content_type",
            422: "invalid_change",
            503: "unavailable"}

_COUNTER_DOCS = {
    "enqueued": "Jobs opened in the ledger (one per event and provider).",
    "applied": "Jobs that reached succeeded (applied at the provider).",
    "retried": "Attempts that failed transiently and were scheduled for a retry.",
    "parked": "Jobs parked without spending an attempt (circuit open, rate limit).",
    "dead": "Jobs that went dead (permanent error or attempts exhausted).",
    "skipped": "Jobs skipped (stale, unsupported or not linked).",
    "replayed": "Dead or discarded jobs an operator replayed.",
    "discarded": "Dead jobs an operator discarded.",
}


class ReceiverMetrics:
    """Counters of this receiver process, in their own registry (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter("clientsync_webhooks_received", "Webhook requests received.",
                                registry=self.registry)
        self.queued = Counter("clientsync_webhooks_queued", "Webhook events durably queued.",
                              registry=self.registry)
        self.duplicates = Counter("clientsync_webhooks_duplicates",
                                  "Webhook events answered as duplicates (already seen), not queued.",
                                  registry=self.registry)
        self.rejected = Counter("clientsync_webhooks_rejected", "Webhook requests rejected, by reason.",
                                ["reason"], registry=self.registry)
        for reason in (*_REASONS.values(), "other"):
            self.rejected.labels(reason)

    def observe_webhook(self, status: int) -> None:
        self.received.inc()
        if status == 202:
            self.queued.inc()
        elif status == 200:
            self.duplicates.inc()
        elif status >= 400:
            self.rejected.labels(_REASONS.get(status, "other")).inc()


class SnapshotCollector:
    """Renders one `Monitor.snapshot()` as metric families."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        providers: dict[str, Any] = snap["providers"]
        depth = GaugeMetricFamily("clientsync_queue_depth", "Messages waiting in the Celery queue (LLEN).",
                                  labels=["queue"])
        depth.add_metric([snap["queue"]], snap["queue_depth"])
        yield depth
        for name, doc in _COUNTER_DOCS.items():
            family = CounterMetricFamily(f"clientsync_jobs_{name}", doc, labels=["provider"])
            for p, v in providers.items():
                family.add_metric([p], v["counters"][name])
            yield family
        jobs = GaugeMetricFamily("clientsync_jobs", "Jobs in the ledger, by provider and state.",
                                 labels=["provider", "state"])
        for p, v in providers.items():
            for s in STATES:
                jobs.add_metric([p, s], v["counts"][s])
        yield jobs
        latency = HistogramMetricFamily("clientsync_apply_latency_seconds",
                                        "Seconds from receipt of the event to the change applied at the provider.",
                                        labels=["provider"])
        for p, v in providers.items():
            lat = v["latency"]
            running, buckets = 0, []
            for bound, n in lat["buckets"]:
                running += n
                buckets.append((bucket_label(bound), running))
            buckets.append(("+Inf", running + lat["inf"]))
            latency.add_metric([p], buckets, lat["sum"])
        yield latency
        circuit = GaugeMetricFamily("clientsync_circuit_state",
                                    "Circuit breaker state per provider: 1 for the current state.",
                                    labels=["provider", "state"])
        for p, v in providers.items():
            current = v["circuit"]["state"]
            for name in ("closed", "open", "half_open", "auth_failed", "paused", "unknown"):
                circuit.add_metric([p, name], 1.0 if name == current else 0.0)
        yield circuit
        letters = CounterMetricFamily("clientsync_dead_letters",
                                      "Messages that never became a valid job (dead letters), by reason.",
                                      labels=["reason"])
        for reason, n in sorted(snap.get("dead_letters", {}).items()):
            letters.add_metric([reason], n)
        yield letters
        answers = CounterMetricFamily("clientsync_provider_responses",
                                      "Provider responses by HTTP status (error: no answer), from every worker.",
                                      labels=["provider", "status"])
        for p, statuses in sorted(snap.get("responses", {}).items()):
            for status, n in sorted(statuses.items()):
                answers.add_metric([p, status], n)
        yield answers
        tokens = GaugeMetricFamily("clientsync_rate_limit_tokens",
                                   "Rate-limit tokens available now per provider (negative: calls booked ahead).",
                                   labels=["provider"])
        for p, v in providers.items():
            if "tokens" in v["rate_limit"]:
                tokens.add_metric([p], v["rate_limit"]["tokens"])
        yield tokens
        capacity = GaugeMetricFamily("clientsync_rate_limit_capacity",
                                     "Rate-limit bucket size per provider (calls that may start at once).",
                                     labels=["provider"])
        for p, v in providers.items():
            if "capacity" in v["rate_limit"]:
                capacity.add_metric([p], v["rate_limit"]["capacity"])
        yield capacity
        info = GaugeMetricFamily("clientsync_build_info", "clientsync's version and Python (always 1).",
                                 labels=["version", "python"])
        info.add_metric([_version(), platform.python_version()], 1.0)
        yield info


def _version() -> str:
    try:
        return importlib.metadata.version("clientsync")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def render(snapshot: dict[str, Any], local: ReceiverMetrics) -> bytes:
    """The text exposition of the shared snapshot followed by this process's counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry) + generate_latest(local.registry)


def webhook_middleware(metrics: ReceiverMetrics) -> Any:
    """Counts every `/webhooks/` request by the status it was answered with."""

    @web.middleware
    async def count_webhooks(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/webhooks/"):
            response: web.StreamResponse = await handler(request)
            return response
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.observe_webhook(exc.status)
            raise
        metrics.observe_webhook(response.status)
        return response

    return count_webhooks
