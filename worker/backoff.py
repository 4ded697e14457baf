"""Retry delays: exponential backoff with full jitter, capped; a server's Retry-After wins."""

from __future__ import annotations

import random

#: a Retry-After longer than this (a day) is treated as this: a typo or a hostile header must
#: not park a job for years
RETRY_AFTER_MAX = 24 * 3600.0


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    retry_after_max: float = RETRY_AFTER_MAX,
) -> float:
    """Seconds before attempt `attempt + 1` (attempt counts from 1).

    Full jitter (uniform between 0 and the exponential ceiling) spreads retries of many
    jobs that failed together; see https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/.
    A server's `Retry-After` wins over the backoff, even past `cap`: calling earlier only
    earns another 429.
    """
    r = rng or random
    if retry_after is not None:
        # The server said when; a little jitter on top keeps a burst from returning at once.
        return min(max(0.0, retry_after), retry_after_max) + r.uniform(0, min(1.0, base))
    ceiling = min(cap, base * (2 ** min(max(0, attempt - 1), 64)))
    return r.uniform(0, ceiling)
