"""The coordinator's receipt chain: where each of its emissions came from, and the check that it still exists.

Every message the coordinator puts in its outbox (a compensate command, a run outcome, an alert) gets a
receipt in the `coordinator` chain in the same transaction (`kinshasa.kernel.receipts`). A compensate
command's source is the ledger step it undoes and the attempt: `("compensate", run_id,
forward_event_id, attempt)`; anything else is `(topic, run_id, message_id)`. `ledger_sources` checks,
for `kinshasa receipts verify` and the admin endpoint, that the step or run a receipt names is still in
the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.coordinator.run_ledger import ClaimedStep
from kinshasa.coordinator.store import runs, steps
from kinshasa.kernel.receipts import Receipt, ReceiptChain, Source

COMPONENT = "coordinator"
RECEIPTS = ReceiptChain(COMPONENT)
COMPENSATE = "compensate"
_LOOKUP_CHUNK = 500


def compensate_source(run_id: str, step: ClaimedStep) -> Source:
    return (COMPENSATE, run_id, step.forward_event_id, step.attempt)


def emission_source(topic: str, run_id: str, message_id: object) -> Source:
    return (topic, run_id, str(message_id))


async def ledger_sources(conn: AsyncConnection, receipts: Sequence[Receipt]) -> list[str]:
    """One problem per receipt whose step (compensations) or run (everything else) the ledger lacks."""
    wanted_steps = {(str(r.source[1]), str(r.source[2])) for r in receipts
                    if len(r.source) == 4 and r.source[0] == COMPENSATE}
    wanted_runs = {str(r.source[1]) for r in receipts if len(r.source) >= 2}
    found_steps: set[tuple[str, str]] = set()
    found_runs: set[str] = set()
    forward_ids = sorted({forward for _, forward in wanted_steps})
    for start in range(0, len(forward_ids), _LOOKUP_CHUNK):
        rows = await conn.execute(select(steps.c.run_id, steps.c.forward_event_id).where(
            steps.c.forward_event_id.in_(forward_ids[start:start + _LOOKUP_CHUNK])))
        found_steps.update((row.run_id, row.forward_event_id) for row in rows)
    run_ids = sorted(wanted_runs)
    for start in range(0, len(run_ids), _LOOKUP_CHUNK):
        rows = await conn.execute(select(runs.c.run_id).where(
            runs.c.run_id.in_(run_ids[start:start + _LOOKUP_CHUNK])))
        found_runs.update(row.run_id for row in rows)
    problems = []
    for receipt in receipts:
        source = receipt.source
        if len(source) == 4 and source[0] == COMPENSATE:
            if (str(source[1]), str(source[2])) not in found_steps:
                problems.append(f"missing source: receipt seq {receipt.seq} records a compensation of "
                                f"forward event {source[2]} of run {source[1]}, which the ledger does "
                                "not hold")
        elif len(source) == 3:
            if str(source[1]) not in found_runs:
                problems.append(f"missing source: receipt seq {receipt.seq} records a {source[0]} "
                                f"message of run {source[1]}, which the ledger does not hold")
        else:
            problems.append(f"missing source: receipt seq {receipt.seq} names no ledger step or run "
                            f"({list(source)}): it was not written by the coordinator")
    return problems
