"""The ingest baseline: a bare aiohttp server that reads the JSON body and answers 202.

No signature check, no validation, no Redis: the floor of what any aiohttp webhook receiver
costs on this machine. Run by `bench_throughput.py ingest` as its own process, like the
receiver (`clientsync serve`), with the same `web.run_app` settings (no access log).

    .venv/bin/python bench/bare_receiver.py --port 8099
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def receive(request: web.Request) -> web.Response:
    await request.json()
    return web.json_response({"status": "accepted"}, status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=256 * 1024)
    app.router.add_post("/webhooks/clients", receive)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    main()
