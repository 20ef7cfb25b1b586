"""Checks on the arguments the GraphQL resolvers take: lengths, page sizes, cursors, reasons, numbers.

Each raises `Invalid` naming the argument (camelCase, as the caller wrote it) and what to send instead,
so a resolver checks its arguments with one call each and never with an inline rule of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.revert import REASON_MAX

INT32 = 2**31 - 1
SAFE_INT = 2**53 - 1
PAGE_MAX = 200
ID_MAX = 256
# Enough for any batch an operator reads off one dlq page, small enough to be one request's work.
REPROCESS_MAX = 1000
POLICY_REASON_MAX = 2000


def check_length(value: str | None, name: str, limit: int = ID_MAX) -> None:
    """An id, name or cursor no longer than `limit` characters (absent is fine)."""
    if value is not None and len(value) > limit:
        raise Invalid(f"{name} is longer than {limit} characters", [(name, "too long")])


def check_page(first: int) -> int:
    """`first` of a list or connection: 1 to PAGE_MAX items."""
    if first < 1 or first > PAGE_MAX:
        raise Invalid(f"first must be between 1 and {PAGE_MAX}", [("first", "out of range")])
    return first


def step_cursor(after: str | None) -> int | None:
    """`after` of Run.steps: the cursor of a step (its step id), as pageInfo.endCursor gave it."""
    if after is None:
        return None
    if not after.isdigit() or len(after) > 15 or int(after) < 1:
        raise Invalid(
            "after must be a cursor from a previous page's steps.pageInfo.endCursor",
            [("after", "not a step cursor")],
        )
    return int(after)


def optional_reason(reason: str | None) -> str | None:
    """An operator's optional reason for releaseRun, discardRun or holdRun: recorded when given."""
    if reason is None or not reason.strip():
        return None
    if len(reason.strip()) > REASON_MAX:
        raise Invalid(f"reason must be at most {REASON_MAX} characters", [("reason", "too long")])
    return reason.strip()


def policy_reason(reason: str) -> str:
    """setPolicy's reason: required, because every policy version says why it was appended."""
    reason = reason.strip()
    if not reason or len(reason) > POLICY_REASON_MAX:
        raise Invalid(
            f"reason must be 1-{POLICY_REASON_MAX} characters saying why the policy changes",
            [("reason", "required")],
        )
    return reason


def check_message_ids(message_ids: Sequence[str]) -> None:
    """reprocessDlq's messageIds: 1 to REPROCESS_MAX ids, each of an id's length."""
    if not message_ids or len(message_ids) > REPROCESS_MAX or any(len(m) > ID_MAX for m in message_ids):
        raise Invalid(
            f"messageIds must list 1-{REPROCESS_MAX} ids from the dlq query", [("messageIds", "bad length")]
        )


def as_utc(moment: datetime) -> datetime:
    """A moment the caller sent without a zone is read as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_long(value: Any) -> int:
    """The Long scalar's input: an integer every client can represent exactly (±(2^53 - 1))."""
    # bool is an int in Python; a JSON true is never an amount.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Long must be an integer, got {type(value).__name__}")
    if abs(value) > SAFE_INT:
        raise ValueError("Long must be within ±(2^53 - 1) so every client can represent it exactly")
    return value
