"""One place builds routes: the app's router holds exactly `worker.web.routes.ROUTES`, and no other
module in `worker/web` registers a route."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.conftest import REPO
from worker.settings import Settings
from worker.web.app import create_app
from worker.web.routes import ROUTES

WEB = REPO / "worker" / "web"
BUILDER = WEB / "routes.py"
#: the router methods that add a route or a resource
REGISTERING = {"add_get", "add_post", "add_put", "add_patch", "add_delete", "add_head", "add_route", "add_static",
               "add_routes", "add_resource", "add_view"}


def routed(app: web.Application) -> tuple[list[tuple[str, str, Any]], list[tuple[str, Path]]]:
    """(method, path, handler) of every route on the app's router, and (prefix, directory) of every static one."""
    plain: list[tuple[str, str, Any]] = []
    static: list[tuple[str, Path]] = []
    for resource in app.router.resources():
        if isinstance(resource, web.StaticResource):
            info = resource.get_info()
            static.append((info["prefix"], Path(info["directory"])))
            continue
        for route in resource:
            plain.append((route.method, resource.canonical, route.handler))
    return plain, static


def canonical(path: str) -> str:
    """A path as the router names its resource: `{id:.+}` is `{id}`."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def table() -> tuple[list[tuple[str, str, Any]], list[tuple[str, Path]]]:
    """What the table says should be routed (a GET answers HEAD too, as aiohttp's add_get does)."""
    plain: list[tuple[str, str, Any]] = []
    static: list[tuple[str, Path]] = []
    for entry in ROUTES:
        if isinstance(entry, web.StaticDef):
            static.append((entry.prefix, Path(entry.path).resolve()))
            continue
        assert isinstance(entry, web.RouteDef), entry
        path = canonical(entry.path)
        plain.append((entry.method, path, entry.handler))
        if entry.method == "GET" and entry.kwargs.get("allow_head", True):
            plain.append(("HEAD", path, entry.handler))
    return plain, static


def test_the_app_routes_exactly_the_table() -> None:
    app = create_app(Settings(), "redis://127.0.0.1:1/0")  # nothing connects before startup
    actual_plain, actual_static = routed(app)
    want_plain, want_static = table()
    assert sorted(actual_plain, key=repr) == sorted(want_plain, key=repr)
    assert actual_static == want_static
    # the table covers all three parts: the receiver, the monitor API and the dashboard
    paths = {path for _, path, _ in actual_plain}
    assert {"/webhooks/clients", "/healthz", "/readyz", "/metrics", "/monitor/summary", "/dashboard",
            "/dashboard/login"} <= paths
    assert [prefix for prefix, _ in actual_static] == ["/dashboard/static"]


def test_every_path_in_the_openapi_document_is_in_the_table() -> None:
    import yaml

    document = yaml.safe_load((WEB / "openapi.yaml").read_text())
    plain, _ = table()
    routed_paths = {(method.lower(), path) for method, path, _ in plain}
    for path, operations in document["paths"].items():
        for method in operations:
            if method in ("get", "post", "put", "patch", "delete"):
                assert (method, path) in routed_paths, (method, path)


def registering_calls(source: str) -> list[str]:
    """Names of the route-registering methods `source` calls (`x.add_get(...)`, `router.add_static(...)`...)."""
    return [node.func.attr for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in REGISTERING]


def test_no_module_in_worker_web_but_the_route_builder_registers_routes() -> None:
    found = {path.name: calls for path in sorted(WEB.rglob("*.py"))
             if (calls := registering_calls(path.read_text(encoding="utf-8")))}
    assert found == {BUILDER.name: ["add_routes"]}
    # and the scan does see a registration written the old way
    assert registering_calls("def setup(app):\n    app.router.add_get('/x', h)\n    r.add_static('/s', d)\n") == [
        "add_get", "add_static"]
