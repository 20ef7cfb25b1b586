"""Breaker thresholds and quarantine windows: a versioned, append-only policy resolved per run.

Three layers, later winning: defaults, per agent, per entry point. Each `setPolicy` appends a version
holding the whole document for its layer (fields left null inherit from the layer below), with
author and reason. Nothing is ever updated in place, so "what policy tripped this run" always has
an answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway.store import policy_versions
from kinshasa.schemas.envelope import utcnow

PositiveInt = Annotated[int, Field(ge=1, le=10_000_000)]
Seconds = Annotated[float, Field(ge=0, le=30 * 24 * 3600)]


class PolicyScope(StrEnum):
    DEFAULT = "DEFAULT"
    AGENT = "AGENT"
    ENTRY_POINT = "ENTRY_POINT"


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
        description="per-operation window override by command type, e.g. {'ledger.post_entry': 60}",
    )
    probe_writes: PositiveInt | None = None
    hold_timeout_s: Seconds | None = Field(
        default=None, description="discard manually held commands after this"
    )
    auto_revert: bool | None = None


@dataclass(frozen=True)
class EffectivePolicy:
    """What applies to one run: every field resolved. A limit is the most allowed; exceeding it trips."""

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
    version: int = 0

    def window_for(self, command_type: str, declared: float | None = None) -> float:
        """The operator's window for this operation if set; else the longer of the service's declared
        default and the policy's window (a service may ask for more quarantine, never for less)."""
        override = self.operation_windows.get(command_type)
        if override is not None:
            return override
        return max(self.quarantine_window_s, declared or 0.0)

    def thresholds(self) -> dict[str, float]:
        return {
            "writes": self.max_writes,
            "errors": self.max_errors,
            "services": self.max_services,
            "velocity": self.max_velocity,
            "velocity_window_s": self.velocity_window_s,
        }


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
)


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    scope: PolicyScope
    subject: str
    document: PolicyDocument
    author: str
    reason: str
    created_at: datetime


def _resolve(layers: list[PolicyDocument], version: int) -> EffectivePolicy:
    merged: dict[str, Any] = BUILTIN.model_dump()
    for layer in layers:
        for key, value in layer.model_dump(exclude_none=True).items():
            if key == "operation_windows":
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return EffectivePolicy(**merged, version=version)


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
                self._layers[k].document
                for k in (
                    (PolicyScope.DEFAULT, ""),
                    (PolicyScope.AGENT, agent_id),
                    (PolicyScope.ENTRY_POINT, entry_point),
                )
                if k in self._layers
            ]
            policy = _resolve(layers, self.version)
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
    return PolicyVersion(
        version=row["version"],
        scope=PolicyScope(row["scope"]),
        subject=row["subject"],
        document=PolicyDocument.model_validate_json(row["document"]),
        author=row["author"],
        reason=row["reason"],
        created_at=row["created_at"],
    )


async def append_version(
    conn: AsyncConnection,
    scope: PolicyScope,
    subject: str,
    document: PolicyDocument,
    author: str,
    reason: str,
) -> int:
    """Append one version; the caller commits. Returns its version number."""
    result = await conn.execute(
        insert(policy_versions)
        .values(
            scope=scope.value,
            subject=subject if scope is not PolicyScope.DEFAULT else "",
            document=json.dumps(document.model_dump(exclude_none=True), sort_keys=True),
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
