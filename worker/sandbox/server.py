"""Serve every simulator on one loopback port, each under `/<provider name>`."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from worker.sandbox import SIMULATORS, simulator_class
from worker.sandbox.base import Faults, SandboxProvider


@dataclass
class RunningSandbox:
    """A started sandbox server: its simulators, URLs and the env that points adapters at it."""

    runner: web.AppRunner
    port: int
    simulators: dict[str, SandboxProvider] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def env(self) -> dict[str, str]:
        """`CLIENTSYNC_*` variables that enable every simulated provider against this server."""
        out: dict[str, str] = {}
        for name, sim in self.simulators.items():
            out.update(sim.env(self.base_url(name)))
        return out

    async def stop(self) -> None:
        await self.runner.cleanup()


def build_app(simulators: dict[str, SandboxProvider]) -> web.Application:
    root = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.json_response({name: f"/{name}" for name in simulators})

    root.router.add_get("/", index)
    for name, sim in simulators.items():
        root.add_subapp(f"/{name}", sim.app())
    return root


def make_simulators(
    names: list[str] | None = None, faults: dict[str, Faults] | None = None
) -> dict[str, SandboxProvider]:
    chosen = names or list(SIMULATORS)
    return {n: simulator_class(n)(faults=(faults or {}).get(n)) for n in chosen}


async def start_sandbox(
    host: str = "127.0.0.1",
    port: int = 0,
    names: list[str] | None = None,
    faults: dict[str, Faults] | None = None,
) -> RunningSandbox:
    """Start the simulators on `host:port` (0 = any free port)."""
    simulators = make_simulators(names, faults)
    runner = web.AppRunner(build_app(simulators), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return RunningSandbox(runner=runner, port=bound, simulators=simulators)
