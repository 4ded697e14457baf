"""The dashboard in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

People's paths through every view and action: sign in, the overview (dead jobs grouped by cause),
the job view (masked change, timeline, Replay, Discard), filters in the URL and Back, search,
a shared link that survives signing in, a needs_attention job resolved by Adopt or Create new,
the client page, the providers view (pause, resume, probe, audit) and the bulk replay's
confirmation. The whole system runs as real processes (Redis, sandbox, receiver, Celery worker);
each page is screenshotted into var/test-artifacts/.
"""

from __future__ import annotations

import asyncio
import base64
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
import redis.asyncio as aioredis

from tests.conftest import REPO, running_stack, uid
from tests.helpers import change, post_webhook, sandbox_clients, set_faults, wait_jobs
from tests.monitor_fixtures import make_change
from worker import keys
from worker.launcher import Stack
from worker.ledger import Attempt, Ledger

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

    async def back(self) -> None:
        """The browser's Back button (the previous entry of the tab's history)."""
        history = await self.send("Page.getNavigationHistory")
        entry = history["entries"][history["currentIndex"] - 1]
        await self.send("Page.navigateToHistoryEntry", entryId=entry["id"])

    async def hash(self) -> str:
        return str(await self.js("decodeURIComponent(location.hash)"))

    async def text(self, selector: str) -> str:
        return str(await self.wait_for(f"document.querySelector({json.dumps(selector)})?.innerText"))

    async def screenshot(self, path: Path) -> None:
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


async def sign_in(page: Browser, stack: Stack, fragment: str = "") -> None:
    """Open the dashboard (a shared link when `fragment` is given), type the token, click Sign in."""
    await page.goto(f"{stack.receiver_url}/dashboard{fragment}")
    await page.wait_for("!!document.querySelector('#token')")
    await page.type_into("#token", stack.env["CLIENTSYNC_MONITOR_TOKEN"])
    await page.click("#login")
    await page.wait_for("document.body.dataset.loaded === '1'")
    assert await page.js("location.pathname + location.search") == "/dashboard"
    assert await page.js("document.cookie") == ""  # the session cookie is HttpOnly


async def no_secrets(page: Browser, stack: Stack, *emails: str) -> None:
    html = await page.js("document.documentElement.outerHTML")
    assert stack.env["CLIENTSYNC_MONITOR_TOKEN"] not in html
    for email in emails:
        assert email not in html


async def dead_jobs(http: aiohttp.ClientSession, stack: Stack, client_id: str, n: int,
                    email: str = "jane.doe@example.com") -> list[str]:
    """`n` changes of `client_id` that the provider rejects (a permanent 422): dead at once."""
    sandbox = f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"
    await set_faults(http, sandbox, fail_until=time.time() + 3600, error_status=422)
    try:
        ids = []
        for _ in range(n):
            event_id = uid("evt-")
            assert await post_webhook(http, stack.receiver_url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"],
                                      change(event_id, client_id, email=email)) == 202
            ids.append(keys.job_id(PROVIDER, event_id))
        records = await wait_jobs(stack.redis_url, ids, timeout=60)
        assert {r["state"] for r in records.values()} == {"dead"}
        return ids
    finally:
        await set_faults(http, sandbox, fail_until=0, error_status=503)


