"""The gateway's error family: each user-causable failure carries a stable `extensions.code`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graphql import GraphQLError
from pydantic import ValidationError

from kinshasa.kernel.failures import classify_failure

UNAUTHENTICATED = "UNAUTHENTICATED"
FORBIDDEN = "FORBIDDEN"
VALIDATION = "VALIDATION"
RUN_NOT_FOUND = "RUN_NOT_FOUND"
RUN_CLOSED = "RUN_CLOSED"
BREAKER_OPEN = "BREAKER_OPEN"
NOT_FOUND = "NOT_FOUND"
BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
QUERY_TOO_COSTLY = "QUERY_TOO_COSTLY"
RATE_LIMITED = "RATE_LIMITED"
INTERNAL = "INTERNAL"

CODES: tuple[str, ...] = (
    UNAUTHENTICATED,
    FORBIDDEN,
    VALIDATION,
    RUN_NOT_FOUND,
    RUN_CLOSED,
    BREAKER_OPEN,
    NOT_FOUND,
    BACKEND_UNAVAILABLE,
    QUERY_TOO_COSTLY,
    RATE_LIMITED,
    INTERNAL,
)


class GatewayError(Exception):
    """A refusal the caller can act on; `extensions` reaches the client untouched."""

    code = INTERNAL

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def extensions(self) -> dict[str, Any]:
        return {"code": self.code, **self.details}


class Unauthenticated(GatewayError):
    code = UNAUTHENTICATED


class Forbidden(GatewayError):
    code = FORBIDDEN


class Invalid(GatewayError):
    """Bad input; `fields` lists (camelCase path, problem) pairs so an agent can fix each one."""

    code = VALIDATION

    def __init__(self, message: str, fields: Sequence[tuple[str, str]] = (), **details: Any) -> None:
        if fields:
            details["fields"] = [{"path": path, "message": problem} for path, problem in fields]
        super().__init__(message, **details)


class RunNotFound(GatewayError):
    code = RUN_NOT_FOUND


class RunClosed(GatewayError):
    code = RUN_CLOSED


class BreakerOpen(GatewayError):
    code = BREAKER_OPEN


class NotFound(GatewayError):
    code = NOT_FOUND


class BackendUnavailable(GatewayError):
    code = BACKEND_UNAVAILABLE


class QueryTooCostly(GatewayError):
    """Refused before execution: the operation's estimated cost (`cost`) is over `limit`."""

    code = QUERY_TOO_COSTLY


class RateLimited(GatewayError):
    """Refused before execution: the principal is over its rate or has too many requests in flight."""

    code = RATE_LIMITED


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def invalid_from_pydantic(exc: ValidationError, prefix: str = "") -> Invalid:
    """Name each failing field by its GraphQL (camelCase) path, never echoing the input back."""
    fields: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False):
        path = ".".join(camel(str(part)) for part in error["loc"]) or "input"
        fields.append((f"{prefix}{path}" if prefix else path, error["msg"]))
    summary = "; ".join(f"{path}: {problem}" for path, problem in fields)
    return Invalid(f"invalid input: {summary}", fields)


UNAVAILABLE_MESSAGE = (
    "a database or broker the gateway needs is unavailable for a moment: retry shortly (a write with "
    "the same idempotencyKey, so that it is never written twice)"
)


def code_errors(errors: list[GraphQLError], log: Any = None) -> None:
    """Give every error a stable code and mask anything unexpected, in place.

    Parse, validation and coercion errors (no path) are the caller's: VALIDATION. A GatewayError
    keeps its message and code. Anything else is a bug on our side: the client sees a generic
    message and INTERNAL, and the detail goes to the log only. In place, because Strawberry hands
    the same error objects on to the response.
    """
    for error in errors:
        original = error.original_error
        if isinstance(original, GatewayError):
            error.extensions = original.extensions
        elif isinstance(original, ValidationError):
            coded = invalid_from_pydantic(original)
            error.message = coded.message
            error.extensions = coded.extensions
        elif original is None or error.path is None:
            extensions = dict(error.extensions or {})
            extensions.setdefault("code", VALIDATION)
            error.extensions = extensions
        elif classify_failure(original) == "retryable":
            # Its database (or broker) is unavailable for a moment: not a bug, and worth a retry.
            if log is not None:
                log.warning("%s failed on unavailable infrastructure: %s", error.path, original)
            unavailable = BackendUnavailable(UNAVAILABLE_MESSAGE, backend="gateway", retryAfterS=1.0)
            error.message = unavailable.message
            error.extensions = unavailable.extensions
        else:
            if log is not None:
                log.error("unexpected error in %s", error.path, exc_info=original)
            error.message = "internal error: the request was not applied; retry, and report it if it persists"
            error.extensions = {"code": INTERNAL}


AGENT_BUDGET_EXCEEDED = "AGENT_BUDGET_EXCEEDED"
CODES = (*CODES, AGENT_BUDGET_EXCEEDED)


class AgentBudgetExceeded(GatewayError):
    """An agent over one of its budgets across runs: `budget` (which one), `limit`, `count`, `retryAfterS`."""

    code = AGENT_BUDGET_EXCEEDED
