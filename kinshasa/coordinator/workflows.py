"""The revert workflow: `RevertRun`, one run, id `revert:<run_id>`, started only on `run.revert_requested`.

Deterministic orchestration only: every read, emission and wait is an activity, and per-step work is
batched inside activities, so the history of a 10,000-step revert is a few dozen events. A later revert
request for the same run arrives as a `request` signal (signal-with-start joins the running workflow);
it makes the workflow check the ledger once more before it records its outcome.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from kinshasa.coordinator.activities import RevertActivities
    from kinshasa.coordinator.models import (
        FinishInput,
        ForwardStatus,
        ForwardWaitInput,
        PassInput,
        Phase,
        RevertOutcome,
        RevertProgress,
        RevertRequest,
        RevertRunInput,
    )

REVERT_RUN = "RevertRun"
REQUEST_SIGNAL = "request"

# Contract or data errors no retry can fix: fail the activity at once instead of retrying forever.
_NON_RETRYABLE = ["ValidationError", "InvalidMessage", "CursorError"]
_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                     maximum_interval=timedelta(seconds=30), non_retryable_error_types=_NON_RETRYABLE)
# A pass over a deep entity can take long; liveness is the heartbeat's job, not this timeout's.
_PASS_TIMEOUT = timedelta(hours=6)
_SHORT = timedelta(minutes=2)


def revert_workflow_id(run_id: str) -> str:
    """`revert:<run_id>`: one revert per run at a time; a repeated request joins it."""
    return f"revert:{run_id}"


@workflow.defn(name=REVERT_RUN)
class RevertRun:
    """Revert one run: wait for its results, compensate newest first per entity, record the outcome."""

    def __init__(self) -> None:
        self._requests: list[RevertRequest] = []
        self._pending = False
        self._progress: RevertProgress | None = None

    @workflow.signal(name=REQUEST_SIGNAL)
    def request(self, request: RevertRequest) -> None:
        """Another revert request for this run: joined, and its count raises the wait target."""
        self._requests.append(request)
        self._pending = True

    @workflow.query(name="progress")
    def progress(self) -> RevertProgress | None:
        return self._progress

    def _target(self, first: RevertRequest) -> int | None:
        counts = [r.published_count for r in (first, *self._requests) if r.published_count is not None]
        return max(counts) if counts else None

    def _report(self, run_id: str, phase: Phase, passes: int, *, target: int | None = None,
                results: int | None = None, remaining: int | None = None,
                compensated: int | None = None) -> None:
        self._progress = RevertProgress(run_id=run_id, phase=phase, passes=passes, target=target,
                                        results=results, remaining=remaining, compensated=compensated)

    @workflow.run
    async def run(self, params: RevertRunInput) -> RevertOutcome:
        policy = params.policy
        first = params.request
        run_id = first.run_id
        causation = first.request_id or next((r.request_id for r in self._requests if r.request_id), None)
        round_no = params.round
        total_passes = 0
        heartbeat = timedelta(seconds=policy.heartbeat_timeout_s)
        while True:
            round_no += 1
            self._pending = False
            target = self._target(first)
            self._report(run_id, "waiting_for_results", total_passes, target=target)
            forward: ForwardStatus = await workflow.execute_activity_method(
                RevertActivities.await_forward_results,
                ForwardWaitInput(run_id=run_id, target=target, wait_s=policy.forward_wait_s,
                                 poll_s=policy.forward_poll_s),
                start_to_close_timeout=timedelta(seconds=policy.forward_wait_s) + _SHORT,
                heartbeat_timeout=heartbeat, retry_policy=_RETRY)
            passes = 0
            while True:
                passes += 1
                total_passes += 1
                self._report(run_id, "compensating", total_passes, target=forward.target,
                             results=forward.results)
                result = await workflow.execute_activity_method(
                    RevertActivities.compensate_pass,
                    PassInput(run_id=run_id, pass_token=f"{workflow.info().run_id}/{round_no}/{passes}",
                              policy=policy, causation_id=causation, strict=passes > 1),
                    start_to_close_timeout=_PASS_TIMEOUT, heartbeat_timeout=heartbeat, retry_policy=_RETRY)
                if result.remaining == 0 or passes >= policy.attempts:
                    break
                # Stragglers and refusals get another attempt (new message ids) after a backoff.
                self._report(run_id, "backing_off", total_passes, remaining=result.remaining,
                             compensated=result.compensated)
                await workflow.sleep(timedelta(seconds=policy.backoff(passes)))
            if self._pending:
                continue  # a request arrived meanwhile: its count and any late steps get a round
            self._report(run_id, "finishing", total_passes, remaining=result.remaining,
                         compensated=result.compensated)
            outcome: RevertOutcome = await workflow.execute_activity_method(
                RevertActivities.finish_revert,
                FinishInput(run_id=run_id, outcome_token=f"{workflow.info().run_id}/{round_no}",
                            missing_results=0 if forward.complete else forward.missing, passes=total_passes),
                start_to_close_timeout=_SHORT, retry_policy=_RETRY)
            if self._pending:
                continue
            if workflow.info().is_continue_as_new_suggested():
                # Only reachable through many joined requests; keep the history bounded all the same.
                workflow.continue_as_new(RevertRunInput(request=first, policy=policy, round=round_no))
            self._report(run_id, "done", total_passes, remaining=0 if outcome.status == "REVERTED" else None,
                         compensated=outcome.compensated)
            return outcome