async def test_an_operator_signs_in_sees_a_dead_job_by_cause_replays_it_and_sees_it_succeed(stack: Stack) -> None:
    sandbox = f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"
    client_id = uid("client-")
    async with aiohttp.ClientSession() as http:
        [job_id] = await dead_jobs(http, stack, client_id, 1)
        async with chromium() as page:
            await sign_in(page, stack)
            assert await page.js("document.body.dataset.view") == "overview"
            # dead jobs grouped by cause, the count exact (what the ledger's dead index holds)
            group = f'#dead-groups tr[data-error-class="validation"][data-provider="{PROVIDER}"]'
            await page.wait_for(f"!!document.querySelector({json.dumps(group)})")
            r = aioredis.from_url(stack.redis_url)
            dead_now = await r.zcard(keys.jobs_of_provider_in_state(PROVIDER, "dead"))
            await r.aclose()
            assert int(await page.js(f"document.querySelector({json.dumps(group)}).dataset.count")) == dead_now
            await page.screenshot(ARTIFACTS / "dashboard-overview.png")

            # the group's link is a filtered list whose filters are in the URL
            await page.click(f"{group} a")
            await page.wait_for("document.body.dataset.view === 'dead'")
            assert await page.hash() == f"#/jobs?state=dead&provider={PROVIDER}&error_class=validation"
            row = f'#jobs tr[data-job-id="{job_id}"]'
            dead_row = await page.text(row)
            assert "HTTP" not in dead_row and "validation" in dead_row and client_id in dead_row

            # the job's own page: timeline, change with the email masked
            await page.click(f"{row} a[data-job-link]")
            await page.wait_for("document.body.dataset.view === 'job'")
            assert await page.hash() == f"#/jobs/{job_id}"
            await page.wait_for("document.querySelector('#detail-change')?.textContent.includes('client')")
            assert "j***@e***.com" in await page.js("document.querySelector('#detail-change').textContent")
            assert await page.js("document.querySelector('#timeline li').dataset.outcome") == "dead"
            await no_secrets(page, stack, "jane.doe@example.com")
            await page.screenshot(ARTIFACTS / "dashboard-job-dead.png")

            # the provider is fixed; the operator clicks Replay in the job view
            await set_faults(http, sandbox, fail_until=0, error_status=503)
            await page.click("#job-replay")
            await page.wait_for("document.querySelector('#banner').textContent.includes('Replayed')")
            await page.wait_for("document.querySelector('#detail').dataset.state === 'succeeded'", timeout=60)
            outcomes = await page.js("[...document.querySelectorAll('#timeline > li')].map(li => li.dataset.outcome)")
            assert outcomes == ["dead", "replayed", "succeeded"]
            await no_secrets(page, stack, "jane.doe@example.com")
            await page.screenshot(ARTIFACTS / "dashboard-job-replayed.png")

            # Back returns to the filtered list, where the job is no longer dead
            await page.back()
            await page.wait_for("document.body.dataset.view === 'dead'")
            await page.wait_for(f"!document.querySelector({json.dumps(row)}) && "
                                "!!document.querySelector('#jobs tbody tr')")
        mine = [c for c in await sandbox_clients(http, sandbox) if client_id in str(c)]
        assert len(mine) == 1


