"""Breaker thresholds, agent budgets and quarantine windows: a versioned, append-only policy resolved per run.

Three layers: defaults, per agent, per entry point. Each `setPolicy` appends a version holding the whole
document for its layer (fields left null inherit from the layer below), with author and reason. Nothing
is ever updated in place, so "what policy tripped this run" always has an answer.

The default layer sets the base (it replaces the built-in values). The agent and entry-point layers can
only tighten it: every limit resolves to the strictest of the layers, because entry points are the
operator's (an agent that may pick any entry point must not pick its way out of its own limits). A layer
loosens only when the operator's `setPolicy` says so (`loosen: true`, stored with the version): then the
fields it names replace the value below, as the default layer's do. `resolve` says per field what
"stricter" means.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway.store import policy_versions
from kinshasa.schemas.envelope import utcnow

PositiveInt = Annotated[int, Field(ge=1, le=10_000_000)]
Seconds = Annotated[float, Field(ge=0, le=30 * 24 * 3600)]


class PolicyScope(StrEnum):
    DEFAULT = "DEFAULT"
    AGENT = "AGENT"
    ENTRY_POINT = "ENTRY_POINT"


# Budgets bound an agent across all its runs, so they belong to the agent: an entry-point layer (a
# property of one run) cannot set them.
AGENT_BUDGETS = ("max_concurrent_runs", "max_runs_per_hour", "max_agent_writes_per_hour")


class PolicyDocument(BaseModel):
    """One layer: every field optional; a null field inherits from the layer below."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_writes: PositiveInt | None = None
    max_errors: Annotated[int, Field(ge=0, le=10_000_000)] | None = None
    max_services: PositiveInt | None = None
    max_velocity: PositiveInt | None = Field(default=None, description="writes allowed per velocity window")
    velocity_window_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    quarantine_window_s: Seconds | None = None
    operation_windows: dict[str, Seconds] | None = Field(
        default=None,
        description="per-operation window override by command type, e.g. {'orders.cancel': 60}",
    )
    operation_gates: list[str] | None = Field(
        default=None,
        description="command types that wait for an operator's approveEgress like egress does, e.g. "
        "['orders.cancel']; they keep their inverse and stay revertible",
    )
    probe_writes: PositiveInt | None = None
    hold_timeout_s: Seconds | None = Field(
        default=None, description="discard manually held commands after this"
    )
    auto_revert: bool | None = None
    max_concurrent_runs: PositiveInt | None = Field(
        default=None, description="RUNNING runs an agent may have at once (DEFAULT and AGENT scopes)"
    )
    max_runs_per_hour: PositiveInt | None = Field(
        default=None, description="runs an agent may start in any hour (DEFAULT and AGENT scopes)"
    )
    max_agent_writes_per_hour: PositiveInt | None = Field(
        default=None, description="writes an agent may make over all its runs in any hour (DEFAULT and AGENT)"
    )


def scope_problems(scope: PolicyScope, document: PolicyDocument) -> list[tuple[str, str]]:
    """What a layer of this scope may not set, as (field, problem) pairs; empty when the document fits."""
    if scope is not PolicyScope.ENTRY_POINT:
        return []
    return [
        (name, "an agent budget is set at the DEFAULT or AGENT scope, not per entry point")
        for name in AGENT_BUDGETS
        if getattr(document, name) is not None
    ]


@dataclass(frozen=True)
class Layer:
    """One layer as resolution sees it: its document, and whether it replaces (default layer, or a layer
    set with `loosen: true`) or may only tighten what lies below."""

    document: PolicyDocument
    replaces: bool = False


@dataclass(frozen=True)
class _WindowLayer:
    general: float | None
    operations: Mapping[str, float]
    replaces: bool


