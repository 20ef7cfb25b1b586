"""Every gateway error code maps to its exception class, with the extensions it carries as attributes."""

from __future__ import annotations

import pytest

from kinshasa.client import (
    AgentBudgetExceeded,
    BackendUnavailable,
    BreakerOpen,
    Forbidden,
    Internal,
    KinshasaError,
    NotFound,
    QueryTooCostly,
    RateLimited,
    RunClosed,
    RunNotFound,
    Unauthenticated,
    Validation,
)
from kinshasa.client.errors import ERRORS, error_from
from kinshasa.gateway import errors as gateway_errors

TABLE: list[tuple[str, type[KinshasaError]]] = [
    ("UNAUTHENTICATED", Unauthenticated),
    ("FORBIDDEN", Forbidden),
    ("VALIDATION", Validation),
    ("RUN_NOT_FOUND", RunNotFound),
    ("RUN_CLOSED", RunClosed),
    ("BREAKER_OPEN", BreakerOpen),
    ("NOT_FOUND", NotFound),
    ("BACKEND_UNAVAILABLE", BackendUnavailable),
    ("QUERY_TOO_COSTLY", QueryTooCostly),
    ("RATE_LIMITED", RateLimited),
    ("INTERNAL", Internal),
    ("AGENT_BUDGET_EXCEEDED", AgentBudgetExceeded),
]


def test_the_table_covers_every_code_the_gateway_has() -> None:
    assert {code for code, _ in TABLE} == set(gateway_errors.CODES) == set(ERRORS)


@pytest.mark.parametrize(("code", "cls"), TABLE)
def test_each_code_raises_its_own_class(code: str, cls: type[KinshasaError]) -> None:
    error = error_from([{"message": "no", "extensions": {"code": code}}])
    assert type(error) is cls
    assert error.code == code and error.message == "no" and str(error) == f"{code}: no"


def test_an_unknown_code_is_the_base_class_with_its_code() -> None:
    error = error_from([{"message": "new", "extensions": {"code": "SOMETHING_NEW"}}])
    assert type(error) is KinshasaError and error.code == "SOMETHING_NEW"
    assert error_from([{"message": "bare"}]).code == "UNKNOWN"


def test_breaker_open_carries_the_snapshot_the_gateway_sent() -> None:
    sent = gateway_errors.BreakerOpen("open", breaker={"state": "OPEN", "writes": 3, "trippedReason": "x"})
    error = error_from([{"message": sent.message, "extensions": sent.extensions}])
    assert isinstance(error, BreakerOpen)
    assert error.breaker == {"state": "OPEN", "writes": 3, "trippedReason": "x"}


def test_validation_lists_the_field_errors() -> None:
    sent = gateway_errors.Invalid("bad", [("input.title", "too long"), ("runId", "required")])
    error = error_from([{"message": "bad", "extensions": sent.extensions}])
    assert isinstance(error, Validation)
    assert [(f.path, f.message) for f in error.fields] == [("input.title", "too long"), ("runId", "required")]


def test_rate_limited_and_budget_say_when_to_come_back() -> None:
    limited = error_from([{"message": "slow", "extensions": gateway_errors.RateLimited(
        "slow", reason="rate", retryAfterS=0.25).extensions}])
    assert isinstance(limited, RateLimited) and limited.retry_after == 0.25 and limited.reason == "rate"
    budget = error_from([{"message": "over", "extensions": gateway_errors.AgentBudgetExceeded(
        "over", budget="max_runs_per_hour", limit=5, count=5, retryAfterS=120).extensions}])
    assert isinstance(budget, AgentBudgetExceeded)
    assert (budget.retry_after, budget.budget, budget.limit, budget.count) == (120, "max_runs_per_hour", 5, 5)


def test_costly_and_backend_errors_keep_their_details() -> None:
    costly = error_from([{"message": "big", "extensions": {"code": "QUERY_TOO_COSTLY", "cost": 900,
                                                            "limit": 500}}])
    assert isinstance(costly, QueryTooCostly) and (costly.cost, costly.limit) == (900, 500)
    down = error_from([{"message": "down", "extensions": {"code": "BACKEND_UNAVAILABLE",
                                                           "backend": "coordinator"}}])
    assert isinstance(down, BackendUnavailable) and down.backend == "coordinator"


def test_every_error_and_partial_data_stay_on_the_exception() -> None:
    errors = [{"message": "a", "extensions": {"code": "NOT_FOUND"}},
              {"message": "b", "extensions": {"code": "BACKEND_UNAVAILABLE"}}]
    error = error_from(errors, {"run": None})
    assert isinstance(error, NotFound)
    assert [e["message"] for e in error.errors] == ["a", "b"] and error.data == {"run": None}