async def test_filters_live_in_the_url_back_restores_them_search_finds_and_discard_works_in_the_job_view(
        stack: Stack) -> None:
    client_id = uid("client-")
    async with aiohttp.ClientSession() as http:
        job_ids = await dead_jobs(http, stack, client_id, 2)
        async with chromium() as page:
            # a shared link opened signed out: the login keeps the view
            await sign_in(page, stack, f"#/jobs/{job_ids[0]}")
            await page.wait_for("document.body.dataset.view === 'job'")
            assert await page.hash() == f"#/jobs/{job_ids[0]}"

            # filters typed into the form become the URL; each is a history entry
            await page.goto(f"{stack.receiver_url}/dashboard#/jobs")
            await page.wait_for("document.body.dataset.view === 'jobs' && document.body.dataset.loaded === '1'")
            await page.wait_for(f"!!document.querySelector('#f-provider option[value=\"{PROVIDER}\"]')")
            await page.js(f"document.querySelector('#f-provider').value = {json.dumps(PROVIDER)}")
            await page.type_into("#f-client_id", client_id)
            await page.click("#apply-filters")
            await page.wait_for(f"location.hash.includes('client_id={client_id}')")
            assert await page.hash() == f"#/jobs?provider={PROVIDER}&client_id={client_id}"
            await page.wait_for("document.querySelectorAll('#jobs tbody tr[data-job-id]').length === 2")
            await page.js("document.querySelector('#f-state').value = 'dead'")
            await page.click("#apply-filters")
            await page.wait_for("document.body.dataset.view === 'dead'")
            assert await page.hash() == f"#/jobs?provider={PROVIDER}&state=dead&client_id={client_id}"
            await page.screenshot(ARTIFACTS / "dashboard-jobs-filtered.png")
            await page.back()
            await page.wait_for("document.body.dataset.view === 'jobs'")
            assert await page.hash() == f"#/jobs?provider={PROVIDER}&client_id={client_id}"
            assert await page.js("document.querySelector('#f-state').value") == ""
            assert await page.js("document.querySelector('#f-client_id').value") == client_id

            # a bad filter is named, not a broken page
            await page.goto(f"{stack.receiver_url}/dashboard#/jobs?since=yesterday")
            await page.wait_for("document.querySelector('#banner').textContent.includes('since')")

            # search: an event id opens its job, a client id opens the client page
            event_id = job_ids[1].split(":", 1)[1]
            await page.type_into("#search-input", event_id)
            await page.click("#search button")
            await page.wait_for("document.body.dataset.view === 'job'")
            assert await page.hash() == f"#/jobs/{job_ids[1]}"

            # Discard in the job view: the job leaves the dead list and stays replayable
            await page.wait_for("document.querySelector('#detail')?.dataset.state === 'dead'")
            await page.click("#job-discard")
            await page.wait_for("document.querySelector('#detail').dataset.state === 'discarded'")
            assert "Discarded" in await page.js("document.querySelector('#banner').textContent")
            await page.wait_for("!!document.querySelector('#job-replay') && !document.querySelector('#job-discard')")
            await page.screenshot(ARTIFACTS / "dashboard-job-discarded.png")

            await page.js("document.querySelector('#search-input').value = ''")
            await page.type_into("#search-input", client_id)
            await page.click("#search button")
            await page.wait_for("document.body.dataset.view === 'client'")
            assert await page.hash() == f"#/clients/{client_id}"
            await page.wait_for("document.querySelectorAll('#client-timeline tr[data-job-id]').length === 2")
            states = await page.js("[...document.querySelectorAll('#client-timeline tr[data-job-id]')]"
                                   ".map(tr => tr.dataset.state).sort()")
            assert states == ["dead", "discarded"]

            # Back through the history: job view, then the filtered list
            await page.back()
            await page.wait_for("document.body.dataset.view === 'job'")
            assert await page.hash() == f"#/jobs/{job_ids[1]}"

            # a dead letter (a queue entry that never became a job) is readable in the job view
            letter = f"intake:{uid('t-')}"
            r = aioredis.from_url(stack.redis_url, decode_responses=True)
            try:
                await Ledger(r).dead_letter(
                    letter, raw='{"client": {"email": "leak.me@corp.example"', reason="bad_json", stage="gate",
                    attempt=Attempt(1, time.time(), "dead", "invalid_message", None, "body is not JSON"))
            finally:
                await r.aclose()
            await page.goto(f"{stack.receiver_url}/dashboard#/jobs/{letter}")
            await page.wait_for("document.querySelector('#detail')?.dataset.state === 'dead'")
            assert await page.text('#dead-letter dd[data-field="reason"]') == "bad_json"
            assert await page.text('#dead-letter dd[data-field="stage"]') == "gate"
            raw = await page.text("#detail-raw")
            assert '"client"' in raw and "l***@c" in raw and "leak.me" not in raw
            assert not await page.js("!!document.querySelector('#job-replay')")
            await page.wait_for("!!document.querySelector('#job-discard')")
            await no_secrets(page, stack, "leak.me@corp.example")
            await page.screenshot(ARTIFACTS / "dashboard-dead-letter.png")


