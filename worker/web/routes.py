"""Every route the receiver serves, in one table: the webhook door, health, the monitor API and
the dashboard. `register` (called by the app factory) registers exactly this table and nothing
else in `worker.web` adds a route; `tests/test_routes.py` checks both.

The handlers stay in their modules (`handlers`, `monitor`, `dashboard`), and so does their
non-route setup (`monitor.setup`: counters, middleware, the Monitor). Order matters where paths
overlap: aiohttp tries routes in this order, so `/monitor/jobs/{id}/replay` comes before
`/monitor/jobs/{id}` (whose `{id:.+}` would take the `/replay` too).
"""

from __future__ import annotations

from aiohttp import web

from worker.web import dashboard, handlers, monitor

ROUTES: tuple[web.AbstractRouteDef, ...] = (
    # the receiver's own doors
    web.get("/", handlers.root),
    web.post("/webhooks/clients", handlers.receive_client_webhook),
    web.get("/healthz", handlers.healthz),
    web.get("/schema/client-change.json", handlers.schema),
    # readiness and Prometheus (no token)
    web.get("/readyz", monitor.readyz),
    web.get("/metrics", monitor.metrics),
    # the monitor API (bearer token or dashboard session; documented in openapi.yaml)
    web.get("/monitor/openapi.yaml", monitor.openapi),
    web.get("/monitor/summary", monitor.summary),
    web.get("/monitor/jobs", monitor.list_jobs),
    web.post("/monitor/replay", monitor.replay_bulk),
    web.post("/monitor/jobs/{id:.+}/replay", monitor.replay_job),
    web.post("/monitor/jobs/{id:.+}/discard", monitor.discard_job),
    web.post("/monitor/jobs/{id:.+}/resolve", monitor.resolve_job),
    web.get("/monitor/jobs/{id:.+}", monitor.get_job),
    web.post("/monitor/providers/{provider}/{action}", monitor.provider_action),
    web.get("/monitor/audit", monitor.audit),
    web.get("/monitor/dead-groups", monitor.dead_groups),
    web.get("/monitor/clients/{client_id}", monitor.get_client),
    # the dashboard (its page, sign-in and sign-out, and its static files)
    web.get("/dashboard", dashboard.dashboard),
    web.post("/dashboard/login", dashboard.login),
    web.post("/dashboard/logout", dashboard.logout),
    web.static("/dashboard/static", dashboard.STATIC, append_version=False),
)


def register(app: web.Application) -> None:
    """Register `ROUTES` on the app: the only place in `worker.web` that adds routes."""
    app.router.add_routes(ROUTES)
