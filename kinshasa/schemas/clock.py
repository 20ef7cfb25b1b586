"""The one clock helper: what "now" is, and how any timestamp is read as UTC, for every layer above."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    """Now, timezone-aware in UTC (the only clock reading an envelope accepts)."""
    return datetime.now(UTC)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp in UTC: a naive one is taken as already UTC (SQLite and bare command-line times hand
    them back naive), an aware one is converted."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
