"""What every sandbox simulator shares: an in-memory store, auth, fault knobs, a control API.

A simulator is a real aiohttp application that speaks one provider's Clients API. Each is
mounted under `/<provider name>` by `worker.sandbox.server`, so the adapter's base URL
for the sandbox is `http://127.0.0.1:<port>/<provider name>`.

Control endpoints (no provider auth; loopback only), under the same prefix:
- `GET  /_sandbox/clients`  every stored record, deleted ones included (`{"clients": [...]}`)
- `GET  /_sandbox/calls`    the request log (`{"calls": [{"method", "path", "status", "at"}]}`)
- `GET  /_sandbox/faults`, `POST /_sandbox/faults` (JSON body = `Faults` fields to change)
- `POST /_sandbox/reset`    forget clients, calls and faults
- `GET  /_sandbox/settings`, `POST /_sandbox/settings` (JSON body = fields of the sandbox's
  `readings_class` to change): one switch for each reading of what the provider's docs leave open
"""

from __future__ import annotations

import asyncio
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Faults:
    """Fault knobs, settable at start-up and at run time. Counters are consumed per request."""

    latency_ms: float = 0.0  # added to every provider call
    error_rate: float = 0.0  # fraction of calls answered `error_status` (random, seeded)
    error_status: int = 503
    fail_next: int = 0  # the next N calls answer `error_status`
    fail_until: float = 0.0  # unix time: every call before it answers `error_status`
    throttle_next: int = 0  # the next N calls answer 429
    throttle_until: float = 0.0  # unix time: every call before it answers 429
    retry_after: float | None = 1.0  # Retry-After on 429s (None = no header)
    hang_next: int = 0  # the next N calls hang for `hang_seconds` (client sees a timeout)
    hang_seconds: float = 30.0
    # --- the three unclear endings of a write (any non-GET call, filtered by `write_match`) ---
    fail_after_commit_next: int = 0  # the next N writes are applied, then answered 503
    drop_after_commit_next: int = 0  # the next N writes are applied, then the connection is dropped
    #: the next N writes hang `hang_seconds` (past the client's timeout: it gives up) and are applied then
    apply_late_next: int = 0
    #: fraction of writes that end in one of the three endings above (random, seeded; chaos runs)
    unclear_rate: float = 0.0
    #: only writes whose "METHOD /path" contains this text get the write faults ("" = every write;
    #: e.g. "DELETE", "POST /v2/clients", "PUT ")
    write_match: str = ""
    seed: int = 0
    #: every provider call waits while this is on (GET /_sandbox/inflight counts the waiting ones)
    hold: bool = False


@dataclass
class Call:
    method: str
    path: str
    status: int
    at: float = field(default_factory=time.time)


