"""When the SDK tries a request again, and how long it waits first: pure decisions, unit-tested.

Network failures (connect errors, timeouts, a 502/503/504 from a proxy) leave the caller not knowing
whether the gateway took the request. A read is asked again freely. A write is asked again only because
every attempt carries the same idempotency key: the gateway stores the key in the transaction that made
the effect, so a retry of a write that went through gets the first answer and writes nothing
(kinshasa/gateway/idempotency.py). GraphQL errors are answers, never retried, except RATE_LIMITED when
the caller opts in: it is refused before execution, so nothing ran, and it says when to come back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# A proxy or load balancer in front of the gateway answers these when the gateway did not.
RETRIED_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter: attempt n waits up to min(cap, first * 2**(n-1))."""

    attempts: int = 5  # every try, the first one included
    first_s: float = 0.2
    cap_s: float = 5.0
    # A RATE_LIMITED answer advising a longer wait than this is raised instead of waited out.
    max_retry_after_s: float = 30.0

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after `failed_attempts` failures (1 after the first)."""
        ceiling = min(self.cap_s, self.first_s * 2 ** max(failed_attempts - 1, 0))
        return (rng or random).uniform(ceiling / 2, ceiling)

    def may_retry(self, failed_attempts: int) -> bool:
        return failed_attempts < self.attempts

    def rate_limited_wait(self, failed_attempts: int, retry_after: float | None) -> float | None:
        """How long to wait before retrying a RATE_LIMITED request; None: give up and raise it."""
        if not self.may_retry(failed_attempts):
            return None
        if retry_after is None:
            return self.delay(failed_attempts)
        if retry_after > self.max_retry_after_s:
            return None
        return max(retry_after, 0.0)
