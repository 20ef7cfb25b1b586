"""The Python SDK of Kinshasa's gateway: `Kinshasa` (async) and `SyncKinshasa`; see docs/sdk.md."""

from kinshasa.client.acknowledgements import Receipt
from kinshasa.client.client import Kinshasa, new_idempotency_key
from kinshasa.client.errors import (
    AgentBudgetExceeded,
    BackendUnavailable,
    BadResponse,
    BreakerOpen,
    Compensated,
    Discarded,
    FieldError,
    Forbidden,
    Internal,
    KinshasaError,
    NotFound,
    QueryTooCostly,
    RateLimited,
    Rejected,
    RunClosed,
    RunNotFound,
    Unauthenticated,
    UnknownOperation,
    Unreachable,
    Validation,
)
from kinshasa.client.operations import Argument, Operation
from kinshasa.client.retries import Backoff
from kinshasa.client.runs import Run, RunScope
from kinshasa.client.sync import SyncKinshasa, SyncReceipt, SyncRun

__all__ = [
    "AgentBudgetExceeded",
    "Argument",
    "BackendUnavailable",
    "Backoff",
    "BadResponse",
    "BreakerOpen",
    "Compensated",
    "Discarded",
    "FieldError",
    "Forbidden",
    "Internal",
    "Kinshasa",
    "KinshasaError",
    "NotFound",
    "Operation",
    "QueryTooCostly",
    "RateLimited",
    "Receipt",
    "Rejected",
    "Run",
    "RunClosed",
    "RunNotFound",
    "RunScope",
    "SyncKinshasa",
    "SyncReceipt",
    "SyncRun",
    "Unauthenticated",
    "UnknownOperation",
    "Unreachable",
    "Validation",
    "new_idempotency_key",
]
