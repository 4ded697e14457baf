"""`worker.gcpolicy` in a fresh interpreter (freezing is process-wide: not in the test process)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

_PROBE = r"""
import gc, json, weakref
from worker.gcpolicy import YOUNG_THRESHOLD, settle_startup_heap

class Node:
    pass

frozen = settle_startup_heap("probe")
collections = gc.get_stats()[0]["collections"]
# Garbage made after startup is still found, with no explicit collect: reference cycles only the
# collector can free, more of them than the young threshold, so it must run on its own.
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
for _ in range(YOUNG_THRESHOLD):
    c, d = Node(), Node()
    c.other, d.other = d, c
del c, d
print(json.dumps({"frozen": frozen, "count": gc.get_freeze_count(), "threshold": gc.get_threshold(),
                  "cycle_freed": gone() is None, "young": YOUNG_THRESHOLD,
                  "ran": gc.get_stats()[0]["collections"] - collections}))
"""


def test_settling_freezes_the_startup_heap_raises_the_young_threshold_and_still_frees_new_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    seen = json.loads(out.stdout)
    assert seen["frozen"] == seen["count"] > 1_000  # the interpreter and worker's modules at least
    assert seen["threshold"][0] == seen["young"] > 700  # above CPython's default
    assert seen["ran"] >= 1 and seen["cycle_freed"] is True  # collected automatically