async def test_a_needs_attention_job_is_resolved_by_adopt_or_create_and_the_client_page_shows_the_result(
        stack: Stack) -> None:
    sandbox = f"http://127.0.0.1:{stack.sandbox_port}/{PROVIDER}"
    adopter, creator = uid("client-"), uid("client-")
    auth = {"Authorization": "Basic " + base64.b64encode(b"lsp-sandbox-key:").decode()}
    r = aioredis.from_url(stack.redis_url, decode_responses=True)
    ledger = Ledger(r)
    try:
        async with aiohttp.ClientSession() as http:
            # a record someone made by hand at the provider: the one the operator will adopt
            async with http.post(f"{sandbox}/v2/clients", json={"name": f"Client {adopter}"}, headers=auth) as resp:
                assert resp.status == 201, await resp.text()
                by_hand = (await resp.json())["id"]
            jobs = {}
            for client_id, candidates in (
                    (adopter, [{"provider_id": by_hand, "name": f"Client {adopter}", "email": "boss@acme.example",
                                "created_at": "2024-03-01T09:00:00Z"},
                               {"provider_id": "lsp-elsewhere", "name": f"Client {adopter}",
                                "email": "sales@acme.example", "created_at": "2024-04-01T09:00:00Z"}]),
                    (creator, [{"provider_id": "lsp-namesake", "name": f"Client {creator}",
                                "email": "other@acme.example", "created_at": "2024-04-02T09:00:00Z"}])):
                job_id = await ledger.enqueued(make_change(uid("evt-"), client_id, email="jane.doe@example.com",
                                                           tags=["vip"]), PROVIDER)
                await ledger.running(job_id)
                await ledger.needs_attention(job_id, Attempt(1, time.time(), "needs_attention", "ambiguous", None,
                                                             "several records could be this client"),
                                             candidates=candidates)
                jobs[client_id] = job_id

            async with chromium() as page:
                await sign_in(page, stack)
                row = f'#attention tr[data-job-id="{jobs[adopter]}"]'
                await page.wait_for(f"!!document.querySelector({json.dumps(row)})")
                await page.click(f"{row} a[data-job-link]")
                await page.wait_for("document.querySelector('#detail')?.dataset.state === 'needs_attention'")
                cands = await page.js("[...document.querySelectorAll('#candidates tr[data-candidate]')]"
                                      ".map(tr => tr.dataset.candidate)")
                assert cands == [by_hand, "lsp-elsewhere"]
                text = await page.text("#candidates")
                assert "b***@a***.example" in text and "2024-03-01 09:00:00 UTC" in text
                await no_secrets(page, stack, "boss@acme.example", "jane.doe@example.com")
                await page.screenshot(ARTIFACTS / "dashboard-needs-attention.png")
                await page.click(f'#candidates button.adopt[data-provider-id="{by_hand}"]')
                await page.wait_for("document.querySelector('#banner').textContent.includes('Resolved')")
                await page.wait_for("document.querySelector('#detail').dataset.state === 'succeeded'", timeout=60)
                resolution = await page.text('#detail-fields dd[data-field="resolution"]')
                assert by_hand in resolution and "adopt" in resolution
                assert by_hand in await page.text('#detail-fields dd[data-field="provider id"]')
                # LSP.expert holds no tags: the job says so instead of dropping them silently
                assert await page.text('#detail-fields dd[data-field="not taken by provider"]') == "tags"
                await page.wait_for("!document.querySelector('#candidates')")
                await page.screenshot(ARTIFACTS / "dashboard-resolved-adopt.png")

                # the client page: linked to the adopted record, its timeline
                await page.click("#detail-fields a[data-client-link]")
                await page.wait_for("document.body.dataset.view === 'client'")
                assert await page.hash() == f"#/clients/{adopter}"
                at = f'#client-providers tr[data-provider="{PROVIDER}"]'
                await page.wait_for(f"document.querySelector({json.dumps(at)})?.dataset.link === {json.dumps(by_hand)}")
                cells = await page.text(at)
                assert "linked to" in cells and "change of 2024-05-01 12:00:00 UTC" in cells and "applied" in cells
                assert await page.js("[...document.querySelectorAll('#client-timeline tr[data-job-id]')]"
                                     ".map(tr => tr.dataset.jobId)") == [jobs[adopter]]
                await no_secrets(page, stack, "jane.doe@example.com")
                await page.screenshot(ARTIFACTS / "dashboard-client.png")

                # the other job: the operator creates a new record instead of its namesake
                await page.goto(f"{stack.receiver_url}/dashboard#/jobs/{jobs[creator]}")
                await page.wait_for("document.querySelector('#detail')?.dataset.state === 'needs_attention'")
                await page.click("#resolve-create")
                await page.wait_for("document.querySelector('#detail').dataset.state === 'succeeded'", timeout=60)
                assert "create a new record" in await page.text('#detail-fields dd[data-field="resolution"]')
                created = await page.text('#detail-fields dd[data-field="provider id"]')
                assert created not in ("lsp-namesake", by_hand)
            mine = [c for c in await sandbox_clients(http, sandbox) if creator in str(c)]
            assert [c["id"] for c in mine] == [created]
    finally:
        await r.aclose()


