"""The lease guard refuses a provider call once the job's lease on its client has run out,
whether a renewal was refused or renewals failed (Redis away) until it expired. (A call that
waited for a rate-limit slot checks again before it leaves: tests/test_retry_jobs.py, over
real HTTP to the sandbox.)"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from worker import lease
from worker.errors import LeaseLost
from worker.lease import LeaseGuard, check_lease
from worker.sync import _keep_lease

IN = "invoice_ninja"


def test_a_lease_past_its_time_refuses_calls_though_no_renewal_was_refused() -> None:
    guard = LeaseGuard("client c-1 at qonto", valid_until=time.monotonic() + 60)
    token = lease.current.set(guard)
    try:
        check_lease()  # within the lease
        guard.valid_until = time.monotonic() - 0.001
        with pytest.raises(LeaseLost):
            check_lease()
    finally:
        lease.current.reset(token)
    assert not guard.lost and LeaseGuard("x").valid_until == math.inf


class _Store:
    """Renewals as Redis answers them: refused, failing (Redis away), or granted."""

    def __init__(self, answers: list[Any]) -> None:
        self.lease_seconds = 0.15
        self.answers = answers
        self.asked = 0

    async def renew(self, *_args: Any, **_kwargs: Any) -> bool:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)


async def _renew_until(store: _Store, guard: LeaseGuard, asked: int) -> None:
    task = asyncio.create_task(_keep_lease(store, "idem", IN, "c-1", "me", guard))  # type: ignore[arg-type]
    deadline = time.monotonic() + 30  # guards a hang only
    while store.asked < asked and not task.done():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()


async def test_failed_renewals_leave_the_lease_ending_at_the_last_good_one() -> None:
    store = _Store([True, ConnectionError("Redis away")])
    guard = LeaseGuard("client c-1", valid_until=time.monotonic() + store.lease_seconds)
    await _renew_until(store, guard, 1)
    renewed = guard.valid_until
    await _renew_until(store, guard, 4)  # three failures after the good one
    assert guard.valid_until == renewed and not guard.lost


async def test_a_refused_renewal_trips_the_guard() -> None:
    store = _Store([False])
    guard = LeaseGuard("client c-1", valid_until=time.monotonic() + 60)
    await _renew_until(store, guard, 1)
    await asyncio.sleep(0)
    assert guard.lost
