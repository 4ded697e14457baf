"""`clientsync link`: onboard a provider account that already holds the clients.

Reads every page of the provider's client list, matches records to source clients by the
provider's *exact* keys only (the stamp clientsync writes, keys the provider keeps unique;
see `worker.providers.base.Identity`), and writes links only for exact, unambiguous matches
to records no other client owns. Everything else is reported, never guessed:

- matched: exactly one record is this client's (linked unless `--dry-run`);
- ambiguous: several records are (an operator decides; nothing is linked);
- unmatched: none is (the first sync looks again and creates the client if still none);
- already linked / owned by another client: left as they are.

Source clients come from a JSON Lines file (one `Client` or `ClientChange` object per line)
or, without one, from the clients clientsync has seen (the newest change kept in the ledger).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import redis.asyncio as aioredis
from pydantic import ValidationError

from worker import keys
from worker.identity import field_value
from worker.models import Client, ClientChange, mask_email
from worker.providers import adapter_class, load_configs
from worker.providers.base import ProviderAdapter, RemoteClient
from worker.store import SyncStore

STATUSES = ("matched", "ambiguous", "unmatched", "already_linked", "owned_by_other")


@dataclass
class LinkReport:
    provider: str
    records: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for row in self.rows:
            out[row["status"]] += 1
        return out


class LinkError(Exception):
    """Bad input (file, provider): printed without a traceback."""


def read_source(path: Path) -> list[Client]:
    """Clients from a JSON Lines file: each line a `Client` or a `ClientChange` object."""
    clients: dict[str, Client] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LinkError(f"--source: cannot read {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            client = (ClientChange.model_validate(data).client if isinstance(data, dict) and "client" in data
                      else Client.model_validate(data))
        except (ValueError, ValidationError) as exc:
            raise LinkError(f"--source line {number}: not a Client or ClientChange object ({exc})") from exc
        clients[client.id] = client
    return list(clients.values())


async def seen_clients(redis: aioredis.Redis) -> list[Client]:
    """The newest change of every client the ledger holds (upserts only; deleted clients are left out)."""
    newest: dict[str, tuple[float, Client | None]] = {}
    cursor = 0
    while True:
        cursor, ids = await redis.zscan(keys.JOBS_BY_TIME, cursor, count=1000)
        pipe = redis.pipeline(transaction=False)
        for job_id, _ in ids:
            pipe.hmget(keys.job(job_id.decode() if isinstance(job_id, bytes) else str(job_id)), "change",
                       "updated_at")
        for raw, updated in await pipe.execute():
            if not raw:
                continue
            try:
                change = ClientChange.model_validate_json(raw)
            except ValidationError:
                continue
            at = float(updated or 0)
            current = newest.get(change.client.id)
            if current is None or at >= current[0]:
                newest[change.client.id] = (at, change.client if change.action == "upsert" else None)
        if cursor == 0:
            break
    return [c for _, c in newest.values() if c is not None]


def _progress(out: TextIO, seen: int, *, done: bool = False) -> None:
    bar = "#" * min(40, seen // 25) if not done else "#" * 40
    out.write(f"\rreading records [{bar:<40}] {seen}" + ("\n" if done else ""))
    out.flush()


async def read_records(adapter: ProviderAdapter, *, progress: TextIO | None) -> list[RemoteClient]:
    records: list[RemoteClient] = []
    async for remote in adapter.list():
        records.append(remote)
        if progress is not None and len(records) % 25 == 0:
            _progress(progress, len(records))
    if progress is not None:
        _progress(progress, len(records), done=True)
    return records


def index_records(adapter: ProviderAdapter, records: list[RemoteClient]) -> dict[tuple[str, str], list[RemoteClient]]:
    """(key, value) -> records, for the provider's exact keys (values compared case-insensitively)."""
    index: dict[tuple[str, str], list[RemoteClient]] = defaultdict(list)
    for remote in records:
        stamp = adapter.stamped(remote)
        if stamp:
            index[("stamp", stamp)].append(remote)
        if not adapter.identity.unique:
            continue
        try:
            view = adapter.from_wire(remote.data)
        except (ValueError, KeyError, TypeError):
            continue
        for key in adapter.identity.unique:
            value = field_value(view, key)
            if value:
                index[(key, value.casefold())].append(remote)
    return index


