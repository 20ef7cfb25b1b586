"""The run-status vocabulary, defined once: the gateway's runs, the coordinator's ledger and the operator
CLI all speak these words, and they are the public `Run.status` values."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """A run's state. RUNNING until the agent finishes it (FINISHED) or the breaker trips (TRIPPED); a
    revert makes it REVERTING until every step settled (REVERTED) or some could not be undone
    (REVERT_FAILED, which a new revert request retries)."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    TRIPPED = "TRIPPED"
    REVERTING = "REVERTING"
    REVERTED = "REVERTED"
    REVERT_FAILED = "REVERT_FAILED"


# A revert has nothing more to do once its run is in one of these.
REVERT_SETTLED = (RunStatus.REVERTED, RunStatus.REVERT_FAILED)
# A revert request leaves these alone: the revert under way (or done) already covers the run.
REVERT_COVERED = (RunStatus.REVERTING, RunStatus.REVERTED)