@dataclass(frozen=True)
class EffectivePolicy:
    """What applies to one run: every field resolved. A limit is the most allowed; exceeding it trips.

    Agent budgets are None when no layer sets them: unlimited.
    """

    max_writes: int
    max_errors: int
    max_services: int
    max_velocity: int
    velocity_window_s: float
    quarantine_window_s: float
    operation_windows: dict[str, float]
    probe_writes: int
    hold_timeout_s: float | None
    auto_revert: bool
    max_concurrent_runs: int | None = None
    max_runs_per_hour: int | None = None
    max_agent_writes_per_hour: int | None = None
    operation_gates: tuple[str, ...] = ()
    version: int = 0
    # Each layer's say on windows, in order: an operation's window depends on its service's declared
    # default, known only per write, so the fold over the layers runs in `window_for`.
    window_layers: tuple[_WindowLayer, ...] = field(default=(), repr=False)

    def window_for(self, command_type: str, declared: float | None = None) -> float:
        """The quarantine window of one operation: the fold of every layer's windows (see `resolve`).

        Without any layer naming the operation: the longer of the service's declared default and the
        general window (a service may ask for more quarantine, never for less). An operator's override
        for the operation (default layer or a loosening one) may set any window, shorter than declared too.
        """
        override: float | None = None
        if not self.window_layers:
            override = self.operation_windows.get(command_type)
            return override if override is not None else max(self.quarantine_window_s, declared or 0.0)
        general = float(BUILTIN.quarantine_window_s or 0.0)
        for layer in self.window_layers:
            if layer.replaces:
                if layer.general is not None:
                    general = layer.general
                if command_type in layer.operations:
                    override = layer.operations[command_type]
                continue
            below = override if override is not None else max(general, declared or 0.0)
            if command_type in layer.operations:
                # The layer's own override for this operation beats its own general window.
                override = max(below, layer.operations[command_type])
            elif layer.general is not None and override is not None:
                override = max(override, layer.general)
            if layer.general is not None:
                general = max(general, layer.general)
        return override if override is not None else max(general, declared or 0.0)

    def thresholds(self) -> dict[str, float]:
        return {
            "writes": self.max_writes,
            "errors": self.max_errors,
            "services": self.max_services,
            "velocity": self.max_velocity,
            "velocity_window_s": self.velocity_window_s,
        }

    @property
    def has_run_budget(self) -> bool:
        return self.max_concurrent_runs is not None or self.max_runs_per_hour is not None

    def document(self) -> PolicyDocument:
        """The resolved policy as one document (the `policy` query's `effective`)."""
        return PolicyDocument(
            max_writes=self.max_writes,
            max_errors=self.max_errors,
            max_services=self.max_services,
            max_velocity=self.max_velocity,
            velocity_window_s=self.velocity_window_s,
            quarantine_window_s=self.quarantine_window_s,
            operation_windows=self.operation_windows,
            probe_writes=self.probe_writes,
            hold_timeout_s=self.hold_timeout_s,
            auto_revert=self.auto_revert,
            max_concurrent_runs=self.max_concurrent_runs,
            max_runs_per_hour=self.max_runs_per_hour,
            max_agent_writes_per_hour=self.max_agent_writes_per_hour,
            operation_gates=list(self.operation_gates),
        )

    def gated(self, command_type: str) -> bool:
        """Does this operation wait for an operator's approval (an operation gate)?"""
        return command_type in self.operation_gates


BUILTIN = PolicyDocument(
    max_writes=500,
    max_errors=10,
    max_services=4,
    max_velocity=120,
    velocity_window_s=10.0,
    quarantine_window_s=10.0,
    operation_windows={},
    probe_writes=3,
    hold_timeout_s=None,
    auto_revert=True,
    # No agent budget until an operator sets one: a fresh install must not refuse its own demo.
    max_concurrent_runs=None,
    max_runs_per_hour=None,
    max_agent_writes_per_hour=None,
    operation_gates=[],
)


def _lower_limit(below: Any, layer: Any) -> Any:
    # None below is "no limit" (a budget not set, no hold timeout): any value is stricter.
    return layer if below is None else min(below, layer)


def _longer(below: float, layer: float) -> float:
    return max(below, layer)


def _either_true(below: bool, layer: bool) -> bool:
    return below or layer


def _union(below: Sequence[str], layer: Sequence[str]) -> list[str]:
    return sorted({*below, *layer})


