"""The pure parts of the retry policy: backoff with injected randomness, per-provider policy."""

from __future__ import annotations

import random

import pytest

from worker.backoff import retry_delay
from worker.jobs import RetryPolicy
from worker.providers.invoice_ninja import InvoiceNinjaConfig
from worker.providers.qonto import QontoConfig
from worker.ratelimit import Limit, limit_for
from worker.settings import Settings


class Fixed(random.Random):
    """An rng whose uniform(a, b) returns the fraction `f` of the way from a to b."""

    def __init__(self, f: float) -> None:
        super().__init__(0)
        self.f = f

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.f


def test_the_backoff_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    top = Fixed(1.0)
    delays = [retry_delay(n, base=0.5, cap=10, rng=top) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_the_jitter_is_full_between_zero_and_the_ceiling() -> None:
    assert retry_delay(4, base=1, cap=100, rng=Fixed(0.0)) == 0.0
    assert retry_delay(4, base=1, cap=100, rng=Fixed(0.25)) == 2.0
    rng = random.Random(7)
    samples = [retry_delay(3, base=1, cap=100, rng=rng) for _ in range(2000)]
    assert min(samples) >= 0 and max(samples) <= 4
    assert min(samples) < 0.1 and max(samples) > 3.9  # spread over the whole range


def test_a_huge_attempt_number_stays_at_the_cap() -> None:
    assert retry_delay(10_000, base=1, cap=30, rng=Fixed(1.0)) == 30


def test_retry_after_wins_over_the_backoff_even_past_the_cap() -> None:
    assert retry_delay(1, base=1, cap=5, retry_after=120, rng=Fixed(0.0)) == 120
    # only a little jitter on top, never less than the server asked
    assert 120 <= retry_delay(1, base=1, cap=5, retry_after=120, rng=Fixed(1.0)) <= 121
    assert retry_delay(6, base=1, cap=5, retry_after=0, rng=Fixed(0.0)) == 0


def test_an_absurd_retry_after_is_cut_to_the_maximum() -> None:
    assert retry_delay(1, base=1, cap=5, retry_after=10**9, rng=Fixed(0.0), retry_after_max=3600) == 3600


def test_the_provider_policy_overrides_the_global_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENTSYNC_INVOICE_NINJA_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("CLIENTSYNC_INVOICE_NINJA_RETRY_BASE", "0.25")
    monkeypatch.setenv("CLIENTSYNC_INVOICE_NINJA_RETRY_CAP", "7200")
    s = Settings(redis_url="redis://x")
    policy = RetryPolicy.for_provider(InvoiceNinjaConfig(), max_attempts=s.max_attempts,
                                      base=s.retry_base_seconds, cap=s.retry_cap_seconds)
    # a cap longer than any visibility timeout is fine: retries are parked, not countdowns
    assert policy == RetryPolicy(max_attempts=3, base=0.25, cap=7200)


def test_the_global_policy_applies_where_the_provider_sets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MAX_ATTEMPTS", "RETRY_BASE", "RETRY_CAP"):
        monkeypatch.delenv(f"CLIENTSYNC_QONTO_{var}", raising=False)
    monkeypatch.setenv("CLIENTSYNC_MAX_ATTEMPTS", "11")
    monkeypatch.setenv("CLIENTSYNC_RETRY_BASE_SECONDS", "2")
    monkeypatch.setenv("CLIENTSYNC_RETRY_CAP_SECONDS", "60")
    s = Settings(redis_url="redis://x")
    policy = RetryPolicy.for_provider(QontoConfig(), max_attempts=s.max_attempts,
                                      base=s.retry_base_seconds, cap=s.retry_cap_seconds)
    assert policy == RetryPolicy(max_attempts=11, base=2, cap=60)


def test_rate_limits_default_to_each_providers_published_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RATE_LIMIT", "RATE_PERIOD"):
        monkeypatch.delenv(f"CLIENTSYNC_QONTO_{var}", raising=False)
        monkeypatch.delenv(f"CLIENTSYNC_INVOICE_NINJA_{var}", raising=False)
    assert limit_for("qonto", QontoConfig()) == Limit(1000, 10.0)
    assert limit_for("invoice_ninja", InvoiceNinjaConfig()) == Limit(500, 60.0)
    assert limit_for("invoice_ninja", InvoiceNinjaConfig(url="https://invoicing.co")) == Limit(500, 60.0)


def test_a_self_hosted_invoice_ninja_has_no_default_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RATE_LIMIT", "RATE_PERIOD"):
        monkeypatch.delenv(f"CLIENTSYNC_INVOICE_NINJA_{var}", raising=False)
    assert limit_for("invoice_ninja", InvoiceNinjaConfig(url="https://billing.example.org")).calls is None
    assert limit_for("invoice_ninja", InvoiceNinjaConfig(url="http://127.0.0.1:8090/invoice_ninja")).calls is None
    limited = InvoiceNinjaConfig(url="https://billing.example.org", rate_limit=100)
    assert limit_for("invoice_ninja", limited).calls == 100


def test_rate_limits_are_configurable_per_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENTSYNC_INVOICE_NINJA_RATE_LIMIT", "3000")
    monkeypatch.setenv("CLIENTSYNC_INVOICE_NINJA_RATE_PERIOD", "60")
    monkeypatch.setenv("CLIENTSYNC_QONTO_RATE_LIMIT", "20")
    monkeypatch.setenv("CLIENTSYNC_QONTO_RATE_PERIOD", "1")
    assert limit_for("invoice_ninja", InvoiceNinjaConfig()) == Limit(3000, 60.0)
    assert limit_for("qonto", QontoConfig()) == Limit(20, 1.0)