async def link_provider(adapter: ProviderAdapter, store: SyncStore, clients: list[Client], *, dry_run: bool,
                        progress: TextIO | None = None) -> LinkReport:
    report = LinkReport(adapter.name)
    if adapter.stamp_field is None and not adapter.identity.unique:
        raise LinkError(f"{adapter.name} has no exact key (no stamp field, no key the provider keeps unique): "
                        "records cannot be matched without guessing; the first sync of each client looks "
                        "them up and asks an operator when unsure")
    records = await read_records(adapter, progress=progress)
    report.records = len(records)
    index = index_records(adapter, records)
    owners = await store.owners(adapter.name, [r.id for r in records])
    links = await _links(store, adapter.name, [c.id for c in clients])
    for client in clients:
        found: dict[str, RemoteClient] = {}
        used: list[str] = []
        for remote in index.get(("stamp", client.id), []):
            found[remote.id] = remote
        if found:
            used.append("stamp")
        else:
            for key in adapter.identity.unique:
                value = field_value(client, key)
                for remote in index.get((key, value.casefold()), []) if value else []:
                    if adapter.stamped(remote) in (None, client.id):
                        found[remote.id] = remote
                        used.append(key)
        mine = [r for r in found.values() if owners.get(r.id) in (None, client.id)]
        row: dict[str, Any] = {"client_id": client.id, "email": mask_email(client.email),
                               "provider_ids": [r.id for r in mine], "key": ",".join(sorted(set(used)))}
        if links.get(client.id):
            row.update(status="already_linked", provider_ids=[links[client.id]])
        elif found and not mine:
            row.update(status="owned_by_other", provider_ids=sorted(found))
        else:
            row["status"] = {0: "unmatched", 1: "matched"}.get(len(mine), "ambiguous")
        report.rows.append(row)
    if not dry_run:
        for row in report.rows:
            if row["status"] != "matched":
                continue
            answer = await store.set_link(adapter.name, row["client_id"], row["provider_ids"][0])
            if answer == "ok":
                report.written += 1
            else:
                row["status"] = "owned_by_other" if not answer.startswith("linked:") else "already_linked"
    return report


async def _links(store: SyncStore, provider: str, client_ids: list[str]) -> dict[str, str]:
    pipe = store.redis.pipeline(transaction=False)
    for client_id in client_ids:
        pipe.hget(keys.client_state(provider, client_id), "link")
    values = await pipe.execute()
    return {c: (v.decode() if isinstance(v, bytes) else v) for c, v in zip(client_ids, values, strict=True) if v}


def write_report(report: LinkReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({"provider": report.provider, "records": report.records,
                                    "counts": report.counts(), "written": report.written,
                                    "clients": report.rows}, indent=2), encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["client_id", "status", "provider_ids", "key", "email"])
        for row in report.rows:
            writer.writerow([row["client_id"], row["status"], " ".join(row["provider_ids"]), row["key"],
                             row["email"] or ""])


async def run_link(provider: str, redis_url: str, *, source: Path | None, dry_run: bool, report_path: Path,
                   progress: TextIO | None) -> LinkReport:
    configs = load_configs()
    if provider not in configs:
        raise LinkError(f"--provider: unknown provider {provider!r}; one of {', '.join(sorted(configs))}")
    config = configs[provider]
    if not config.is_configured():
        raise LinkError(f"--provider {provider} is not configured: {config.missing()}")
    redis = aioredis.from_url(redis_url)
    try:
        store = SyncStore(redis, idempotency_ttl=1, lease_seconds=1)
        clients = read_source(source) if source is not None else await seen_clients(redis)
        async with aiohttp.ClientSession() as session:
            adapter = adapter_class(provider)(config, session)
            report = await link_provider(adapter, store, clients, dry_run=dry_run, progress=progress)
    finally:
        await redis.aclose()
    write_report(report, report_path)
    return report


def cmd_link(args: argparse.Namespace) -> int:
    from worker.cli import CliError, _require_redis, _settings

    url = _require_redis(_settings())
    report_path = Path(args.report or f"var/link-{args.provider}-{time.strftime('%Y%m%d-%H%M%S')}.csv")
    try:
        report = asyncio.run(run_link(args.provider, url, source=Path(args.source) if args.source else None,
                                      dry_run=args.dry_run, report_path=report_path,
                                      progress=None if args.quiet else sys.stderr))
    except LinkError as exc:
        raise CliError(str(exc)) from exc
    counts = report.counts()
    print(f"{report.provider}: {report.records} record(s) read; "
          + ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in STATUSES))
    print(("dry run: no link written" if args.dry_run else f"{report.written} link(s) written")
          + f"; report: {report_path}")
    return 0


def register(sub: Any) -> None:
    from worker.cli import add_provider_argument

    p = sub.add_parser("link", help="onboard an existing provider account: link its records to source clients "
                                    "by exact keys only")
    add_provider_argument(p, "--provider", required=True, help="the provider to read")
    p.add_argument("--source", metavar="FILE.jsonl",
                   help="source clients, one Client or ClientChange JSON per line (default: the clients "
                        "clientsync has seen)")
    p.add_argument("--dry-run", action="store_true", help="match and report only; write no link")
    p.add_argument("--report", metavar="PATH",
                   help="report file, .csv or .json (default: var/link-<provider>-<time>.csv)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_link)
