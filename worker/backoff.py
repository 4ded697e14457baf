"""Retry delays: exponential backoff with full jitter, capped; a server's Retry-After wins."""

from __future__ import annotations

import random


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds before attempt `attempt + 1` (attempt counts from 1).

    Full jitter (uniform between 0 and the exponential ceiling) spreads retries of many
    jobs that failed together; see https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/.
    """
    if retry_after is not None:
        # The server said when; a little jitter on top keeps a burst from returning at once.
        return retry_after + (rng or random).uniform(0, min(1.0, base))
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)
