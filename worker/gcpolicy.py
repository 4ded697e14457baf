"""Keep the garbage collector's pauses short in the long-running processes.

A collection stops the whole process (the GIL is held): the worker's event loop and Celery's
consumer thread both wait for it. Measured under paced load (docs/benchmarks.md, "Fourth session
on issue 10"), the worker with CPython's defaults ran a full (generation 2) collection every
~3.5 s, each 60-220 ms, 5.5-8.6 s of pauses in a 3-minute run: they made the p99 of a change's
overhead. Two causes, two settings:

- **The startup heap** (modules, functions, classes, the runtime's clients: ~92,000 objects of
  ~170,000) never becomes garbage, yet every full collection walked it. `gc.freeze()` once
  startup is done moves it to the permanent generation, which no collection walks.
- **Jobs live a few hundred ms** (they wait on providers), long enough to outlive two young
  collections at the default threshold (700 net new objects), so nearly everything a job holds
  was promoted to the oldest generation and then freed there by reference counting: the old
  generation filled with pending objects and full collections came every few seconds. The
  threshold counts objects allocated minus objects freed, so a steady load of in-flight jobs
  adds ~nothing; at `YOUNG_THRESHOLD` a collection comes only when the heap really grows, or
  when reference cycles that only the collector can free pile up (at most that many objects).

Together: 40 full collections → 4, and the worker's pauses 5.5 s → 0.35 s over the same run.
The cost is memory held by cycles until a collection comes: measured where cycles are likeliest
(exceptions and their tracebacks), a chaos run with 20% of provider calls failing peaked at 109
MB of worker RSS against 101 MB with CPython's defaults. Cycles that hold large buffers could
hold more (up to this many objects' worth) before they are freed.
Objects frozen here are still freed by reference counting; only a reference cycle among them
would be kept, and the startup heap lives until exit anyway.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("clientsync.gc")

#: net new container objects before a young collection (CPython's default is 700)
YOUNG_THRESHOLD = 50_000


def settle_startup_heap(what: str) -> int:
    """Collect once, freeze what is left and raise the young threshold: call when the process
    has finished starting. Returns the number of objects frozen (`gc.get_freeze_count()`)."""
    gc.collect()
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    frozen = gc.get_freeze_count()
    log.debug("%s: %d startup objects frozen out of the collector's reach", what, frozen)
    return frozen


def gc_info() -> dict[str, object]:
    """What `celery inspect stats` shows of the collector (the pool's info)."""
    return {"frozen": gc.get_freeze_count(), "threshold": list(gc.get_threshold()),
            "collections": [s["collections"] for s in gc.get_stats()]}