# What "stricter" means, field by field, when a layer tightens the one below:
# - max_writes, max_errors, max_services, max_velocity: lower. probe_writes: fewer probe writes while
#   HALF_OPEN. Agent budgets (max_concurrent_runs, max_runs_per_hour, max_agent_writes_per_hour): lower,
#   any value being stricter than none.
# - velocity_window_s: longer. Velocity is `max_velocity` writes per `velocity_window_s`; the lower count
#   over the longer window admits nothing either layer would refuse (10 per 60 s is within both 10 per 1 s
#   and 100 per 60 s).
# - hold_timeout_s: shorter, none being the loosest. A tripped run's held commands are discarded sooner,
#   so less of a bad run can ever be released; a layer that wants more review time must loosen.
# - auto_revert: true (what escaped from a tripped run is compensated).
# - operation_gates: more gates (the union): an operation gated below stays gated.
# - quarantine_window_s and operation_windows: longer quarantine; see EffectivePolicy.window_for. A
#   tightening layer's general window is a floor for every operation, overrides from below included; its
#   override for one operation is the longer of that override and the operation's window below.
_STRICTER: dict[str, Callable[[Any, Any], Any]] = {
    "max_writes": min,
    "max_errors": min,
    "max_services": min,
    "max_velocity": min,
    "probe_writes": min,
    "max_concurrent_runs": _lower_limit,
    "max_runs_per_hour": _lower_limit,
    "max_agent_writes_per_hour": _lower_limit,
    "hold_timeout_s": _lower_limit,
    "velocity_window_s": _longer,
    "auto_revert": _either_true,
    "operation_gates": _union,
}


def resolve(layers: Sequence[Layer], version: int) -> EffectivePolicy:
    """Fold the layers, lowest first, over the built-in values.

    A replacing layer (the default layer, or one set with `loosen: true`) sets the fields it names. Any
    other layer tightens: each field it names becomes the stricter of its value and the value below, as
    `_STRICTER` defines per field; windows fold per operation in `EffectivePolicy.window_for`.
    """
    merged: dict[str, Any] = BUILTIN.model_dump()
    windows: list[_WindowLayer] = []
    for layer in layers:
        given = layer.document.model_dump(exclude_none=True)
        windows.append(
            _WindowLayer(
                general=given.pop("quarantine_window_s", None),
                operations=dict(given.pop("operation_windows", {})),
                replaces=layer.replaces,
            )
        )
        for key, value in given.items():
            merged[key] = value if layer.replaces else _STRICTER[key](merged[key], value)
    general = float(merged["quarantine_window_s"])
    for w in windows:
        if w.general is not None:
            general = w.general if w.replaces else max(general, w.general)
    merged["quarantine_window_s"] = general
    merged["operation_gates"] = tuple(sorted(set(merged["operation_gates"] or ())))
    policy = EffectivePolicy(**merged, version=version, window_layers=tuple(windows))
    # Shown as resolved for a service that declares no window of its own (a declared one may lengthen it).
    named = sorted({op for w in windows for op in w.operations})
    return replace(policy, operation_windows={op: policy.window_for(op) for op in named})


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    scope: PolicyScope
    subject: str
    document: PolicyDocument
    author: str
    reason: str
    created_at: datetime
    # Set by the operator's `setPolicy(loosen: true)`: this layer's fields replace the layer below even
    # where they are looser. Always true in effect for the default layer, which sets the base.
    loosen: bool = False
    # The incident whose accepted proposal appended this version, if one did.
    incident_id: str | None = None

    @property
    def layer(self) -> Layer:
        return Layer(self.document, replaces=self.loosen or self.scope is PolicyScope.DEFAULT)


# The newest policy version, as a scalar subquery a caller can fold into a query it runs anyway.
LATEST_VERSION = select(func.coalesce(func.max(policy_versions.c.version), 0)).scalar_subquery()


