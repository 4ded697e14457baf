"""The `clientsync` command: run the system, send changes, serve the sandbox, show the schema."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.gcpolicy import settle_startup_heap
from worker.models import ClientChange, change_json_schema
from worker.settings import LOOP_POOL, Settings, SettingsError, default_concurrency, read_secret_files

log = logging.getLogger("clientsync")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, where it has one (not for None or a plain flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Subcommand parsers (and theirs) format help with `HelpFormatter` unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class CliError(Exception):
    """A usage or input error: printed without a traceback, exit status 2."""


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"CLIENTSYNC_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise CliError(f"invalid settings: {problems}") from exc


def _startup_settings() -> Settings:
    """Every setting (provider ones too) validated before anything starts: a bad one stops us here."""
    from worker.check import validate_config

    try:
        return validate_config()[0]
    except SettingsError as exc:
        raise CliError(str(exc)) from exc


def _require_redis(settings: Settings) -> str:
    if not settings.redis_url:
        raise CliError("CLIENTSYNC_REDIS_URL is not set (use `clientsync run` for an all-in-one local system)")
    return settings.redis_url


def _logging(level: str, fmt: str = "text") -> None:
    from worker import logsafe

    logsafe.install()  # emails and secrets masked in every log line
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if fmt == "json":
        from worker.logjson import use_json

        use_json()


# --- commands ---------------------------------------------------------------------------------
def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(change_json_schema(), indent=2))
    return 0


def read_change(source: str) -> ClientChange:
    """Parse a ClientChange from a file path or '-' (stdin), with errors naming each field."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{source} is not valid JSON: {exc}") from exc
    try:
        return ClientChange.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()]
        raise CliError(f"{source} is not a valid ClientChange:\n" + "\n".join(lines)) from exc


def cmd_send(args: argparse.Namespace) -> int:
    if args.webhook:
        return send_webhook(args.file, args.webhook)
    import redis.asyncio as aioredis

    from worker.producer import Producer

    settings = _settings()
    url = _require_redis(settings)
    change = read_change(args.file)

    async def go() -> str:
        client = aioredis.from_url(url)
        try:
            producer = Producer(client, queue=settings.queue, event_ttl=settings.event_ttl_seconds)
            return (await producer.enqueue(change, received_at=time.time())).status
        finally:
            await client.aclose()

    status = asyncio.run(go())
    print(f"{change.event_id}: {status}")
    return 0


def send_webhook(source: str, url: str) -> int:
    """Post the change as a webhook signed with CLIENTSYNC_WEBHOOK_SECRET (Standard Webhooks) and
    print the receiver's answer; exit status 0 for a 2xx, 1 otherwise."""
    import uuid
    from urllib.parse import urlsplit

    import aiohttp

    from worker.web.signatures import decode_secret, sign

    secrets = _settings().webhook_secrets()
    if not secrets:
        raise CliError("CLIENTSYNC_WEBHOOK_SECRET is not set: nothing to sign the webhook with")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"--webhook: must be an http(s) URL (e.g. http://127.0.0.1:8080), not {url!r}")
    if parts.path in ("", "/"):
        url = url.rstrip("/") + "/webhooks/clients"
    change = read_change(source)  # errors name the field before anything is sent
    body = change.model_dump_json(exclude_none=True).encode()
    try:
        key = decode_secret(secrets[0])
    except ValueError as exc:
        raise CliError(f"CLIENTSYNC_WEBHOOK_SECRET: {exc}") from exc
    msg_id, timestamp = f"msg_{uuid.uuid4().hex}", int(time.time())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(key, msg_id, timestamp, body), "content-type": "application/json"}

    async def go() -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(url, data=body, headers=headers) as response:
            return response.status, await response.text()

    try:
        status, text = asyncio.run(go())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"cannot post to {url}: {exc or type(exc).__name__}") from exc
    print(f"{change.event_id}: HTTP {status} {text.strip()}")
    return 0 if 200 <= status < 300 else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from worker.web.app import create_app

    settings = _startup_settings()
    _logging(settings.log_level, settings.log_format)
    url = _require_redis(settings)
    app = create_app(settings, url)

    async def settle(_app: web.Application) -> None:
        settle_startup_heap("receiver")

    app.on_startup.append(settle)  # last: after the app's own startup has built its clients
    web.run_app(app, host=args.host or settings.host, port=args.port or settings.port,
                access_log=None, print=lambda *_: None)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _startup_settings()
    _require_redis(settings)
    from worker.providers import enabled_configs
    from worker.sync import lease_problems

    problems = lease_problems(settings.lease_seconds, enabled_configs())
    if problems:
        raise CliError("invalid settings: " + "; ".join(problems))
    pool = args.pool or settings.worker_pool
    concurrency = args.concurrency or settings.worker_concurrency or default_concurrency(pool)
    # Exec Celery on the `tasks` package by name: `worker` never imports `tasks`. The loop pool
    # is out of Celery's tree: Celery's documented hook for one is `--pool custom` + this variable.
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker",
            "--loglevel", settings.log_level, "--pool", "custom" if pool == "loop" else pool,
            "--concurrency", str(concurrency), "--without-gossip", "--without-mingle"]
    if settings.task_events:
        argv.append("--task-events")
    if args.hostname:
        argv += ["--hostname", args.hostname]
    # The flags reach the worker's runtime too (tasks.runtime sizes its Redis pool and HTTP
    # connector from the settings): one value for Celery's pool and for what it shares.
    env = {**os.environ, "CLIENTSYNC_WORKER_POOL": pool, "CLIENTSYNC_WORKER_CONCURRENCY": str(concurrency),
           "CELERY_CUSTOM_WORKER_POOL": LOOP_POOL}
    os.execve(sys.executable, argv, env)  # noqa: S606 - replaces this process with the Celery worker


