"""`clientsync link`: onboard an account of 1,000 records by exact keys only (issue 7).

A Request Finance sandbox with the source id stamped into `department`
(`CLIENTSYNC_REQUEST_FINANCE_ID_FIELD`): Request Finance keeps nothing unique, so two records
can carry one client's stamp — ambiguous, never linked on a guess.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import clean_env
from worker import keys
from worker.link import run_link
from worker.models import Client, ClientChange
from worker.providers import adapter_class
from worker.sandbox.server import RunningSandbox, start_sandbox
from worker.store import SyncStore
from worker.sync import apply_change

P = "request_finance"
MATCHED, AMBIGUOUS, UNMATCHED = 950, 25, 25  # 950 + 2 x 25 = 1,000 records


def client(i: int) -> Client:
    return Client(id=f"c{i}", name=f"Client {i}", first_name="Ada", last_name=f"L{i}",
                  email=f"c{i}@example.com")


@pytest.fixture
async def account(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningSandbox]:
    sandbox = await start_sandbox(names=[P])
    env = {**sandbox.env(), "CLIENTSYNC_REQUEST_FINANCE_ID_FIELD": "department"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cls = adapter_class(P)
    async with aiohttp.ClientSession() as session:
        adapter = cls(cls.settings_class(), session)
        for i in range(MATCHED + AMBIGUOUS):
            await adapter.create(client(i))
        for i in range(MATCHED, MATCHED + AMBIGUOUS):
            await adapter.create(client(i))  # a second record stamped with the same source id
    yield sandbox
    await sandbox.stop()


def source_file(tmp_path: Path) -> Path:
    path = tmp_path / "clients.jsonl"
    total = MATCHED + AMBIGUOUS + UNMATCHED
    path.write_text("\n".join(client(i).model_dump_json() for i in range(total)) + "\n")
    return path


async def test_link_dry_run_counts_exactly_and_writes_nothing_then_links_and_a_sync_creates_nothing(
    account: RunningSandbox, fresh_redis_url: str, tmp_path: Path
) -> None:
    sim = account.simulators[P]
    assert len(sim.clients) == 1000
    source = source_file(tmp_path)
    env = clean_env(CLIENTSYNC_REDIS_URL=fresh_redis_url, CLIENTSYNC_REQUEST_FINANCE_ID_FIELD="department",
                    **account.env())
    report = tmp_path / "dry.json"
    calls_before = len(sim.calls)
    # The sandbox answers on this test's loop: the CLI runs as an async subprocess.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "link", "--provider", P, "--source", str(source), "--dry-run",
        "--report", str(report), env=env, cwd=os.getcwd(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    raw_out, raw_err = await asyncio.wait_for(proc.communicate(), timeout=120)
    stdout, stderr = raw_out.decode(), raw_err.decode()
    assert proc.returncode == 0, stderr
    assert (f"1000 record(s) read; {MATCHED} matched, {AMBIGUOUS} ambiguous, {UNMATCHED} unmatched"
            in stdout), stdout
    assert "dry run: no link written" in stdout
    assert "reading records [" in stderr  # the progress bar
    body = json.loads(report.read_text())
    assert body["counts"]["matched"] == MATCHED and body["written"] == 0
    ambiguous = {r["client_id"]: r["provider_ids"] for r in body["clients"] if r["status"] == "ambiguous"}
    assert len(ambiguous) == AMBIGUOUS and all(len(ids) == 2 for ids in ambiguous.values())
    assert {c.method for c in sim.calls[calls_before:]} == {"GET"}, "a dry run writes nothing at the provider"
    redis = aioredis.from_url(fresh_redis_url)
    try:
        assert await redis.keys(keys.client_state(P, "*")) == []
        assert await redis.keys(keys.record_owner(P, "*")) == []

        result = await run_link(P, fresh_redis_url, source=source, dry_run=False,
                                report_path=tmp_path / "real.csv", progress=None)
        assert result.written == MATCHED
        assert (tmp_path / "real.csv").read_text().count("\n") == 1 + MATCHED + AMBIGUOUS + UNMATCHED
        store = SyncStore(redis, idempotency_ttl=3600, lease_seconds=10)
        assert await store.link(P, "c7") is not None
        assert await store.link(P, f"c{MATCHED}") is None  # ambiguous: not linked

        # A following sync of linked clients updates their records and creates nothing.
        cls = adapter_class(P)
        async with aiohttp.ClientSession() as session:
            adapter = cls(cls.settings_class(), session)
            for i in range(0, MATCHED, 50):
                change = ClientChange.model_validate({
                    "event_id": f"e-c{i}", "occurred_at": "2026-11-30T10:00:00Z", "action": "upsert",
                    "client": client(i).model_copy(update={"name": f"Client {i} renamed"}).model_dump(mode="json"),
                })
                outcome = await apply_change(change, adapter, store, owner=f"t{i}", lock_wait=1)
                assert (outcome.result, outcome.provider_id) == ("updated", await store.link(P, f"c{i}"))
        assert len(sim.clients) == 1000
        # Linking again changes nothing: every match is already linked.
        again = await run_link(P, fresh_redis_url, source=source, dry_run=False,
                               report_path=tmp_path / "again.csv", progress=None)
        assert again.written == 0 and again.counts()["already_linked"] == MATCHED
    finally:
        await redis.aclose()
