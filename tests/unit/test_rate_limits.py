"""Reading a RATE_LIMITED refusal from a GraphQL body (kinshasa/schemas/rate_limits.py)."""

from __future__ import annotations

from typing import Any

import pytest

from kinshasa.schemas.rate_limits import DEFAULT_WAIT_S, rate_limited_wait


def refused(retry: Any = 0.25, **extra: Any) -> dict[str, Any]:
    extensions = {"code": "RATE_LIMITED", "reason": "rate", **extra}
    if retry is not None:
        extensions["retryAfterS"] = retry
    return {"data": None, "errors": [{"message": "over its rate", "extensions": extensions}]}


def test_a_refusal_is_waited_out_as_the_gateway_asks() -> None:
    assert rate_limited_wait(refused(0.25)) == 0.25
    assert rate_limited_wait(refused(3)) == 3.0
    assert rate_limited_wait(refused(0.01), min_wait_s=0.05) == 0.05
    assert rate_limited_wait(refused(None)) == DEFAULT_WAIT_S
    assert rate_limited_wait(refused("soon")) == DEFAULT_WAIT_S
    assert rate_limited_wait(refused(True)) == DEFAULT_WAIT_S


def test_a_wait_longer_than_the_caller_accepts_or_negative_is_not_waited() -> None:
    assert rate_limited_wait(refused(31.0)) is None
    assert rate_limited_wait(refused(31.0), max_wait_s=60) == 31.0
    assert rate_limited_wait(refused(-1)) is None


@pytest.mark.parametrize("body", [
    {"data": {"runs": []}},
    {"data": {"runs": None}, "errors": [{"message": "x", "extensions": {"code": "RATE_LIMITED"}}]},
    {"data": None, "errors": [{"message": "x", "extensions": {"code": "FORBIDDEN"}}]},
    {"data": None, "errors": [{"message": "no extensions"}]},
    {"data": None, "errors": ["not an object"]},
    {"errors": None},
    {},
])
def test_anything_but_a_whole_request_refused_on_rate_is_not_waited(body: dict[str, Any]) -> None:
    assert rate_limited_wait(body) is None