async def test_providers_view_pauses_resumes_and_probes_with_an_audit_and_bulk_replay_asks_with_the_exact_count(
        stack: Stack) -> None:
    client_id = uid("client-")
    async with aiohttp.ClientSession() as http:
        job_ids = await dead_jobs(http, stack, client_id, 3)
        async with chromium() as page:
            await sign_in(page, stack, "#/providers")
            card = f'#provider-controls .card[data-provider="{PROVIDER}"]'
            await page.wait_for(f"document.querySelector({json.dumps(card)})?.dataset.circuit === 'closed'")
            # pause asks first; cancelling changes nothing
            await page.click(f"{card} button[data-action=pause]")
            await page.wait_for("!document.querySelector('#confirm').hidden")
            assert PROVIDER in await page.text("#confirm-text")
            await page.click("#confirm-no")
            await page.wait_for(f"document.querySelector({json.dumps(card)}).dataset.circuit === 'closed'")
            await page.click(f"{card} button[data-action=pause]")
            await page.click("#confirm-yes")
            await page.wait_for(f"document.querySelector({json.dumps(card)}).dataset.circuit === 'paused'")
            audit = f'#audit tr[data-provider="{PROVIDER}"][data-action="pause"]'
            await page.wait_for(f"document.querySelector({json.dumps(audit)})?.innerText.includes('dashboard')")
            await page.screenshot(ARTIFACTS / "dashboard-providers-paused.png")
            await page.click(f"{card} button[data-action=resume]")
            await page.wait_for(f"document.querySelector({json.dumps(card)}).dataset.circuit === 'closed'")
            await page.click(f"{card} button[data-action=probe]")
            await page.wait_for("document.querySelector('#banner').textContent.startsWith('Probe now')")
            # the audit list refreshes after the banner: wait for the probe's row to show
            probe_row = f'#audit tr[data-provider="{PROVIDER}"][data-action="probe"]'
            await page.wait_for(f"document.querySelector({json.dumps(probe_row)}) !== null")
            actions = await page.js(f"[...document.querySelectorAll('#audit tr[data-provider=\"{PROVIDER}\"]')]"
                                    ".map(tr => tr.dataset.action)")
            assert actions[:3] == ["probe", "resume", "pause"]
            await page.screenshot(ARTIFACTS / "dashboard-providers.png")

            # bulk replay of this client's dead jobs: the exact count, asked before anything happens
            await page.goto(f"{stack.receiver_url}/dashboard#/jobs?state=dead&client_id={client_id}")
            await page.wait_for("document.querySelectorAll('#jobs tbody tr[data-job-id]').length === 3")
            # the causes, counted for this client only
            await page.wait_for(f"document.querySelector('#dead-groups tr[data-provider=\"{PROVIDER}\"]')"
                                "?.dataset.count === '3'")
            await page.click("#replay-all")
            await page.wait_for("!document.querySelector('#confirm').hidden")
            assert (await page.text("#confirm-text")).startswith(f"Replay 3 dead jobs (client id {client_id})?")
            assert await page.text("#confirm-yes") == "Replay 3"
            await page.screenshot(ARTIFACTS / "dashboard-bulk-confirm.png")
            await page.click("#confirm-no")
            await page.wait_for("document.querySelector('#banner').textContent.includes('cancelled')")
            r = aioredis.from_url(stack.redis_url, decode_responses=True)
            try:
                assert {await r.hget(keys.job(j), "state") for j in job_ids} == {"dead"}
            finally:
                await r.aclose()
            await page.click("#replay-all")
            await page.wait_for("!document.querySelector('#confirm').hidden")
            await page.click("#confirm-yes")
            await page.wait_for("document.querySelector('#banner').textContent.includes('Replayed 3 dead jobs')")
        records = await wait_jobs(stack.redis_url, job_ids, timeout=60)
        # one client's three changes: the newest is applied, older ones replayed after it are stale
        states = [r["state"] for r in records.values()]
        assert set(states) <= {"succeeded", "skipped"} and "succeeded" in states