class SandboxProvider(ABC):
    """Base of the simulators: subclasses declare routes over `self.clients`."""

    name: ClassVar[str]
    #: a dataclass with one field per open question in the provider's docs, each a switch
    #: between its readings (None: the docs leave nothing open that the sandbox simulates)
    readings_class: ClassVar[type[Any] | None] = None

    def __init__(self, *, credentials: dict[str, str] | None = None, faults: Faults | None = None,
                 readings: Any = None) -> None:
        self.credentials = dict(credentials or self.default_credentials())
        self.faults = faults or Faults()
        self.readings: Any = readings if readings is not None else self._fresh_readings()
        self.clients: dict[str, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self._random = random.Random(self.faults.seed)
        self._next_id = 1
        #: provider calls being handled now, and the most at once since the last reset
        self.in_flight = 0
        self.peak_in_flight = 0
        #: set while calls may go ahead (the `hold` knob clears it)
        self._released = asyncio.Event()
        self._hold(self.faults.hold)

    # --- subclass API ------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def default_credentials(cls) -> dict[str, str]:
        """The credentials the sandbox accepts by default (the adapter's env var values)."""

    @abstractmethod
    def is_authorised(self, request: web.Request) -> bool:
        """Whether the request carries this provider's valid auth header."""

    @abstractmethod
    def unauthorised(self) -> web.Response:
        """The provider's own answer to bad auth (status and body)."""

    @abstractmethod
    def add_routes(self, app: web.Application) -> None:
        """Register the provider's API routes on `app` (paths as the real API has them)."""

    def rate_limited(self, retry_after: float | None) -> web.Response:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        return web.json_response({"message": "Too many requests"}, status=429, headers=headers)

    def server_error(self, status: int) -> web.Response:
        return web.json_response({"message": "Service unavailable (sandbox fault)"}, status=status)

    def env(self, base_url: str) -> dict[str, str]:
        """Environment variables that point the adapter at this sandbox."""
        raise NotImplementedError

    # --- helpers for subclasses -----------------------------------------------------------
    def new_id(self) -> str:
        value = str(self._next_id)
        self._next_id += 1
        return value

    # --- the application ------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults_and_auth])
        app.router.add_get("/_sandbox/clients", self._control_clients)
        app.router.add_get("/_sandbox/calls", self._control_calls)
        app.router.add_get("/_sandbox/inflight", self._control_inflight)
        app.router.add_get("/_sandbox/faults", self._control_get_faults)
        app.router.add_post("/_sandbox/faults", self._control_set_faults)
        app.router.add_post("/_sandbox/reset", self._control_reset)
        if self.readings_class is not None:
            app.router.add_get("/_sandbox/settings", self._control_get_readings)
            app.router.add_post("/_sandbox/settings", self._control_set_readings)
        self.add_routes(app)
        return app

    @web.middleware
    async def _faults_and_auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if "/_sandbox/" in request.path:
            return await handler(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await self._released.wait()
            response = await self._apply(request, handler)
        except ConnectionResetError:
            self.calls.append(Call(request.method, request.path_qs, 0))  # 0: no answer was sent
            raise
        finally:
            self.in_flight -= 1
        self.calls.append(Call(request.method, request.path_qs, response.status))
        return response

    async def _apply(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        f = self.faults
        now = time.time()
        if f.latency_ms:
            await asyncio.sleep(f.latency_ms / 1000)
        if f.hang_next > 0:
            f.hang_next -= 1
            await asyncio.sleep(f.hang_seconds)
        if f.throttle_next > 0 or now < f.throttle_until:
            f.throttle_next = max(0, f.throttle_next - 1)
            return self.rate_limited(f.retry_after)
        if f.fail_next > 0 or now < f.fail_until or (f.error_rate and self._random.random() < f.error_rate):
            f.fail_next = max(0, f.fail_next - 1)
            return self.server_error(f.error_status)
        if not self.is_authorised(request):
            return self.unauthorised()
        ending = self._unclear_ending(request)
        if ending == "late":
            # The caller times out and gives up; the provider still finishes the write later.
            # The body is read first (cached on the request), as a server would have it already.
            await request.read()
            await asyncio.sleep(f.hang_seconds)
            # Shielded: the write lands even though nobody waits for the answer any more.
            return await asyncio.shield(self._handle(request, handler))
        response = await self._handle(request, handler)
        if ending == "5xx" and response.status < 300:
            # The write happened but the caller never learns it: a 5xx after applying.
            return self.server_error(503)
        if ending == "drop" and response.status < 300:
            # The write happened, then the connection dropped before the answer.
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("sandbox fault: connection dropped after the write")
        return response

    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            # Unknown routes and methods: answer JSON like an API would.
            return web.json_response({"message": exc.reason}, status=exc.status)

    def _unclear_ending(self, request: web.Request) -> str | None:
        """Which unclear ending (if any) this write gets: consumes one fault counter."""
        f = self.faults
        if request.method == "GET" or (f.write_match and f.write_match not in f"{request.method} {request.path}"):
            return None
        if f.fail_after_commit_next > 0:
            f.fail_after_commit_next -= 1
            return "5xx"
        if f.drop_after_commit_next > 0:
            f.drop_after_commit_next -= 1
            return "drop"
        if f.apply_late_next > 0:
            f.apply_late_next -= 1
            return "late"
        if f.unclear_rate and self._random.random() < f.unclear_rate:
            return self._random.choice(("5xx", "drop", "late"))
        return None

    async def _control_clients(self, request: web.Request) -> web.Response:
        return web.json_response({"clients": list(self.clients.values())})

    async def _control_calls(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": [asdict(c) for c in self.calls]})

    async def _control_inflight(self, request: web.Request) -> web.Response:
        return web.json_response({"now": self.in_flight, "peak": self.peak_in_flight})

    async def _control_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def _control_set_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"message": "body must be a JSON object"}, status=400)
        known = {f.name: f.type for f in fields(Faults)}
        if not isinstance(body, dict) or set(body) - set(known):
            return web.json_response(
                {"message": f"unknown fault knobs; known: {', '.join(known)}"}, status=400
            )
        for key, value in body.items():
            setattr(self.faults, key, value)
        if "seed" in body:
            self._random = random.Random(self.faults.seed)
        self._hold(self.faults.hold)
        return web.json_response(asdict(self.faults))

    def _hold(self, hold: bool) -> None:
        if hold:
            self._released.clear()
        else:
            self._released.set()

    def _fresh_readings(self) -> Any:
        return self.readings_class() if self.readings_class is not None else None

    async def _control_get_readings(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.readings))

    async def _control_set_readings(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        known = {f.name for f in fields(self.readings)}
        if not isinstance(body, dict) or not body or set(body) - known:
            return web.json_response({"message": f"known settings: {', '.join(sorted(known))}"}, status=400)
        for key, value in body.items():
            setattr(self.readings, key, value)
        return web.json_response(asdict(self.readings))

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.readings = self._fresh_readings()
        self.clients.clear()
        self.calls.clear()
        self.faults = Faults()
        self._random = random.Random(0)
        self._next_id = 1
        self.peak_in_flight = self.in_flight
        self._hold(False)
        return web.json_response({"ok": True})
