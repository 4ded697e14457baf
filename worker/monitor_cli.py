"""Monitoring commands for the `clientsync` CLI: jobs, job, replay, discard, summary.

They talk to Redis directly (`CLIENTSYNC_REDIS_URL`) through the same `worker.monitor.Monitor`
the monitor API uses, and print plain aligned tables. Emails are masked, as in the API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import textwrap
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis

from worker import circuit
from worker.cli import CliError, _require_redis, _settings, add_provider_argument
from worker.ledger import INTAKE, STATES
from worker.models import PROVIDER_NAMES
from worker.monitor import (
    MAX_BULK,
    MAX_LIMIT,
    InvalidParam,
    JobFilter,
    JobNotFound,
    Monitor,
    NotAllowed,
    parse_limit,
)

T = TypeVar("T")
_GAP = 2
_MIN_COLUMN = 6
STATE_ORDER = ("queued", "running", "retrying", "needs_attention", "dead", "succeeded", "skipped", "discarded")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, width: int | None = None) -> str:
    """A plain text table, columns aligned, that fits `width` (the terminal's by default): when
    the natural widths do not fit, the widest columns are narrowed and their cells wrapped onto
    more lines, never cut."""
    total = width or shutil.get_terminal_size((120, 24)).columns
    cells = [["" if v is None else " ".join(str(v).split()) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    floor = [max(len(h), _MIN_COLUMN) for h in headers]
    budget = max(total - _GAP * (len(headers) - 1), sum(floor))
    while sum(widths) > budget:
        i = max(range(len(widths)), key=lambda n: widths[n] - floor[n])
        if widths[i] <= floor[i]:
            break
        widths[i] -= 1
    lines = [(" " * _GAP).join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             (" " * _GAP).join("-" * w for w in widths)]
    for row in cells:
        wrapped = [textwrap.wrap(v, w, break_on_hyphens=False) or [""] for v, w in zip(row, widths, strict=True)]
        for n in range(max(len(c) for c in wrapped)):
            parts = [(c[n] if n < len(c) else "").ljust(w) for c, w in zip(wrapped, widths, strict=True)]
            lines.append((" " * _GAP).join(parts).rstrip())
    return "\n".join(lines)


def short_time(iso: str | None) -> str:
    return (iso or "").replace("T", " ").replace("Z", "")[:19]


def _invalid(exc: InvalidParam, names: Mapping[str, str] | None = None) -> CliError:
    """An invalid parameter, named as the command line gives it (`names`: a monitor field -> the
    flag or argument that carries it where they differ; otherwise `--` and the field with dashes)."""
    name = (names or {}).get(exc.field, "--" + exc.field.replace("_", "-"))
    return CliError(f"{name}: {exc.rule}")


def _run(work: Callable[[Monitor], Awaitable[T]], *, names: Mapping[str, str] | None = None) -> T:
    """`work` against the ledger. Every refusal of the monitor is the command's error, worded
    once here: a job not found or an action not allowed as the monitor words it, an invalid
    parameter as its flag (`_invalid`), Redis out of reach as such."""
    settings = _settings()
    url = _require_redis(settings)

    async def go() -> T:
        client = aioredis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        try:
            return await work(Monitor(client, queue=settings.queue))
        except (OSError, aioredis.RedisError) as exc:
            raise CliError(f"cannot reach Redis at CLIENTSYNC_REDIS_URL: {type(exc).__name__}") from exc
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except InvalidParam as exc:
        raise _invalid(exc, names) from exc
    except (JobNotFound, NotAllowed) as exc:
        raise CliError(str(exc)) from exc


def _filter(args: argparse.Namespace, names: Sequence[str]) -> JobFilter:
    params = {n: getattr(args, n, None) for n in names}
    try:
        return JobFilter.parse({k: v for k, v in params.items() if v is not None}, allowed=names)
    except InvalidParam as exc:
        raise _invalid(exc) from exc


def _limit(value: Any, *, default: int, maximum: int) -> int:
    try:
        return parse_limit(value, default=default, maximum=maximum)
    except InvalidParam as exc:
        raise _invalid(exc, {exc.field: "--limit"}) from exc


# --- commands ---------------------------------------------------------------------------------------
def cmd_jobs(args: argparse.Namespace) -> int:
    f = _filter(args, JobFilter.FIELDS)
    limit = _limit(args.limit, default=50, maximum=MAX_LIMIT)
    page = _run(lambda m: m.list_jobs(f, limit=limit, cursor=args.cursor))
    if args.json:
        print(json.dumps({"jobs": page.jobs, "next_cursor": page.next_cursor}, indent=2))
        return 0
    rows = [(j["id"], j["state"], j["provider"], j["client_id"], j["attempts"], short_time(j["updated_at"]),
             ": ".join(x for x in (j["last_error_class"], j["last_error"]) if x) or j["result"] or "")
            for j in page.jobs]
    print(table(["job", "state", "provider", "client", "tries", "updated (utc)", "last error / result"], rows))
    print(f"\n{len(rows)} job(s)" + (f"; more with --cursor {page.next_cursor}" if page.next_cursor else ""))
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    job = _run(lambda m: m.job(args.id))
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    fields = [("job", job["id"]), ("state", job["state"]), ("provider", job["provider"]),
              ("event", job["event_id"]), ("client", job["client_id"]), ("action", job["action"]),
              ("attempts", job["attempts"]), ("replays", job["replays"]),
              ("received", short_time(job["received_at"])), ("updated", short_time(job["updated_at"])),
              ("result", job["result"] or job["reason"]), ("provider id", job["provider_id"]),
              ("last error", ": ".join(x for x in (job["last_error_class"], job["last_error"]) if x)),
              ("replayable", "yes" if job["replayable"] else "no")]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        if value not in (None, ""):
            print(f"{key.ljust(width)}  {value}")
    if job.get("candidates"):
        print("\ncandidates (resolve with `clientsync resolve ID --adopt PROVIDER_ID` or `--create`):")
        print(table(["provider id", "name", "email", "created"],
                    [(c.get("provider_id"), c.get("name"), c.get("email"), c.get("created_at"))
                     for c in job["candidates"]]))
    print("\nhistory:")
    rows = [(a.get("number") or "", short_time(a.get("at")), a.get("outcome"), a.get("error_class"),
             a.get("status"), a.get("message") or a.get("note"), short_time(a.get("next_attempt_at")))
            for a in job["history"]]
    print(table(["#", "at (utc)", "outcome", "error", "http", "message", "next attempt"], rows))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.all_dead):
        raise CliError("give either a job id or --all-dead (with optional filters)")
    if args.id:
        result = _run(lambda m: m.replay(args.id, note="replayed from the CLI"))
        print(f"{result['id']}: queued (task {result['task_id']})")
        return 0
    f = _filter(args, ("provider", "error_class", "since", "until"))
    limit = _limit(args.limit, default=1000, maximum=MAX_BULK)
    bulk = _run(lambda m: m.replay_matching(f, limit=limit, dry_run=args.dry_run, note="bulk replay from the CLI"))
    if args.dry_run:
        print(f"{bulk['matched']} dead job(s) match" + (" (and more)" if bulk["more"] else ""))
        for job_id in bulk.get("jobs", []):
            print(f"  {job_id}")
        return 0
    print(f"replayed {bulk['replayed']} of {bulk['matched']} matching dead job(s)"
          + (f"; {bulk['not_replayable']} invalid message(s) cannot be replayed" if bulk["not_replayable"] else "")
          + (f"; {len(bulk['refused'])} changed state meanwhile" if bulk["refused"] else "")
          + ("; more match: run again" if bulk["more"] else ""))
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    _run(lambda m: m.discard(args.id, note="discarded from the CLI"))
    print(f"{args.id}: discarded")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    if bool(args.adopt) == bool(args.create):
        raise CliError("give either --adopt PROVIDER_ID (one of the job's candidates) or --create")
    action = "adopt" if args.adopt else "create"
    result = _run(lambda m: m.resolve(args.id, action, args.adopt), names={"provider_id": "--adopt"})
    what = f"adopt {args.adopt}" if args.adopt else "create a new record"
    print(f"{result['id']}: " + ("already resolved: " if result.get("already") else "resolved, queued: ") + what)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    data = _run(lambda m: m.summary())
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    workers = data["workers"]
    silent = [b for b in data.get("heartbeats", []) if not b["live"]]
    print(f"queue {data['queue']}: {data['queue_depth']} waiting; workers alive: {len(workers)}"
          + (f" ({', '.join(workers[:5])}{'…' if len(workers) > 5 else ''})" if workers else "")
          + "".join(f"; silent: {b['worker']} (last heartbeat {b['age_seconds']:.0f} s ago)" for b in silent[:5]))
    rows = []
    for name, p in data["providers"].items():
        rate = p["rate_limit"]
        headroom = f"{rate['tokens']:g}" + (f"/{rate['capacity']:g}" if rate.get("capacity") else "") \
            if "tokens" in rate else "-"
        oldest = p["oldest_retrying"]
        rows.append([name, p["circuit"]["state"], *(p["counts"][s] for s in STATE_ORDER), headroom,
                     f"{oldest['id']} ({oldest['attempts']} tries)" if oldest else "-"])
    print()
    print(table(["provider", "circuit", *STATE_ORDER, "rate tokens", "oldest retrying"], rows))
    return 0


def cmd_provider(args: argparse.Namespace) -> int:
    # PROVIDER and ACTION are positional: named as they are, without dashes.
    result = _run(lambda m: m.provider_action(args.provider, args.action, actor="cli", note=args.note or ""),
                  names={"provider": "provider", "action": "action"})
    print(f"{result['provider']}: {result['action']} ({result['before']} -> {result['after']})")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    entries = _run(lambda m: m.audit(limit=args.limit))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [[short_time(e.get("at")), e.get("provider"), e.get("action"), e.get("actor"),
             f"{e.get('before', '')} -> {e.get('after', '')}" if e.get("before") else "", e.get("note")]
            for e in entries]
    print(table(["at", "provider", "action", "actor", "circuit", "note"], rows))
    return 0


# --- wiring -----------------------------------------------------------------------------------------
def _filters(p: argparse.ArgumentParser, *, state: bool) -> None:
    if state:
        p.add_argument("--state", choices=list(STATES), help="the job's state")
    # dead letters (messages that were not a valid change) have the provider `intake` ("-" before)
    add_provider_argument(p, "--provider", extra=(INTAKE, "-"), metavar="PROVIDER",
                          help=f"one of: {', '.join(PROVIDER_NAMES)} (or {INTAKE} for dead letters)")
    p.add_argument("--since", help="last update at or after (RFC 3339 or unix seconds)")
    p.add_argument("--until", help="last update at or before (RFC 3339 or unix seconds)")


def register(sub: Any) -> None:
    """Add the monitoring subcommands to the `clientsync` parser."""
    p = sub.add_parser("jobs", help="list ledger jobs (filters: state, provider, client, event, time)")
    _filters(p, state=True)
    p.add_argument("--client", dest="client_id", help="the client's id in the source system")
    p.add_argument("--event", dest="event_id", help="the change's event id")
    p.add_argument("--error-class", dest="error_class", help="the last error's class (e.g. validation, auth)")
    p.add_argument("--limit", type=int, default=50, help=f"jobs per page (at most {MAX_LIMIT})")
    p.add_argument("--cursor", help="continue after a previous page")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("job", help="one job with its attempt history")
    p.add_argument("id", help="<provider>:<event_id>")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("replay", help="replay one dead job, or every dead job matching filters")
    p.add_argument("id", nargs="?", help="<provider>:<event_id>")
    p.add_argument("--all-dead", action="store_true", help="replay every dead job matching the filters")
    _filters(p, state=False)
    p.add_argument("--error-class", dest="error_class", help="the last error's class (e.g. validation, auth)")
    p.add_argument("--limit", type=int, default=1000, help=f"replay at most this many (at most {MAX_BULK})")
    p.add_argument("--dry-run", action="store_true", help="only count the matching dead jobs")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("discard", help="discard a dead job (kept with its history, out of the dead list)")
    p.add_argument("id", help="<provider>:<event_id>")
    p.set_defaults(func=cmd_discard)

    p = sub.add_parser("resolve", help="answer a needs_attention job: adopt one candidate, or create a new record")
    p.add_argument("id", help="<provider>:<event_id>")
    p.add_argument("--adopt", metavar="PROVIDER_ID", help="link the client to this candidate (see `clientsync job`)")
    p.add_argument("--create", action="store_true", help="create a new record at the provider instead")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("provider", help="pause, resume or probe a provider now (recorded in the audit list)")
    p.add_argument("action", choices=list(circuit.ACTIONS),
                   help="pause: hold its jobs; resume: close the circuit (also after fixing credentials); "
                        "probe: the next job probes at once")
    add_provider_argument(p, "provider", help="the provider")
    p.add_argument("--note", help="why (kept in the audit list)")
    p.set_defaults(func=cmd_provider)

    p = sub.add_parser("audit", help="operator actions and automatic pauses, newest first")
    p.add_argument("--limit", type=int, default=50, help="how many entries")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("summary", help="per-provider health: jobs by state, circuit, rate limit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_summary)