def cmd_sandbox(args: argparse.Namespace) -> int:
    from worker.sandbox.server import start_sandbox

    _logging("INFO")
    names = [n.strip() for n in args.providers.split(",")] if args.providers else None

    async def serve() -> None:
        sb = await start_sandbox(host=args.host, port=args.port, names=names)
        settle_startup_heap("sandbox")
        print(f"sandbox providers on {sb.root}:")
        for name in sb.simulators:
            print(f"  {name:16} {sb.base_url(name)}")
        print("environment for clientsync:")
        for key, value in sorted(sb.env().items()):
            print(f"  export {key}={value}")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await sb.stop()

    asyncio.run(serve())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from worker.launcher import Stack
    from worker.providers import enabled_configs, load_configs

    _startup_settings()
    _logging("INFO")
    data_dir = str(Path(args.data_dir).resolve())
    # var/ (the parent of --data-dir) keeps the children's logs and the generated secrets
    var_dir = Path(data_dir).parent
    stack = Stack(log_dir=var_dir / "logs", echo=True)
    redis_url = stack.ensure_redis(persist_dir=data_dir)
    stack.ensure_secrets(var_dir / "secrets")
    for key, value in stack.env.items():
        if key.startswith("CLIENTSYNC_"):
            os.environ[key] = value
    use_sandbox = args.sandbox == "always" or (args.sandbox == "auto" and not enabled_configs())
    try:
        if use_sandbox:
            stack.start_sandbox(port=args.sandbox_port)
            for key, value in stack.env.items():
                if key.startswith("CLIENTSYNC_"):
                    os.environ[key] = value
        configs = load_configs()
        url = stack.start_receiver(port=args.port)
        stack.start_worker()
        secret = stack.env["CLIENTSYNC_WEBHOOK_SECRET"]
        where = f"sandbox at http://127.0.0.1:{stack.sandbox_port}" if use_sandbox else "from CLIENTSYNC_* settings"
        enabled = [name for name, cfg in configs.items() if cfg.is_configured()]
        disabled = [f"\n    {name:16} disabled: {cfg.missing()}" for name, cfg in configs.items()
                    if not cfg.is_configured()]
        # Handlers before the banner: whoever reads "Stop with Ctrl-C" may press it at once.
        stop = {"now": False}

        def _stop(*_: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        stack.say(f"""
clientsync is running
  redis      {redis_url}{'  (embedded, data in ' + data_dir + ')' if stack.redis else ''}
  providers  {where}
    enabled: {', '.join(enabled) or 'none'}{''.join(disabled)}
  webhooks   POST {url}/webhooks/clients   (Standard Webhooks signature)
  secret     CLIENTSYNC_WEBHOOK_SECRET={secret}
  monitor    {url}/dashboard   token: CLIENTSYNC_MONITOR_TOKEN={stack.env['CLIENTSYNC_MONITOR_TOKEN']}
  logs       {stack.log_dir}/{{receiver,worker{',sandbox' if use_sandbox else ''}}}.log (also below, prefixed)
  secrets    kept in {var_dir / 'secrets'} across restarts (unless set in the environment)
  send a change:  CLIENTSYNC_REDIS_URL={redis_url} clientsync send examples/change.json
Stop with Ctrl-C.""")
        restarts: list[float] = []
        while not stop["now"]:
            for name, proc in list(stack.procs.items()):
                if proc.poll() is None:
                    continue
                # A Celery worker exits when the broker refuses its own writes (e.g. Redis out
                # of memory); its unacked messages come back, so restart it as a supervisor
                # would, unless it keeps dying.
                restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
                if name != "worker" or len(restarts) > 5:
                    raise CliError(f"{name} exited with status {proc.returncode}")
                stack.say(f"worker exited with status {proc.returncode}; restarting it")
                stack.procs.pop(name)
                stack.start_worker()
            time.sleep(0.5)
        print("stopping…", flush=True)
    finally:
        stack.stop()
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    import redis.asyncio as aioredis

    from worker.inflight import purge

    settings = _settings()
    url = _require_redis(settings)
    queue = args.queue or settings.queue

    async def go() -> dict[str, int]:
        client = aioredis.from_url(url)
        try:
            return await purge(client, queue)
        finally:
            await client.aclose()

    done = asyncio.run(go())
    print(f"purged {queue}: {done['queued']} queued message(s), {done['tracked']} held by dead workers")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    """Print the shell completion script for the whole parser (shtab reads it: subcommands, options, choices)."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(timeout=args.timeout)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("clientsync")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --- wiring -----------------------------------------------------------------------------------
#: the shells `clientsync completion` writes a script for (with shtab)
COMPLETION_SHELLS = ("bash", "zsh", "tcsh")


def add_provider_argument(parser: argparse.ArgumentParser, *flags: str, extra: tuple[str, ...] = (),
                          **kwargs: Any) -> argparse.Action:
    """An argument that names a provider: its choices are the registered providers (plus `extra`),
    so argparse refuses any other name and `clientsync completion` completes to these names."""
    from worker.providers import REGISTRY

    return parser.add_argument(*flags, choices=[*REGISTRY, *extra], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clientsync", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("schema", help="print the ClientChange JSON Schema").set_defaults(func=cmd_schema)

    p = sub.add_parser("send", help="enqueue a ClientChange from a file (or - for stdin), or post it as a "
                                    "signed webhook with --webhook")
    p.add_argument("file", help="a ClientChange JSON file, or - for stdin")
    p.add_argument("--webhook", metavar="URL",
                   help="post it to this receiver (e.g. http://127.0.0.1:8080) signed with CLIENTSYNC_WEBHOOK_SECRET "
                        "instead of enqueueing it directly")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("serve", help="run the receiver (webhooks, monitor API, dashboard)")
    p.add_argument("--host", help="bind address (default: CLIENTSYNC_HOST)")
    p.add_argument("--port", type=int, help="port (default: CLIENTSYNC_PORT)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker that applies changes")
    p.add_argument("--concurrency", type=int, help="tasks at once: changes in flight with the loop pool, threads "
                   "or processes with the others (default: CLIENTSYNC_WORKER_CONCURRENCY, else the pool's default)")
    p.add_argument("--pool", choices=["loop", "threads", "prefork", "solo"],
                   help="Celery pool (default: CLIENTSYNC_WORKER_POOL)")
    p.add_argument("--hostname", help="the Celery node name (default: Celery's)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sandbox", help="serve the simulated providers on loopback")
    p.add_argument("--host", default="127.0.0.1", help="bind address (a container needs 0.0.0.0)")
    p.add_argument("--port", type=int, default=8090, help="port of the sandbox root (one path per provider)")
    p.add_argument("--providers", help="comma-separated subset (default: all)")
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("run", help="run everything locally: Redis, sandbox, receiver, worker")
    p.add_argument("--port", type=int, default=8080, help="the receiver's port")
    p.add_argument("--sandbox", choices=["auto", "always", "never"], default="auto",
                   help="auto: use the sandbox when no provider is configured")
    p.add_argument("--sandbox-port", type=int, default=8090, help="the sandbox's port")
    p.add_argument("--data-dir", default="var/redis", help="embedded Redis data (AOF)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("purge", help="empty a queue and the copies dead workers still hold for it")
    p.add_argument("--queue", help="queue name (default: CLIENTSYNC_QUEUE)")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("demo", help="start everything, send a few changes, show what happened, exit")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the changes to finish")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("completion", help="print a shell completion script (see the README for where it goes)")
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell to complete in")
    p.set_defaults(func=cmd_completion)

    for register in _extensions():
        register(sub)
    return parser


#: modules that add subcommand groups with a `register(subparsers)` function
EXTENSIONS = ("worker.monitor_cli", "worker.link", "worker.check")


def _extensions() -> list[Any]:
    found = []
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        found.append(module.register)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        read_secret_files()
        result: int = args.func(args)
        return result
    except (CliError, SettingsError) as exc:
        print(f"clientsync: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