class PolicyBook:
    """The latest version of every layer, cached in memory and reloaded when a newer version exists.

    The freshness check is one indexed `max(version)` per write, so a `setPolicy` on one gateway
    replica applies to the next write on every replica.
    """

    def __init__(self) -> None:
        self.version = -1
        self._layers: dict[tuple[PolicyScope, str], PolicyVersion] = {}
        self._resolved: dict[tuple[str, str], EffectivePolicy] = {}

    async def effective(
        self, conn: AsyncConnection, agent_id: str, entry_point: str, latest: int | None = None
    ) -> EffectivePolicy:
        """The policy for a run; pass `latest` (LATEST_VERSION read by the caller) to skip a query."""
        if latest is None:
            latest = (await conn.execute(select(LATEST_VERSION))).scalar_one()
        if latest != self.version:
            await self._reload(conn, latest)
        key = (agent_id, entry_point)
        policy = self._resolved.get(key)
        if policy is None:
            layers = [
                self._layers[k].layer
                for k in (
                    (PolicyScope.DEFAULT, ""),
                    (PolicyScope.AGENT, agent_id),
                    (PolicyScope.ENTRY_POINT, entry_point),
                )
                if k in self._layers
            ]
            policy = resolve(layers, self.version)
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[key] = policy
        return policy

    async def _reload(self, conn: AsyncConnection, latest: int) -> None:
        rows = (await conn.execute(select(policy_versions).order_by(policy_versions.c.version))).mappings()
        layers: dict[tuple[PolicyScope, str], PolicyVersion] = {}
        for row in rows:
            pv = row_to_version(row)
            layers[(pv.scope, pv.subject)] = pv
        self._layers = layers
        self._resolved = {}
        self.version = latest

    def layers(self) -> list[PolicyVersion]:
        return sorted(self._layers.values(), key=lambda pv: pv.version)


def row_to_version(row: Any) -> PolicyVersion:
    # `loosen` and the incident ride in the stored document beside the settings (the table predates them).
    stored = json.loads(row["document"])
    loosen = stored.pop(LOOSEN_KEY, False) is True
    incident = stored.pop(INCIDENT_KEY, None)
    return PolicyVersion(
        version=row["version"],
        scope=PolicyScope(row["scope"]),
        subject=row["subject"],
        document=PolicyDocument.model_validate(stored),
        author=row["author"],
        reason=row["reason"],
        created_at=row["created_at"],
        loosen=loosen,
        incident_id=incident if isinstance(incident, str) else None,
    )


LOOSEN_KEY = "loosen"
INCIDENT_KEY = "incident"


# pg_advisory_xact_lock key of the policy's append lock ("kinshasa.policy" as a 63-bit number).
_POLICY_LOCK = 0x6B696E7368617361


async def lock_policy(conn: AsyncConnection) -> None:
    """Serialise policy appends until the caller's transaction ends.

    `acceptProposal` reads a layer, merges its change in and appends the result: two such read-merge-
    appends of one layer at once (two proposals of one incident accepted by two operators, or one beside
    a `setPolicy`) would each append the layer as it read it, and the first one's change would be lost.
    Every append takes this lock, and an accept takes it before it reads. SQLite's BEGIN IMMEDIATE already
    holds the database's write lock for the whole transaction.
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POLICY_LOCK})


async def append_version(
    conn: AsyncConnection,
    scope: PolicyScope,
    subject: str,
    document: PolicyDocument,
    author: str,
    reason: str,
    loosen: bool = False,
    incident_id: str | None = None,
) -> int:
    """Append one version; the caller commits. Returns its version number.

    `loosen` records the operator's explicit word that this layer may loosen what lies below it;
    `incident_id` the incident whose accepted proposal this version is.
    """
    await lock_policy(conn)
    stored: dict[str, Any] = document.model_dump(exclude_none=True)
    if loosen:
        stored[LOOSEN_KEY] = True
    if incident_id is not None:
        stored[INCIDENT_KEY] = incident_id
    result = await conn.execute(
        insert(policy_versions)
        .values(
            scope=scope.value,
            subject=subject if scope is not PolicyScope.DEFAULT else "",
            document=json.dumps(stored, sort_keys=True),
            author=author,
            reason=reason,
            created_at=utcnow(),
        )
        .returning(policy_versions.c.version)
    )
    return int(result.scalar_one())


async def history(conn: AsyncConnection, limit: int = 100) -> list[PolicyVersion]:
    rows = (
        await conn.execute(select(policy_versions).order_by(policy_versions.c.version.desc()).limit(limit))
    ).mappings()
    return [row_to_version(row) for row in rows]
