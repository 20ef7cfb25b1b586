"""Inputs and results of the revert workflows and activities: one pydantic model each, as Temporal carries."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["REVERTED", "REVERT_FAILED"]
Phase = Literal["waiting_for_results", "compensating", "backing_off", "finishing", "done"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RevertPolicy(_Model):
    """How hard a revert tries; travels in the workflow input so a replay sees the same numbers."""

    attempts: int = Field(default=5, ge=1, description="passes over unsettled steps before REVERT_FAILED")
    backoff_s: float = Field(default=1.0, ge=0,
                             description="pause after the first failed pass, doubled each time")
    max_backoff_s: float = Field(default=30.0, ge=0)
    straggler_timeout_s: float = Field(
        default=20.0, gt=0, description="a pass ends when no compensation was acknowledged for this long")
    poll_interval_s: float = Field(default=0.05, gt=0,
                                   description="how often a pass reads acks from the ledger")
    batch_size: int = Field(default=500, ge=1, le=5000,
                            description="compensate commands per outbox transaction")
    entity_depth: int = Field(
        default=16, ge=1,
        description="compensate commands in flight per entity in a revert's first pass; retry passes send "
        "one at a time (see kinshasa.coordinator.ordering)")
    forward_wait_s: float = Field(
        default=120.0, ge=0,
        description="how long to wait for every published forward command to have a result in the ledger")
    forward_poll_s: float = Field(default=0.1, gt=0)
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)

    def backoff(self, failed_passes: int) -> float:
        """Seconds to wait after the n-th pass that left steps unsettled."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failed_passes - 1)))


class RevertRequest(_Model):
    """One ask to revert a run: a `run.revert_requested` the gateway's doorbell recorded."""

    run_id: str = Field(min_length=1)
    reason: str = "revert requested"
    requested_by: str = "operator"
    # None when the fact did not carry the gateway's count: the ledger's final count is used instead.
    published_count: int | None = Field(default=None, ge=0)
    request_id: str | None = None


class RevertRunInput(_Model):
    """Input of `RevertRun`; `round` survives continue-as-new so message ids of outcomes stay unique."""

    request: RevertRequest
    policy: RevertPolicy = RevertPolicy()
    round: int = 0


class ForwardWaitInput(_Model):
    run_id: str
    target: int | None
    wait_s: float
    poll_s: float


class ForwardStatus(_Model):
    """How many of the run's published forward commands have a result (applied or rejected) so far."""

    results: int
    target: int | None
    complete: bool

    @property
    def missing(self) -> int:
        return max(0, (self.target or 0) - self.results)


class PassInput(_Model):
    run_id: str
    pass_token: str
    policy: RevertPolicy
    # Retry passes follow a refusal or a straggler: one step per entity at a time, strictly.
    strict: bool = False
    # The revert request's message id, as the compensate commands' causation.
    causation_id: str | None = None


class FailingStep(_Model):
    """A step the revert could not settle, and why: what the operator reads in REVERT_FAILED."""

    step_id: int
    forward_event_id: str
    forward_type: str
    entity: str
    attempts: int
    reason: str


class PassResult(_Model):
    """What one compensation pass did, and what is left for the next."""

    emitted: int
    compensated: int
    irreversible: int
    remaining: int
    failed: list[FailingStep] = []
    failed_count: int = 0
    stragglers: int = 0


class FinishInput(_Model):
    run_id: str
    outcome_token: str
    missing_results: int
    passes: int


class RevertOutcome(_Model):
    """The result of `RevertRun`: REVERTED, or REVERT_FAILED naming the steps that did not settle."""

    run_id: str
    status: Outcome
    compensated: int
    irreversible: int
    failing_steps: list[FailingStep] = []
    failing_count: int = 0
    missing_results: int = 0
    passes: int = 0


class RevertProgress(_Model):
    """The `progress` query of `RevertRun`."""

    run_id: str
    phase: Phase
    passes: int
    target: int | None = None
    results: int | None = None
    remaining: int | None = None
    compensated: int | None = None
