"""What a handler gets besides its payload: the command's context, and the forward step an inverse undoes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kinshasa.schemas.envelope import Actor, EntityRef, Envelope
from kinshasa.settings import ServiceSettings


@dataclass(frozen=True)
class CommandContext:
    """What a handler knows besides its payload: the command it serves, its entity, when, and the settings."""

    envelope: Envelope
    entity: EntityRef
    received_at: datetime
    settings: ServiceSettings = field(default_factory=ServiceSettings)

    @property
    def command_id(self) -> str:
        return str(self.envelope.message_id)

    @property
    def run_id(self) -> str | None:
        return self.envelope.run_id

    @property
    def actor(self) -> Actor:
        return self.envelope.actor

    @property
    def entity_id(self) -> str:
        return self.entity.id

    def stamp(self) -> dict[str, Any]:
        """The provenance columns every version row carries, so "what did run X touch" is a query."""
        return {
            "run_id": self.run_id,
            "command_id": self.command_id,
            "actor": f"{self.actor.kind}:{self.actor.id}",
            "recorded_at": self.received_at,
        }


@dataclass(frozen=True)
class AppliedStep:
    """A forward step this service applied, as its own store remembers it: what an inverse works from."""

    event_id: str
    command_id: str
    command_type: str
    entity: EntityRef
    run_id: str | None
    data: Mapping[str, Any]
    applied_at: datetime
