"""Receipts: what a write answers at once, and how to wait until the service applied it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kinshasa.client.errors import Compensated, Discarded, Rejected

if TYPE_CHECKING:
    from kinshasa.client.client import Kinshasa

HELD = "HELD"
PUBLISHED = "PUBLISHED"
AWAITING_APPROVAL = "AWAITING_APPROVAL"
DISCARDED = "DISCARDED"
APPLIED = "APPLIED"
REJECTED = "REJECTED"
COMPENSATED = "COMPENSATED"

# Statuses after which nothing more happens to a command but a revert (APPLIED -> COMPENSATED).
SETTLED = frozenset({APPLIED, REJECTED, DISCARDED, COMPENSATED})

POLL_FIRST_S = 0.1
POLL_MAX_S = 1.0


def _stamp(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


@dataclass(frozen=True)
class Receipt:
    """A command as the gateway knows it: HELD, AWAITING_APPROVAL, PUBLISHED, then APPLIED or REJECTED
    (APPLIED may later become COMPENSATED); a command never published ends DISCARDED."""

    command_id: str
    run_id: str
    operation: str
    mutation: str
    entity_id: str
    status: str
    accepted_at: datetime | None = None
    release_at: datetime | None = None
    applied_at: datetime | None = None
    rejected_reason: str | None = None
    compensated_at: datetime | None = None
    reason: str | None = None
    result: str | None = None
    client: Kinshasa | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_graphql(cls, data: Mapping[str, Any], client: Kinshasa | None = None) -> Receipt:
        return cls(
            command_id=str(data["commandId"]),
            run_id=str(data["runId"]),
            operation=str(data["operation"]),
            mutation=str(data["mutation"]),
            entity_id=str(data["entityId"]),
            status=str(data["status"]),
            accepted_at=_stamp(data.get("acceptedAt")),
            release_at=_stamp(data.get("releaseAt")),
            applied_at=_stamp(data.get("appliedAt")),
            rejected_reason=data.get("rejectedReason"),
            compensated_at=_stamp(data.get("compensatedAt")),
            reason=data.get("reason"),
            result=data.get("result"),
            client=client,
        )

    @property
    def settled(self) -> bool:
        return self.status in SETTLED

    async def refresh(self) -> Receipt:
        """The command as the gateway knows it now."""
        if self.client is None:
            raise RuntimeError("this receipt has no client to ask with: use client.command(command_id)")
        return await self.client.command(self.command_id)

    # `timeout` is the SDK's contract (receipt.applied(timeout=...)), simpler for agents than a scope.
    async def applied(self, timeout: float = 30.0) -> Receipt:  # noqa: ASYNC109
        """Wait until the service applied the write; the receipt then (status APPLIED, applied_at set).

        A read after this returns sees the write. Raises Rejected when the service refused it (with
        `receipt.rejected_reason`), Discarded when it was never published, Compensated when it was
        applied and already undone by a revert, and TimeoutError after `timeout` seconds (a held write
        waits out its quarantine window first: allow for it).
        """
        current = self
        delay = POLL_FIRST_S
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if current.status == APPLIED:
                return current
            outcome = current._outcome_error()
            if outcome is not None:
                raise outcome
            left = deadline - loop.time()
            if left <= 0:
                held = f"; it is held until {current.release_at.isoformat()}" if current.release_at else ""
                raise TimeoutError(
                    f"command {self.command_id} ({self.mutation}) is still {current.status} after "
                    f"{timeout:g} s{held}"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, POLL_MAX_S)
            current = await self.refresh()

    def _outcome_error(self) -> Exception | None:
        what = f"command {self.command_id} ({self.mutation} on {self.entity_id})"
        if self.status == REJECTED:
            why = self.rejected_reason or self.reason
            return Rejected(f"{what} was refused by the service: {why}", self)
        if self.status == DISCARDED:
            why = self.reason or "no reason given"
            return Discarded(f"{what} was discarded, never published: {why}", self)
        if self.status == COMPENSATED:
            return Compensated(f"{what} was applied, then compensated by a revert of run {self.run_id}", self)
        return None

    def without_client(self) -> Receipt:
        return replace(self, client=None)
