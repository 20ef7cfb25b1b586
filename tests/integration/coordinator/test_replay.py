"""The revert workflows replay their recorded histories: a change that breaks determinism fails here.

The histories under `histories/` were recorded from real reverts (normal, straggler retry, failure) by
running the suite with KINSHASA_RECORD_HISTORIES=1; re-record them only for an intended change, and
give the workflow a patch (`workflow.patched`) when runs already in flight must survive it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from kinshasa.coordinator.worker import WORKFLOWS

HISTORIES = Path(__file__).resolve().parent / "histories"
EXPECTED = ("revert_normal", "revert_straggler_retry", "revert_failed")


def test_every_expected_history_is_recorded() -> None:
    assert sorted(p.stem for p in HISTORIES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
async def test_history_replays_deterministically(name: str) -> None:
    path = HISTORIES / f"{name}.json"
    history = WorkflowHistory.from_json(f"revert:{name}", path.read_text())
    replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
