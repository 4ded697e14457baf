"""Onboarding with two candidates, end to end: real Redis, receiver, Celery worker and sandbox
processes. The job stops as needs_attention with its candidates, an operator adopts one through
the monitor API, and the job applies to that record (issue 7)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import running_stack, uid
from tests.helpers import change, post_webhook, wait_jobs
from worker import keys
from worker.models import Client
from worker.providers import adapter_class

P = "invoice_ninja"


async def test_two_candidates_wait_for_an_operator_who_adopts_one_through_the_api(
    redis_server_url: str, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_stack(redis_server_url, providers=[P], workers=1, concurrency=4) as stack:
        for key, value in stack.env.items():
            if key.startswith(f"CLIENTSYNC_{P.upper()}_"):
                monkeypatch.setenv(key, value)
        client_id, event_id = uid("client-"), uid("evt-")
        payload = change(event_id, client_id, name="Twin Trading", email="ap@twin.example")
        # Two records made by hand before clientsync was turned on, both possibly this client.
        cls = adapter_class(P)
        async with aiohttp.ClientSession() as session:
            by_hand = cls(cls.settings_class(id_field="none"), session)
            made = [await by_hand.create(Client.model_validate(payload["client"])) for _ in range(2)]
        r = aioredis.from_url(stack.redis_url, decode_responses=True)
        await r.set(keys.provider_epoch(P), f"{time.time() + 5:.3f}")  # clientsync starts after them

        assert await post_webhook(http, stack.receiver_url, stack.env["CLIENTSYNC_WEBHOOK_SECRET"], payload) == 202
        job_id = keys.job_id(P, event_id)
        await wait_jobs(stack.redis_url, [job_id], states={"needs_attention"})
        headers = {"Authorization": f"Bearer {stack.env['CLIENTSYNC_MONITOR_TOKEN']}"}
        async with http.get(f"{stack.receiver_url}/monitor/jobs/{job_id}", headers=headers) as resp:
            job = await resp.json()
        assert job["state"] == "needs_attention"
        assert sorted(c["provider_id"] for c in job["candidates"]) == sorted(m.id for m in made)
        assert all("ap@twin.example" not in str(c) for c in job["candidates"])  # masked

        chosen = made[1].id
        url = f"{stack.receiver_url}/monitor/jobs/{job_id}/resolve"
        async with http.post(url, json={"action": "adopt", "provider_id": "not-a-candidate"},
                             headers=headers) as resp:
            assert resp.status == 400
        async with http.post(url, json={"action": "adopt", "provider_id": chosen}, headers=headers) as resp:
            assert resp.status == 202, await resp.text()
        done = await wait_jobs(stack.redis_url, [job_id], states={"succeeded"})
        assert (done[job_id]["result"], done[job_id]["provider_id"]) == ("adopted", chosen)
        # The same answer again is idempotent; another answer is refused.
        async with http.post(url, json={"action": "adopt", "provider_id": chosen}, headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["already"] is True
        async with http.post(url, json={"action": "create"}, headers=headers) as resp:
            assert resp.status == 409
        assert await r.get(keys.record_owner(P, chosen)) == client_id
        async with http.get(f"{stack.receiver_url}/monitor/jobs/{job_id}", headers=headers) as resp:
            history = (await resp.json())["history"]
        assert any("adopt " + chosen in (h.get("note") or "") for h in history)
        sandbox = f"http://127.0.0.1:{stack.sandbox_port}/{P}/_sandbox/clients"
        async with http.get(sandbox) as resp:
            live = [c for c in (await resp.json())["clients"] if not c.get("is_deleted")]
        assert len(live) == 2  # nothing created
        await r.aclose()
        await asyncio.sleep(0)
