"""Fairness between principals: a token bucket of query cost and a cap on requests in flight, per principal.

One principal cannot take the gateway from the others: each request is charged its estimated cost
(kinshasa/gateway/cost.py) from the principal's bucket, so a principal firing its costliest allowed
queries gets as much of the gateway as one firing cheap ones at a proportionally higher rate; and its
requests running at once are capped, so slow ones (a backend timing out) cannot pile up. Both are kept
in this replica's memory: a shared store would cost a round trip on every request, and what they
protect, this process's CPU and connections, is per replica too.

Unauthenticated requests are not counted: they resolve nothing (every field needs a principal), so
they cost parsing and validation, which the hardening limits bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kinshasa.gateway.errors import RateLimited
from kinshasa.gateway.settings import GatewayConfig

# What an in-flight refusal suggests waiting: about one typical request.
IN_FLIGHT_RETRY_S = 0.1


@dataclass(frozen=True)
class Limits:
    """One principal's limits: cost per second and burst of its bucket, requests in flight."""

    rate_per_s: float
    burst: float
    max_in_flight: int


class TokenBucket:
    """Refills at `rate` per second up to `burst`; a take larger than `burst` is allowed from a full
    bucket and leaves it in debt, so any admissible request can pass and pays for its size by waiting."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Take `amount` and return 0, or take nothing and return the seconds until it could be taken."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        needed = min(amount, self.burst)
        # A microsecond of refill short counts as enough: a client that waited exactly the wait given
        # (`retryAfterS`) is admitted, not refused again for the rounding of a clock read in seconds.
        if self.tokens >= needed - self.rate * 1e-6:
            self.tokens -= amount
            return 0.0
        return (needed - self.tokens) / self.rate


class Fairness:
    """Admits or refuses each request of a principal; `release` when the admitted request has answered."""

    def __init__(
        self,
        default: Limits,
        overrides: Mapping[str, Limits] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self.overrides = dict(overrides or {})
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}

    def limits(self, principal_id: str) -> Limits:
        return self.overrides.get(principal_id, self.default)

    def in_flight(self, principal_id: str) -> int:
        return self._in_flight.get(principal_id, 0)

    def admit(self, principal_id: str, cost: float) -> None:
        """Count the request in flight and charge its cost, or raise RateLimited (and count nothing)."""
        limits = self.limits(principal_id)
        running = self._in_flight.get(principal_id, 0)
        if running >= limits.max_in_flight:
            raise RateLimited(
                f"{principal_id} already has {running} requests in flight, the most this gateway runs at "
                "once for one principal: wait for an answer before sending more",
                reason="in_flight",
                retryAfterS=IN_FLIGHT_RETRY_S,
                maxInFlight=limits.max_in_flight,
            )
        now = self.clock()
        bucket = self._buckets.get(principal_id)
        if bucket is None or bucket.rate != limits.rate_per_s or bucket.burst != limits.burst:
            bucket = self._buckets[principal_id] = TokenBucket(limits.rate_per_s, limits.burst, now)
        wait = bucket.take(cost, now)
        if wait > 0:
            retry = math.ceil(wait * 100) / 100
            raise RateLimited(
                f"{principal_id} is over its rate of {limits.rate_per_s:g} cost units per second (this "
                f"request costs {cost:g}): retry after {retry:g} s, or ask for less per request",
                reason="rate",
                retryAfterS=retry,
                cost=math.ceil(cost),
                ratePerS=limits.rate_per_s,
                burst=limits.burst,
            )
        self._in_flight[principal_id] = running + 1

    def refund(self, principal_id: str, cost: float) -> None:
        """Give back what `admit` charged for a request that did not run (a bucket stays at most full)."""
        bucket = self._buckets.get(principal_id)
        if bucket is not None:
            bucket.tokens = min(bucket.burst, bucket.tokens + cost)

    def release(self, principal_id: str) -> None:
        running = self._in_flight.get(principal_id, 0) - 1
        if running > 0:
            self._in_flight[principal_id] = running
        else:
            self._in_flight.pop(principal_id, None)


def fairness_from(settings: GatewayConfig) -> Fairness:
    """The gateway's Fairness: its default limits and each principal's own (`principal_limits`)."""
    default = Limits(settings.rate_per_s, settings.rate_burst, settings.max_in_flight)
    overrides = {
        principal: Limits(
            own.rate_per_s if own.rate_per_s is not None else default.rate_per_s,
            own.rate_burst if own.rate_burst is not None else default.burst,
            own.max_in_flight if own.max_in_flight is not None else default.max_in_flight,
        )
        for principal, own in settings.principal_limits.items()
    }
    return Fairness(default, overrides)
