"""`clientsync jobs | job | replay | discard | summary` against a real Redis, in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from tests.monitor_fixtures import make_job
from worker.cli import main
from worker.ledger import Ledger

Seed = Callable[[Callable[[Ledger], Awaitable[Any]]], Any]


@pytest.fixture
def seed(fresh_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Seed:
    for key in ("CLIENTSYNC_QUEUE", "CLIENTSYNC_MONITOR_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CLIENTSYNC_REDIS_URL", fresh_redis_url)
    # A wide terminal, whatever runs the tests (an xdist worker has none: 80 columns): the
    # assertions read whole cells. Narrow terminals wrap (tests/test_cli_operator.py).
    monkeypatch.setenv("COLUMNS", "200")

    def run(work: Callable[[Ledger], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            client = aioredis.from_url(fresh_redis_url)
            try:
                return await work(Ledger(client))
            finally:
                await client.aclose()

        return asyncio.run(go())

    return run


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def _three(ledger: Ledger) -> None:
    await make_job(ledger, "qonto", "e1", "dead", client_id="acme", email="jane.doe@example.com",
                   message="email jane.doe@example.com is already used")
    await make_job(ledger, "lsp_expert", "e2", "retrying", client_id="acme")
    await make_job(ledger, "qonto", "e3", "succeeded", client_id="globex")


def test_jobs_prints_an_aligned_table_with_filters_and_masked_emails(seed: Seed,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    seed(_three)
    code, out, _ = cli(capsys, "jobs")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("JOB") and set(lines[1]) <= {"-", " "}
    # every column starts at the same offset on every row
    state_col = lines[0].index("STATE")
    assert all(line[state_col - 2:state_col] == "  " for line in lines[2:5])
    assert "jane.doe@example.com" not in out and "j***@e***.com" in out
    assert "3 job(s)" in out
    _, out, _ = cli(capsys, "jobs", "--state", "dead", "--provider", "qonto")
    assert "qonto:e1" in out and "qonto:e3" not in out and "1 job(s)" in out
    _, out, _ = cli(capsys, "jobs", "--client", "acme", "--json")
    assert {j["id"] for j in json.loads(out)["jobs"]} == {"qonto:e1", "lsp_expert:e2"}
    _, out, _ = cli(capsys, "jobs", "--event", "e3")
    assert "qonto:e3" in out and "1 job(s)" in out
    with pytest.raises(SystemExit) as refused:  # argparse's choices: the error lists the valid states
        cli(capsys, "jobs", "--state", "lost")
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--state" in err and "needs_attention" in err
    code, _, err = cli(capsys, "jobs", "--since", "last week")
    assert code == 2 and "--since" in err


def test_job_shows_fields_and_history(seed: Seed, capsys: pytest.CaptureFixture[str]) -> None:
    seed(_three)
    code, out, _ = cli(capsys, "job", "qonto:e1")
    assert code == 0
    assert "state" in out and "dead" in out and "history:" in out and "422" in out
    assert "jane.doe@example.com" not in out
    code, _, err = cli(capsys, "job", "qonto:missing")
    assert code == 2 and "no job 'qonto:missing'" in err


def test_replay_one_or_all_dead_and_discard(seed: Seed, fresh_redis_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    async def many(ledger: Ledger) -> None:
        await _three(ledger)
        for i in range(5):
            await make_job(ledger, "grow_crm", f"g{i}", "dead", error_class="server_error")

    seed(many)
    r = redis.Redis.from_url(fresh_redis_url)
    code, out, _ = cli(capsys, "replay", "qonto:e1")
    assert code == 0 and "qonto:e1: queued" in out
    assert r.llen("celery") == 1
    code, _, err = cli(capsys, "replay", "qonto:e3")
    assert code == 2 and "succeeded" in err
    code, _, err = cli(capsys, "replay")
    assert code == 2 and "--all-dead" in err
    code, out, _ = cli(capsys, "replay", "--all-dead", "--provider", "grow_crm", "--dry-run")
    assert code == 0 and "5 dead job(s) match" in out and r.llen("celery") == 1
    code, out, _ = cli(capsys, "discard", "grow_crm:g0")
    assert code == 0 and "discarded" in out
    code, out, _ = cli(capsys, "replay", "--all-dead", "--error-class", "server_error", "--limit", "3")
    assert code == 0 and "replayed 3 of 3" in out and "more match" in out
    code, out, _ = cli(capsys, "replay", "--all-dead")
    assert "replayed 1 of 1" in out
    assert r.llen("celery") == 5


def test_summary_table(seed: Seed, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: one line per provider (narrower ones wrap)
    seed(_three)
    code, out, _ = cli(capsys, "summary")
    assert code == 0
    assert "workers alive: 0" in out
    header = next(line for line in out.splitlines() if line.startswith("PROVIDER"))
    assert "CIRCUIT" in header and "RETRYING" in header and "DEAD" in header
    row = next(line for line in out.splitlines() if line.startswith("lsp_expert"))
    assert "closed" in row and "lsp_expert:e2" in row


def test_without_redis_url_the_cli_says_so(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CLIENTSYNC_REDIS_URL", raising=False)
    code, _, err = cli(capsys, "summary")
    assert code == 2 and "CLIENTSYNC_REDIS_URL" in err


def test_every_refusal_is_the_commands_error_naming_what_the_command_line_gave(
    seed: Seed, capsys: pytest.CaptureFixture[str]
) -> None:
    """`_run` words every refusal of the monitor once: an invalid parameter as its flag, a
    missing job or a refused action as the monitor words them; each exits 2 on stderr."""
    seed(_three)
    expected = {
        ("jobs", "--limit", "0"): "--limit: must be an integer between 1 and 500",
        ("jobs", "--cursor", "not-a-cursor"): "--cursor: must be a next_cursor value returned by this API",
        ("replay", "--all-dead", "--limit", "0"): "--limit: must be an integer between 1 and 10000",
        ("replay", "qonto:e3"): "job is succeeded; only dead or discarded jobs",
        ("discard", "qonto:missing"): "no job 'qonto:missing' in the ledger",
        ("resolve", "qonto:e1", "--adopt", "rec-9"): "only a needs_attention job can be resolved",
    }
    for argv, message in expected.items():
        code, out, err = cli(capsys, *argv)
        assert code == 2 and out == "" and err.startswith(f"clientsync: {message}"), (argv, err)
