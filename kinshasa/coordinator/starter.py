"""Starting reverts on Temporal: signal-with-start of `revert:<run_id>`, so a repeated request joins."""

from __future__ import annotations

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from kinshasa.coordinator.models import (
    RevertOutcome,
    RevertPolicy,
    RevertRequest,
    RevertRunInput,
)
from kinshasa.coordinator.workflows import REQUEST_SIGNAL, RevertRun, revert_workflow_id


async def start_revert(client: Client, task_queue: str, request: RevertRequest,
                       policy: RevertPolicy | None = None) -> WorkflowHandle[RevertRun, RevertOutcome]:
    """Start `RevertRun` for the run, or join the one running.

    Signal-with-start: a running revert gets the request as a signal (it re-checks the ledger before it
    finishes); a finished one (REVERTED or REVERT_FAILED) is followed by a fresh run under the same id
    (reuse policy ALLOW_DUPLICATE), which is what keeps a failed revert retryable and makes reverting a
    reverted run a no-op pass over already-settled steps.
    """
    return await client.start_workflow(
        RevertRun.run,
        RevertRunInput(request=request, policy=policy or RevertPolicy()),
        id=revert_workflow_id(request.run_id),
        task_queue=task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        start_signal=REQUEST_SIGNAL,
        start_signal_args=[request],
    )
