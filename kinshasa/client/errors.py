"""The SDK's error family: one exception class per gateway error code, built from a GraphQL error.

The gateway puts a stable `extensions.code` on every error (kinshasa/gateway/errors.py); the SDK turns
it into the matching class so a caller can `except BreakerOpen` instead of comparing strings, and keeps
the extensions the code carries as attributes (`BreakerOpen.breaker`, `RateLimited.retry_after`,
`Validation.fields`). A code this SDK does not know still raises, as the base KinshasaError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from kinshasa.client.acknowledgements import Receipt


class KinshasaError(Exception):
    """A refusal or failure with the gateway's code, its message and its extensions, untouched."""

    code: ClassVar[str] = ""

    def __init__(
        self,
        code: str,
        message: str,
        extensions: Mapping[str, Any] | None = None,
        *,
        errors: Sequence[Mapping[str, Any]] = (),
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code  # type: ignore[misc]  # the instance's code: the class's, or an unknown one
        self.message = message
        self.extensions: dict[str, Any] = dict(extensions or {})
        # Every error of the response (the first one chose the class) and any partial data it carried.
        self.errors: list[dict[str, Any]] = [dict(e) for e in errors]
        self.data = dict(data) if data is not None else None
        # How many times the SDK sent the request before this answer (retries are in retries.py).
        self.attempts = 1


class Unauthenticated(KinshasaError):
    """The key is missing, unknown or revoked: send a valid `Authorization: Bearer <key>`."""

    code = "UNAUTHENTICATED"


class Forbidden(KinshasaError):
    """The key is valid but may not do this (another agent's run, an operator action, no scope)."""

    code = "FORBIDDEN"


@dataclass(frozen=True)
class FieldError:
    """One field the gateway (or the SDK, before sending) refused: its path and what is wrong."""

    path: str
    message: str


class Validation(KinshasaError):
    """Bad input; `fields` names each failing field so it can be fixed one by one."""

    code = "VALIDATION"

    @property
    def fields(self) -> list[FieldError]:
        found = self.extensions.get("fields")
        if not isinstance(found, list):
            return []
        return [
            FieldError(str(f.get("path", "")), str(f.get("message", "")))
            for f in found
            if isinstance(f, Mapping)
        ]


class RunNotFound(KinshasaError):
    code = "RUN_NOT_FOUND"


class RunClosed(KinshasaError):
    """The run accepts no more writes (finished, tripped, reverting): start a new run."""

    code = "RUN_CLOSED"


class BreakerOpen(KinshasaError):
    """The run's circuit breaker refused the write: stop writing in this run; an operator was alerted."""

    code = "BREAKER_OPEN"

    @property
    def breaker(self) -> dict[str, Any]:
        """The breaker as the gateway saw it: state, writes, errors, servicesTouched, trippedReason, ..."""
        snapshot = self.extensions.get("breaker")
        return dict(snapshot) if isinstance(snapshot, Mapping) else {}


class NotFound(KinshasaError):
    code = "NOT_FOUND"


class BackendUnavailable(KinshasaError):
    """A component behind the gateway did not answer; `backend` names it when the gateway knows."""

    code = "BACKEND_UNAVAILABLE"

    @property
    def backend(self) -> str | None:
        value = self.extensions.get("backend")
        return str(value) if value is not None else None


class QueryTooCostly(KinshasaError):
    """Refused before execution: the document's estimated `cost` is over `limit`; ask for less."""

    code = "QUERY_TOO_COSTLY"

    @property
    def cost(self) -> float | None:
        return _number(self.extensions.get("cost"))

    @property
    def limit(self) -> float | None:
        return _number(self.extensions.get("limit"))


class _RetryAfter(KinshasaError):
    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before trying again, as the gateway advised (`retryAfterS`); None if it did not."""
        return _number(self.extensions.get("retryAfterS"))


class RateLimited(_RetryAfter):
    """Over the principal's request rate or in-flight cap; nothing ran. Retry after `retry_after` s."""

    code = "RATE_LIMITED"

    @property
    def reason(self) -> str | None:
        value = self.extensions.get("reason")
        return str(value) if value is not None else None


class AgentBudgetExceeded(_RetryAfter):
    """The agent is over a budget across its runs (`budget`, `limit`, `count`); nothing was created."""

    code = "AGENT_BUDGET_EXCEEDED"

    @property
    def budget(self) -> str | None:
        value = self.extensions.get("budget")
        return str(value) if value is not None else None

    @property
    def limit(self) -> float | None:
        return _number(self.extensions.get("limit"))

    @property
    def count(self) -> float | None:
        return _number(self.extensions.get("count"))


class Internal(KinshasaError):
    """A bug on the gateway's side; the request was not applied. Retry, and report it if it persists."""

    code = "INTERNAL"


# --- failures of the SDK's own making: not gateway codes, but one family for callers ---------------------


class Unreachable(KinshasaError):
    """The gateway could not be reached (or answered 502/503/504) after every retry the SDK allows.

    For a write, `idempotency_key` is the key every attempt carried: a later retry with the same key
    (`client.call(..., idempotency_key=...)`) cannot write twice, whether or not an attempt went through.
    """

    code = "UNREACHABLE"

    @property
    def idempotency_key(self) -> str | None:
        value = self.extensions.get("idempotencyKey")
        return str(value) if value is not None else None


class BadResponse(KinshasaError):
    """The gateway answered something that is not a GraphQL response (a proxy's error page, ...)."""

    code = "BAD_RESPONSE"


class UnknownOperation(KinshasaError):
    """No operation in the gateway's catalogue has that name (command type, mutation or snake_case)."""

    code = "UNKNOWN_OPERATION"


class _ReceiptOutcome(KinshasaError):
    def __init__(self, message: str, receipt: Receipt) -> None:
        super().__init__(self.code, message, {"commandId": receipt.command_id, "status": receipt.status})
        self.receipt = receipt


class Rejected(_ReceiptOutcome):
    """The service refused the write on its own state (`receipt.rejected_reason` says why)."""

    code = "REJECTED"


class Discarded(_ReceiptOutcome):
    """The write was never published: discarded (an operator's discardRun or denyEgress, or a revert)."""

    code = "DISCARDED"


class Compensated(_ReceiptOutcome):
    """The write was applied, then undone by a revert: its effect no longer stands."""

    code = "COMPENSATED"


ERRORS: dict[str, type[KinshasaError]] = {
    cls.code: cls
    for cls in (
        Unauthenticated,
        Forbidden,
        Validation,
        RunNotFound,
        RunClosed,
        BreakerOpen,
        NotFound,
        BackendUnavailable,
        QueryTooCostly,
        RateLimited,
        Internal,
        AgentBudgetExceeded,
    )
}


def error_from(
    errors: Sequence[Mapping[str, Any]], data: Mapping[str, Any] | None = None
) -> KinshasaError:
    """The exception for a response's `errors`: the first error's code picks the class."""
    first = errors[0] if errors else {}
    extensions = first.get("extensions")
    extensions = dict(extensions) if isinstance(extensions, Mapping) else {}
    code = extensions.get("code")
    code = code if isinstance(code, str) and code else "UNKNOWN"
    message = str(first.get("message") or "the gateway refused the request without a message")
    cls = ERRORS.get(code, KinshasaError)
    return cls(code, message, extensions, errors=errors, data=data)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
