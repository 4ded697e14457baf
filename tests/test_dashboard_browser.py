"""The dashboard in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

A person's path: open /dashboard, type the token into the login form and click "Sign in", see
the dead job (emails masked), open its timeline, click "Replay", and watch it succeed. The
whole system runs as real processes (Redis, sandbox, receiver, Celery worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, running_stack, uid
from tests.helpers import change, post_webhook, sandbox_clients, set_faults, wait_jobs
from worker import keys
from worker.launcher import Stack

PROVIDER = "lsp_expert"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "var" / "test-artifacts"



class Browser:
    """A minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"devtools connection closed: {msg.type}")
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                value = await self.js(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.2)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (scrolled into view first)."""
        box = await self.wait_for(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left",
                            clickCount=1)

    async def type_into(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> None:
        import base64

        data = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    # Never a skip: `make test` installs Debian's chromium (make system-deps), so its absence is a setup bug.
    assert CHROMIUM is not None, "chromium is missing: run `make system-deps` (apt-get install chromium)"
    profile = tempfile.mkdtemp(prefix="clientsync-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "--window-size=1280,1400", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                browser = Browser(ws)
                await browser.send("Page.enable")
                await browser.send("Runtime.enable")
                yield browser
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(redis_server_url: str) -> Iterator[Stack]:
    with running_stack(redis_server_url, providers=[PROVIDER], workers=1, concurrency=4) as s:
        yield s


async def test_an_operator_signs_in_sees_a_dead_job_replays_it_and_sees_it_succeed(stack: Stack) -> None:
    token = stack.env["CLIENTSYNC_MONITOR_TOKEN"]
    sandbox = f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"
    client_id, event_id = uid("client-"), uid("evt-")
    job_id = keys.job_id(PROVIDER, event_id)
    row = f'#dead tr[data-job-id="{job_id}"]'

    async with aiohttp.ClientSession() as http:
        # The provider rejects the change (a permanent 422): the job goes dead at once.
        await set_faults(http, sandbox, fail_until=time.time() + 3600, error_status=422)
        assert await post_webhook(http, stack.receiver_url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"],
                                  change(event_id, client_id, email="jane.doe@example.com")) == 202
        assert (await wait_jobs(stack.redis_url, [job_id], timeout=30))[job_id]["state"] == "dead"

        async with chromium() as page:
            await page.goto(f"{stack.receiver_url}/dashboard")
            await page.wait_for("!!document.querySelector('#token')")
            await page.type_into("#token", token)
            await page.click("#login")
            await page.wait_for("document.body.dataset.loaded === '1'")
            assert await page.js("location.pathname + location.search") == "/dashboard"
            assert await page.js("document.cookie") == ""  # the session cookie is HttpOnly
            await page.wait_for(f"!!document.querySelector({json.dumps(row)})")
            dead_row = await page.js(f"document.querySelector({json.dumps(row)}).innerText")
            assert "HTTP" not in dead_row and "validation" in dead_row and client_id in dead_row

            # The job's timeline, with the change's email masked.
            await page.click(f'{row} a[data-job-link]')
            await page.wait_for("document.querySelector('#detail-change').textContent.includes('client')")
            assert "j***@e***.com" in await page.js("document.querySelector('#detail-change').textContent")
            assert await page.js("document.querySelector('#timeline li').dataset.outcome") == "dead"
            html = await page.js("document.documentElement.outerHTML")
            assert "jane.doe@example.com" not in html and token not in html
            await page.screenshot(ARTIFACTS / "dashboard-dead.png")

            # The provider is fixed; the operator clicks Replay.
            await set_faults(http, sandbox, fail_until=0, error_status=503)
            await page.click(f'{row} button.replay')
            await page.wait_for("document.querySelector('#banner').textContent.includes('Replayed')")
            await page.wait_for(
                f"!!document.querySelector('#recent tr[data-job-id=\"{job_id}\"][data-state=\"succeeded\"]')",
                timeout=40)
            await page.wait_for(f"!document.querySelector({json.dumps(row)})")
            await page.wait_for("document.querySelector('#detail').dataset.state === 'succeeded'")
            outcomes = await page.js("[...document.querySelectorAll('#timeline > li')].map(li => li.dataset.outcome)")
            assert outcomes == ["dead", "replayed", "succeeded"]
            html = await page.js("document.documentElement.outerHTML")
            assert "jane.doe@example.com" not in html and token not in html
            await page.screenshot(ARTIFACTS / "dashboard-replayed.png")

        mine = [c for c in await sandbox_clients(http, sandbox) if client_id in str(c)]
        assert len(mine) == 1
