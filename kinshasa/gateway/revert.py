"""The revert doorbell, the only way a revert starts: stop the run, discard its unpublished, undo the rest."""

from __future__ import annotations

from sqlalchemy import select, update

from kinshasa.gateway import store
from kinshasa.gateway.errors import Invalid, RunNotFound
from kinshasa.gateway.quarantine import UNPUBLISHED, discard
from kinshasa.gateway.runs import RunFilter, RunRecord, filter_clause, load_run, run_envelope
from kinshasa.gateway.store import runs
from kinshasa.gateway.uow import Tx
from kinshasa.schemas.envelope import Actor, RunEventKind, utcnow
from kinshasa.schemas.run_selection import MAX_SELECTED, RunSelection, SelectionError
from kinshasa.schemas.run_status import REVERT_COVERED
from kinshasa.topics.catalogue import RUNS

REASON_MAX = 2_000
# The GraphQL resolvers build the selection under this name; the rule itself lives in kinshasa.schemas.
Selector = RunSelection


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > REASON_MAX:
        raise Invalid(
            f"reason must be 1-{REASON_MAX} characters saying why the runs are reverted",
            [("reason", "required")],
        )
    return reason


async def select_runs(tx: Tx, selector: RunSelection) -> list[str]:
    """Validate the selection and return the run ids it names, oldest first; nothing is changed yet."""
    try:
        selection = selector.checked()
    except SelectionError as exc:
        raise Invalid(str(exc), [(exc.field, exc.reason)]) from exc
    clause = filter_clause(
        RunFilter(
            agent_id=selection.agent_id,
            entry_point=selection.entry_point,
            started_after=selection.started_after,
            started_before=selection.started_before,
            run_ids=tuple(selection.run_ids) if selection.run_ids else None,
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
    missing = sorted(set(selection.run_ids or ()) - set(found))
    if missing and selection.names_runs_only():
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


async def revert_selection(
    tx: Tx, selection: RunSelection, reason: str, actor: Actor
) -> tuple[list[RunRecord], list[RunRecord]]:
    """The front door of every operator revert: ring the doorbell for each run the selection names.

    Returns (requested, unchanged): the runs rung now, and those a revert already covers.
    """
    requested: list[RunRecord] = []
    unchanged: list[RunRecord] = []
    for run_id in await select_runs(tx, selection):
        run, rung = await request_revert(tx, run_id, reason, actor)
        (requested if rung else unchanged).append(run)
    return requested, unchanged


async def revert_one(tx: Tx, run_id: str, reason: str, actor: Actor) -> tuple[RunRecord, bool]:
    """`revertRun`: the same door as `revertRuns`, with a selection of that one run id.

    Returns (run, rung) as `request_revert` does.
    """
    requested, unchanged = await revert_selection(tx, RunSelection(run_ids=(run_id,)), reason, actor)
    return (requested[0], True) if requested else (unchanged[0], False)


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
    if run.status in REVERT_COVERED:
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
