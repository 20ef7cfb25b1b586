"""The coordinator's domain figures read from a real ledger (SQLite and PostgreSQL): reverts by status and
compensations by outcome, each row counted where it stands."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import insert

from kinshasa.coordinator.revert_metrics import CoordinatorMetrics, read_figures
from kinshasa.coordinator.store import StepStatus, install_ledger, runs, steps
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.schemas.run_status import RunStatus

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _run(run_id: str, status: RunStatus, revert_requested: bool) -> dict[str, object]:
    return {"run_id": run_id, "status": status.value, "first_seen_at": NOW, "last_event_at": NOW,
            "revert_requested_at": NOW if revert_requested else None}


def _step(run_id: str, step_id: int, status: StepStatus, emitted: bool) -> dict[str, object]:
    return {"run_id": run_id, "step_id": step_id, "forward_event_id": str(uuid.uuid4()),
            "forward_type": "documents.created", "service": "documents", "entity_type": "document",
            "entity_id": f"doc-{step_id}", "entity_key": f"documents/document/doc-{step_id}",
            "actor_kind": "agent", "actor_id": "agent-a", "applied_at": NOW, "status": status.value,
            "emitted_at": NOW if emitted else None}


async def test_reverts_and_compensations_are_counted_where_they_stand(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await install_ledger(engine)
        empty = await read_figures(engine)
        assert set(empty.reverts.values()) == {0} and set(empty.compensations.values()) == {0}
        async with engine.begin() as conn:
            await conn.execute(insert(runs), [
                _run("r-running", RunStatus.RUNNING, False),
                _run("r-reverting", RunStatus.REVERTING, True),
                _run("r-reverted", RunStatus.REVERTED, True),
                _run("r-failed", RunStatus.REVERT_FAILED, True),
                _run("r-tripped", RunStatus.TRIPPED, False),
            ])
            await conn.execute(insert(steps), [
                _step("r-reverting", 1, StepStatus.APPLIED, False),
                _step("r-reverting", 2, StepStatus.COMPENSATING, True),
                _step("r-reverted", 1, StepStatus.COMPENSATED, True),
                _step("r-reverted", 2, StepStatus.COMPENSATED, True),
                _step("r-failed", 1, StepStatus.COMPENSATION_FAILED, True),
                _step("r-failed", 2, StepStatus.IRREVERSIBLE, False),
            ])
        figures = await read_figures(engine)
        assert figures.reverts == {"requested": 3, "reverting": 1, "reverted": 1, "failed": 1}
        assert figures.compensations == {"sent": 4, "pending": 1, "acked": 2, "failed": 1}

        metrics = ComponentMetrics("coordinator")
        domain = CoordinatorMetrics(metrics)
        domain.read_from(engine)
        text = (await metrics.render()).decode("utf-8")
        assert 'kinshasa_reverts{component="coordinator",status="requested"} 3.0' in text
        assert 'kinshasa_compensations{component="coordinator",outcome="acked"} 2.0' in text
    finally:
        await engine.dispose()
