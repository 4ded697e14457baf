"""Flower shows each change's real outcome (issue 9): the task-succeeded event a real worker sends
carries, as the task's result, every provider job's state, so SUCCESS never hides a dead job.

Read the way Flower reads it: a Celery event receiver on the broker, beside a real worker. The
worker runs with clientsync's defaults, task events off (`CLIENTSYNC_TASK_EVENTS`): Flower turns
them on itself, sending Celery's `enable_events` command every few seconds (its `enable_events`
option, on by default), and so does this test.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from typing import Any

from tasks.app import app
from tests.conftest import REPO, running_stack
from tests.helpers import change, signed_headers


def _capture(url: str, seen: list[dict[str, Any]], stop: threading.Event) -> None:
    with app.connection_for_read(url) as conn:
        receiver = app.events.Receiver(conn, handlers={"task-succeeded": seen.append})
        while not stop.is_set():
            try:
                receiver.capture(limit=None, timeout=0.5, wakeup=False)
            except TimeoutError:
                continue


def test_the_task_result_flower_shows_names_each_providers_state(redis_server_url: str) -> None:
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    with running_stack(redis_server_url, providers=["invoice_ninja"]) as stack:
        thread = threading.Thread(target=_capture, args=(stack.redis_url, seen, stop), daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            # The receiver subscribes in its own time: send changes until an event is seen.
            while not seen:
                assert time.monotonic() < deadline, "no task-succeeded event reached the receiver"
                # What Flower does every few seconds (through the broker, like any remote control).
                subprocess.run([sys.executable, "-m", "celery", "-A", "tasks.app", "control", "enable_events"],
                               env=stack.env, cwd=REPO, capture_output=True, timeout=60, check=False)
                payload = change(f"evt-flower-{uuid.uuid4().hex[:8]}", "c-flower", name="Flower Co")
                # invoice_ninja is enabled here; request_finance is named but not configured
                payload["providers"] = ["invoice_ninja", "request_finance"]
                body = json.dumps(payload).encode()
                req = urllib.request.Request(f"{stack.receiver_url}/webhooks/clients", data=body, method="POST",
                                             headers=signed_headers(stack.env["CLIENTSYNC_WEBHOOK_SECRET"], body))
                with urllib.request.urlopen(req, timeout=10) as resp:
                    assert resp.status == 202
                for _ in range(40):
                    if seen:
                        break
                    time.sleep(0.25)
        finally:
            stop.set()
            thread.join(10)
    results = [ast.literal_eval(e["result"]) for e in seen]
    assert {"invoice_ninja": "succeeded", "request_finance": "dead"} in results, results
