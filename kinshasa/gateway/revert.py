"""The revert doorbell, the only way a revert starts: stop the run, discard its unpublished, undo the rest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from kinshasa.gateway import store
from kinshasa.gateway.errors import Invalid, RunNotFound
from kinshasa.gateway.quarantine import UNPUBLISHED, discard
from kinshasa.gateway.runs import RunFilter, RunRecord, filter_clause, load_run, run_envelope
from kinshasa.gateway.store import runs
from kinshasa.gateway.uow import Tx
from kinshasa.schemas.envelope import Actor, RunEventKind, utcnow
from kinshasa.topics.catalogue import RUNS

REASON_MAX = 2_000
MAX_SELECTED = 10_000


@dataclass(frozen=True)
class Selector:
    run_ids: tuple[str, ...] | None = None
    agent_id: str | None = None
    entry_point: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None

    def is_empty(self) -> bool:
        return (
            not self.run_ids
            and self.agent_id is None
            and self.entry_point is None
            and self.started_after is None
            and self.started_before is None
        )


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > REASON_MAX:
        raise Invalid(
            f"reason must be 1-{REASON_MAX} characters saying why the runs are reverted",
            [("reason", "required")],
        )
    return reason


async def select_runs(tx: Tx, selector: Selector) -> list[str]:
    """Validate the selector and return the run ids it names, oldest first; nothing is changed yet."""
    if selector.is_empty():
        raise Invalid(
            "the selector is empty: name runIds, an agentId, an entryPoint or a time range "
            "(an empty selector would revert every run)",
            [("selector", "empty")],
        )
    if (
        selector.started_after
        and selector.started_before
        and selector.started_after >= selector.started_before
    ):
        raise Invalid(
            "startedAfter must be before startedBefore", [("selector.startedAfter", "after the end")]
        )
    if selector.run_ids is not None and len(selector.run_ids) > MAX_SELECTED:
        raise Invalid(f"at most {MAX_SELECTED} runIds per request", [("selector.runIds", "too many")])
    clause = filter_clause(
        RunFilter(
            agent_id=selector.agent_id,
            entry_point=selector.entry_point,
            started_after=selector.started_after,
            started_before=selector.started_before,
            run_ids=tuple(selector.run_ids) if selector.run_ids else None,
        )
    )
    found = [
        r[0]
        for r in await tx.conn.execute(
            select(runs.c.run_id)
            .where(*clause)
            .order_by(runs.c.started_at, runs.c.run_id)
            .limit(MAX_SELECTED + 1)
        )
    ]
    if selector.run_ids:
        missing = sorted(set(selector.run_ids) - set(found))
        # Only a complete request is acted on: a typo must not silently revert a subset.
        if missing and not (
            selector.agent_id or selector.entry_point or selector.started_after or selector.started_before
        ):
            raise RunNotFound(
                f"runs not found: {', '.join(m[:64] for m in missing[:20])}; nothing was reverted",
                runIds=missing[:100],
            )
    if len(found) > MAX_SELECTED:
        raise Invalid(
            f"the selector matches more than {MAX_SELECTED} runs: narrow it (e.g. a time range)",
            [("selector", "too broad")],
        )
    return found


async def request_revert(tx: Tx, run_id: str, reason: str, actor: Actor) -> tuple[RunRecord, bool]:
    """The doorbell: the one way a revert starts, for `revertRun`, `revertRuns` and a trip with auto-revert.

    In the caller's transaction, with the run's row locked, all at once: the breaker opens (OPEN, no
    probes), the run's HELD and AWAITING_APPROVAL commands are discarded (nothing downstream ever saw
    them; `counts.discarded` shows them) and `run.revert_requested` goes to kinshasa.runs with the run's
    final published count, the fact the coordinator starts `revert:<run_id>` on. From that commit on the
    run is REVERTING: no write, release, hold or approval is accepted for it, whichever door it used.

    Returns (run, rung). A run already REVERTING or REVERTED is left alone (the revert under way covers
    it); a REVERT_FAILED one is rung again, which is how a failed revert is retried.
    """
    run = await load_run(tx.conn, run_id, lock=True)
    if run.status in (store.REVERTING, store.REVERTED):
        return run, False
    discarded = await discard(tx, run_id, UNPUBLISHED, f"run reverted: {reason}", actor.id)
    now = utcnow()
    await tx.conn.execute(
        update(runs)
        .where(runs.c.run_id == run_id)
        .values(
            status=store.REVERTING,
            breaker_state=store.OPEN,
            probes_left=0,
            tripped_reason=run.tripped_reason or "revert requested",
            revert_reason=reason,
            revert_requested_at=now,
            revert_requested_by=actor.id,
            on_hold=False,
        )
    )
    if discarded:
        await tx.emit(RUNS, run_envelope(run_id, RunEventKind.DISCARDED, actor, {"count": discarded}))
    # The count is final: the breaker is open and nothing unpublished remains, so no later forward command.
    await tx.emit(
        RUNS,
        run_envelope(
            run_id,
            RunEventKind.REVERT_REQUESTED,
            actor,
            {"reason": reason, "requested_by": actor.id, "published_count": run.published},
        ),
    )
    return await load_run(tx.conn, run_id), True
