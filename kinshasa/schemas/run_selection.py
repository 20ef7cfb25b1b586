"""Which runs a revert names: the one selection rule, checked alike by the operator CLI before it asks and
by the gateway before it acts, so `revertRun`, `revertRuns` and `kinshasa revert` select the same runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from kinshasa.schemas.clock import as_utc

# The most runs one request may revert; a broader selector is refused, never cut short.
MAX_SELECTED = 10_000


class SelectionError(ValueError):
    """A selection that names no runs, or names them wrongly; `field` and `reason` say where and why."""

    def __init__(self, message: str, field: str, reason: str) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class RunSelection:
    """Runs by id, by agent, by entry point and by start time; every criterion given must hold."""

    run_ids: tuple[str, ...] | None = None
    agent_id: str | None = None
    entry_point: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None

    def is_empty(self) -> bool:
        return not self.run_ids and not self._has_criteria()

    def names_runs_only(self) -> bool:
        """Only run ids: then every one of them must exist, or nothing is reverted (a typo must not
        silently revert a subset). With another criterion the ids narrow a search instead."""
        return bool(self.run_ids) and not self._has_criteria()

    def _has_criteria(self) -> bool:
        return bool(self.agent_id or self.entry_point or self.started_after or self.started_before)

    def checked(self) -> RunSelection:
        """This selection with its times in UTC, or a SelectionError that says what to change."""
        if self.is_empty():
            raise SelectionError(
                "the selector is empty: name runIds, an agentId, an entryPoint or a time range "
                "(an empty selector would revert every run)", "selector", "empty")
        after, before = as_utc(self.started_after), as_utc(self.started_before)
        if after and before and after >= before:
            raise SelectionError("startedAfter must be before startedBefore", "selector.startedAfter",
                                 "after the end")
        if self.run_ids is not None and len(self.run_ids) > MAX_SELECTED:
            raise SelectionError(f"at most {MAX_SELECTED} runIds per request", "selector.runIds", "too many")
        return replace(self, started_after=after, started_before=before)

    def to_graphql(self) -> dict[str, Any]:
        """The GraphQL `RunSelector` input naming the same runs."""
        out: dict[str, Any] = {}
        if self.run_ids:
            out["runIds"] = list(self.run_ids)
        if self.agent_id:
            out["agentId"] = self.agent_id
        if self.entry_point:
            out["entryPoint"] = self.entry_point
        if self.started_after:
            out["startedAfter"] = self.started_after.isoformat()
        if self.started_before:
            out["startedBefore"] = self.started_before.isoformat()
        return out

    @classmethod
    def from_graphql(cls, selector: Mapping[str, Any]) -> RunSelection:
        """The selection a `RunSelector` input (as JSON variables) names."""

        def when(key: str) -> datetime | None:
            value = selector.get(key)
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None

        run_ids = selector.get("runIds")
        return cls(run_ids=tuple(str(r) for r in run_ids) if run_ids else None,
                   agent_id=selector.get("agentId"), entry_point=selector.get("entryPoint"),
                   started_after=when("startedAfter"), started_before=when("startedBefore"))
