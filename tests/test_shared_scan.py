"""`worker.providers.shared.SharedScan`: concurrent searches share passes over an unfiltered
list, and a search is never answered from a pass that started before it asked.

The list here is an in-memory one whose reads the test steps through with events, so the order
of "a record is created" and "a pass reads it" is exact. The same class over real HTTP (LSP.expert's
sandbox) is in tests/providers/test_lsp_expert.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from worker.errors import LeaseLost, ProviderUnavailable
from worker.lease import LeaseGuard, calls, check_lease, count_call
from worker.lease import current as current_lease
from worker.providers.base import RemoteClient
from worker.providers.shared import SharedScan


class Listing:
    """A provider's list: `records` is read page by page (`page_size`), each page one call; a
    pass stops before its first page or after its last while `gate` is clear."""

    def __init__(self, names: list[str], page_size: int = 2) -> None:
        self.records = [RemoteClient(id=str(i), data={"name": n}) for i, n in enumerate(names, 1)]
        self.page_size = page_size
        self.gate_before = asyncio.Event()
        self.gate_before.set()
        self.gate_after = asyncio.Event()
        self.gate_after.set()
        self.started = 0  # passes that began reading
        self.read_all = asyncio.Event()  # set when a pass has read its last page
        self.fail_next = 0

    def add(self, name: str) -> RemoteClient:
        record = RemoteClient(id=str(len(self.records) + 1), data={"name": name})
        self.records.append(record)
        return record

    async def read(self) -> AsyncIterator[RemoteClient]:
        await self.gate_before.wait()
        self.started += 1
        for start in range(0, len(self.records), self.page_size):
            check_lease()  # as ProviderAdapter.request does before every call
            count_call()
            if self.fail_next:
                self.fail_next -= 1
                raise ProviderUnavailable("page failed (test)", provider="test")
            page = list(self.records[start:start + self.page_size])
            await asyncio.sleep(0)  # a page is an await, as over HTTP
            for r in page:
                yield r
        self.read_all.set()
        await self.gate_after.wait()


def by_name(listing: Listing) -> SharedScan:
    return SharedScan(listing.read, lambda r: [("name", str(r.data["name"]))])


async def test_a_search_asked_while_a_pass_runs_waits_for_the_next_pass_and_sees_what_it_missed() -> None:
    listing = Listing(["ann", "bob", "cid"])
    scan = by_name(listing)
    listing.gate_after.clear()
    first = asyncio.create_task(scan.search([("name", "zed")]))
    await listing.read_all.wait()  # the first pass has read every record; zed did not exist yet
    zed = listing.add("zed")
    second = asyncio.create_task(scan.search([("name", "zed")]))
    await asyncio.sleep(0)
    listing.gate_after.set()
    assert await first == [], "the first search's pass read the list before zed was created"
    assert [r.id for r in await second] == [zed.id], "a pass that began before the search asked must not answer it"
    assert scan.passes == 2


async def test_searches_asked_together_share_one_pass_and_each_gets_only_its_matches() -> None:
    names = [f"n{i}" for i in range(40)] + ["n3"]  # n3 twice: two records, found in list order
    listing = Listing(names, page_size=7)
    scan = by_name(listing)
    listing.gate_before.clear()
    searches = [asyncio.create_task(scan.search([("name", f"n{i}"), ("name", "absent")])) for i in range(40)]
    both = asyncio.create_task(scan.search([("name", "n5"), ("name", "n3"), ("name", "n5")]))
    await asyncio.sleep(0)
    listing.gate_before.set()
    results = await asyncio.gather(*searches)
    assert [[r.data["name"] for r in found] for found in results] == [
        ["n3", "n3"] if i == 3 else [f"n{i}"] for i in range(40)
    ]
    assert [r.id for r in await both] == ["4", "6", "41"], "each record once, in list order"
    assert (scan.passes, listing.started) == (1, 1)


async def test_passes_run_one_at_a_time_however_many_searches_arrive_meanwhile() -> None:
    listing = Listing(["ann", "bob"])
    scan = by_name(listing)
    listing.gate_after.clear()
    first = asyncio.create_task(scan.search([("name", "ann")]))
    await listing.read_all.wait()
    later = [asyncio.create_task(scan.search([("name", "bob")])) for _ in range(25)]
    await asyncio.sleep(0)
    assert listing.started == 1, "no second pass while the first runs"
    listing.read_all.clear()
    listing.gate_after.set()
    assert [r.id for r in await first] == ["1"]
    assert all([r.id for r in found] == ["2"] for found in await asyncio.gather(*later))
    assert scan.passes == 2, "the 25 searches that asked during the first pass shared the second"


async def test_a_failed_pass_fails_every_search_that_shared_it_and_the_next_search_reads_again() -> None:
    listing = Listing(["ann", "bob", "cid"])
    scan = by_name(listing)
    listing.fail_next = 1
    listing.gate_before.clear()
    shared = [asyncio.create_task(scan.search([("name", "ann")])) for _ in range(3)]
    await asyncio.sleep(0)
    listing.gate_before.set()
    outcomes = await asyncio.gather(*shared, return_exceptions=True)
    assert all(isinstance(o, ProviderUnavailable) for o in outcomes), outcomes
    assert [r.id for r in await scan.search([("name", "ann")])] == ["1"]
    assert scan.passes == 2


async def test_each_search_is_charged_the_calls_its_pass_made_and_no_job_context_leaks_into_the_pass() -> None:
    listing = Listing(["a", "b", "c", "d", "e"], page_size=2)  # 3 pages
    scan = by_name(listing)
    listing.gate_before.clear()
    guard = LeaseGuard("client x")

    async def job() -> int:
        box = [0]
        calls.set(box)
        current_lease.set(guard)
        await scan.search([("name", "a")])
        return box[0]

    jobs = [asyncio.create_task(job()) for _ in range(2)]
    await asyncio.sleep(0)
    guard.lost = True  # a job's lease lost after it asked must not stop the shared pass for others
    listing.gate_before.set()
    assert await asyncio.gather(*jobs) == [3, 3]


async def test_a_search_whose_lease_is_lost_makes_no_call() -> None:
    listing = Listing(["a"])
    scan = by_name(listing)
    guard = LeaseGuard("client x")
    guard.lost = True
    current_lease.set(guard)
    with pytest.raises(LeaseLost):
        await scan.search([("name", "a")])
    assert listing.started == 0


async def test_a_cancelled_search_leaves_the_others_of_its_pass_answered() -> None:
    listing = Listing(["ann", "bob"])
    scan = by_name(listing)
    listing.gate_before.clear()
    leaving = asyncio.create_task(scan.search([("name", "ann")]))
    staying = asyncio.create_task(scan.search([("name", "bob")]))
    await asyncio.sleep(0)
    leaving.cancel()
    listing.gate_before.set()
    assert [r.id for r in await staying] == ["2"]
    assert leaving.cancelled()


async def test_an_empty_search_reads_nothing() -> None:
    listing = Listing(["a"])
    scan = by_name(listing)
    assert await scan.search([]) == []
    assert listing.started == 0


async def test_after_a_cancelled_pass_the_next_search_reads_afresh() -> None:
    listing = Listing(["ann", "bob"])
    scan = by_name(listing)
    listing.gate_after.clear()
    first = asyncio.create_task(scan.search([("name", "ann")]))
    await listing.read_all.wait()
    waiting = asyncio.create_task(scan.search([("name", "bob")]))  # joins the next pass
    await asyncio.sleep(0)
    assert scan._runner is not None
    scan._runner.cancel()  # as when the worker's loop shuts its tasks down
    for task in (first, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    listing.gate_after.set()
    assert [r.id for r in await scan.search([("name", "bob")])] == ["2"]


async def test_a_search_is_charged_its_wait_for_the_pass_as_provider_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.lease
    from worker.lease import ProviderTime, provider_time

    class Clock:
        now = 100.0

        def monotonic(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(worker.lease, "time", clock)
    listing = Listing(["ann", "bob"])
    listing.gate_before.clear()
    scan = by_name(listing)
    waited = ProviderTime()

    async def search(key: str) -> list[RemoteClient]:
        provider_time.set(waited)  # this task's own context, as worker.jobs sets it per job
        return await scan.search([("name", key)])

    # two searches of one job at once (as identity lookups go together): their wait counts once
    tasks = [asyncio.create_task(search("bob")), asyncio.create_task(search("ann"))]
    await asyncio.sleep(0)
    clock.now = 107.5  # the pass takes 7.5 s of the provider's time
    listing.gate_before.set()
    assert [[r.id for r in await t] for t in tasks] == [["2"], ["1"]]
    assert waited.seconds == 7.5
