"""One pass over a provider's unfiltered list serves every search waiting for it.

A provider with no documented list filter (LSP.expert) is searched by reading every page. With
hundreds of creates in flight per worker process, each reading every page, the pages cost more
CPU (JSON decoding, here and at the provider) than everything else a create does. `SharedScan`
makes concurrent searches share one pass, without ever answering a search from older data:

- a search joins only a pass that STARTS after it asked: a pass already under way when it asks
  may have read past a record created a moment ago, so the search waits for the next one;
- passes run one at a time: every search that asks while one runs joins the next, which starts
  as soon as the running one ends. So a search waits at most two passes, and a process makes
  one pass per pass-length however many searches are in flight;
- each search is answered with its own matches only (records are matched by exact keys through
  one dict lookup each: cost per record does not grow with the searches waiting), in list order,
  each record once. Nothing else of the list is kept.

A failed pass (a 5xx, a timeout, an unreadable page) fails every search that shared it, with
the same error, exactly as if each had read the pages itself; each job retries on its own.

The pass runs in a context of its own: no job's lease guard, write count or call count applies
to it. Each search is charged the calls the pass made (`worker.lease.calls`), so the circuit
breaker still knows its job reached the provider.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from worker.lease import at_provider, calls, check_lease
from worker.providers.base import RemoteClient

Key = tuple[str, str]


@dataclass
class _Search:
    keys: frozenset[Key]
    found: dict[str, RemoteClient] = field(default_factory=dict)


@dataclass
class _Pass:
    future: asyncio.Future[None]
    searches: list[_Search] = field(default_factory=list)
    #: provider calls the pass made (charged to each search that shared it)
    calls: int = 0


class SharedScan:
    """Searches over `records()` (the whole list, read afresh each pass) by exact keys:
    `keys_of(record)` gives each record's (key, normalised value) pairs; a search asks for a
    set of such pairs and gets the records holding any of them."""

    def __init__(self, records: Callable[[], AsyncIterator[RemoteClient]],
                 keys_of: Callable[[RemoteClient], Iterable[Key]]) -> None:
        self._records = records
        self._keys_of = keys_of
        self._next: _Pass | None = None  # the pass that searches asking now will join
        self._running = False
        self._runner: asyncio.Task[None] | None = None  # kept referenced while it runs
        #: passes made (for tests and the curious)
        self.passes = 0

    async def search(self, wanted: Iterable[Key]) -> list[RemoteClient]:
        keys = frozenset(wanted)
        if not keys:
            return []
        check_lease()  # as before any provider call
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = _Pass(loop.create_future())
            self._next.future.add_done_callback(_consume)
        joined, mine = self._next, _Search(keys)
        joined.searches.append(mine)
        if not self._running:
            self._running = True
            self._runner = loop.create_task(self._run(), context=contextvars.Context())
        try:
            # The wait is provider time: the pass's own calls, or the pass before it (which this
            # search may not join) reading the same pages.
            with at_provider():
                await asyncio.shield(joined.future)
        finally:
            box = calls.get()
            if box is not None and joined.future.done():
                box[0] += joined.calls
        return list(mine.found.values())

    async def _run(self) -> None:
        try:
            while self._next is not None:
                this, self._next = self._next, None
                await self._pass(this)
        finally:
            self._running = False
            if self._next is not None:
                # Cancelled with searches still waiting (the loop is stopping): tell them, and
                # let a later search start afresh rather than join a cancelled pass.
                self._next.future.cancel()
                self._next = None

    async def _pass(self, this: _Pass) -> None:
        box = [0]
        token = calls.set(box)
        by_key: dict[Key, list[_Search]] = {}
        for s in this.searches:
            for k in s.keys:
                by_key.setdefault(k, []).append(s)
        self.passes += 1
        try:
            async for record in self._records():
                for k in self._keys_of(record):
                    for s in by_key.get(k, ()):
                        s.found.setdefault(record.id, record)
        except Exception as exc:  # every search that shared the pass gets its error
            this.calls = box[0]
            this.future.set_exception(exc)
        except BaseException:  # cancelled (the loop is stopping): so are the searches
            this.future.cancel()
            raise
        else:
            this.calls = box[0]
            this.future.set_result(None)
        finally:
            calls.reset(token)


def _consume(future: asyncio.Future[None]) -> None:
    """A pass whose searches all went away (cancelled) must not log "exception never retrieved"."""
    if not future.cancelled():
        future.exception()
