"""The GraphQL enums: run, breaker, command and step statuses, and the policy scopes."""

import enum

import strawberry

from kinshasa.gateway import policy as policy_mod
from kinshasa.gateway import run_steps
from kinshasa.schemas.run_status import RunStatus

# The run-status words are defined once, in kinshasa.schemas.run_status: the GraphQL enum is that enum.
strawberry.enum(RunStatus)


@strawberry.enum
class BreakerState(enum.Enum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@strawberry.enum(
    description="HELD (in its run's quarantine window) or AWAITING_APPROVAL (egress waiting for an operator),"
    " then PUBLISHED (sent to its service), then APPLIED (a read now sees it) or REJECTED (see "
    "rejectedReason); APPLIED becomes COMPENSATED when a revert undoes it. DISCARDED: dropped before it "
    "was published."
)
class CommandStatus(enum.Enum):
    HELD = "HELD"
    PUBLISHED = "PUBLISHED"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    DISCARDED = "DISCARDED"
    APPLIED = "APPLIED"
    REJECTED = "REJECTED"
    COMPENSATED = "COMPENSATED"


# The ledger's own vocabulary, registered as a GraphQL enum.
strawberry.enum(run_steps.StepStatus, description="Where one applied forward step stands on the way back.")
StepStatus = run_steps.StepStatus


strawberry.enum(policy_mod.PolicyScope)  # registers the policy's own enum as a GraphQL enum
PolicyScope = policy_mod.PolicyScope
