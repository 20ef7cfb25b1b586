"""Per-principal token buckets of query cost and in-flight caps, on a fake clock."""

from __future__ import annotations

import pytest

from kinshasa.gateway.errors import RateLimited
from kinshasa.gateway.fairness import Fairness, Limits, TokenBucket, fairness_from
from kinshasa.gateway.settings import GatewayConfig, PrincipalLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=20, now=0)
    assert bucket.take(20, now=0) == 0
    assert bucket.take(5, now=0) == pytest.approx(0.5)
    assert bucket.take(5, now=0.5) == 0
    assert bucket.take(100, now=1000) == 0  # larger than the burst: allowed from a full bucket, in debt
    assert bucket.take(1, now=1000) == pytest.approx(8.1)


@pytest.mark.parametrize("start", [1000.0, 123_456.789, 9_876_543.21, 4e7 + 0.1])
def test_a_client_that_waits_exactly_the_wait_it_was_given_is_admitted(start: float) -> None:
    # 2.5 pages of 123, 10 pages a second: after two pages the third waits 0.05 s, which the float
    # arithmetic of the refill, on a clock of that size (a monotonic clock counts seconds since boot),
    # may put a hair short of a page.
    page = 123
    for step in range(200):
        now = start + step * 0.731
        bucket = TokenBucket(rate=10 * page, burst=2.5 * page, now=now)
        assert bucket.take(page, now=now) == bucket.take(page, now=now) == 0
        wait = bucket.take(page, now=now)
        assert wait == pytest.approx(0.05)
        assert bucket.take(page, now=now + wait) == 0, now


def test_a_principal_over_its_rate_is_refused_with_when_to_retry_and_others_are_not() -> None:
    clock = Clock()
    fairness = Fairness(Limits(rate_per_s=100, burst=100, max_in_flight=10), clock=clock)
    fairness.admit("greedy", 100)
    fairness.release("greedy")
    with pytest.raises(RateLimited) as refused:
        fairness.admit("greedy", 50)
    assert refused.value.extensions["code"] == "RATE_LIMITED"
    assert refused.value.extensions["reason"] == "rate"
    assert refused.value.extensions["retryAfterS"] == pytest.approx(0.5)
    fairness.admit("patient", 100)
    clock.now += 0.5
    fairness.admit("greedy", 50)


def test_requests_in_flight_are_capped_per_principal_and_released() -> None:
    fairness = Fairness(Limits(rate_per_s=1e9, burst=1e9, max_in_flight=2), clock=Clock())
    fairness.admit("a", 1)
    fairness.admit("a", 1)
    with pytest.raises(RateLimited) as refused:
        fairness.admit("a", 1)
    assert refused.value.extensions["reason"] == "in_flight"
    assert refused.value.extensions["maxInFlight"] == 2
    assert refused.value.extensions["retryAfterS"] > 0
    fairness.admit("b", 1)
    fairness.release("a")
    fairness.admit("a", 1)
    assert fairness.in_flight("a") == 2
    for _ in range(3):
        fairness.release("a")
    assert fairness.in_flight("a") == 0


def test_a_refused_request_is_neither_charged_nor_counted() -> None:
    fairness = Fairness(Limits(rate_per_s=10, burst=10, max_in_flight=1), clock=Clock())
    fairness.admit("a", 10)
    with pytest.raises(RateLimited):
        fairness.admit("a", 1)  # in flight: nothing taken from the (empty) bucket
    fairness.release("a")
    with pytest.raises(RateLimited):
        fairness.admit("a", 1)  # over the rate: not counted in flight
    assert fairness.in_flight("a") == 0


def test_principals_get_their_own_limits_from_the_settings() -> None:
    settings = GatewayConfig(
        rate_per_s=10, rate_burst=20, max_in_flight=3,
        principal_limits={"bench-agent": PrincipalLimits(rate_per_s=1000, max_in_flight=100)},
    )
    fairness = fairness_from(settings)
    assert fairness.limits("bench-agent") == Limits(rate_per_s=1000, burst=20, max_in_flight=100)
    assert fairness.limits("anyone") == Limits(rate_per_s=10, burst=20, max_in_flight=3)


def test_principal_limits_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KINSHASA_GATEWAY_PRINCIPAL_LIMITS", '{"a": {"rate_per_s": 5}}')
    assert GatewayConfig().principal_limits == {"a": PrincipalLimits(rate_per_s=5)}
