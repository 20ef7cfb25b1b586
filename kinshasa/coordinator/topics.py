"""The topics the coordinator reads and writes, from the catalogue; a suffix gives a test its own copies."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kinshasa.schemas.catalogue import CATALOGUE
from kinshasa.topics.catalogue import (
    ALERTS,
    COORDINATOR,
    RUNS,
    TopicSpec,
    catalogue,
    commands_topic,
    dlq_topic,
    events_topic,
    group_id,
)


@dataclass(frozen=True)
class CoordinatorTopics:
    """Names of every topic the coordinator touches.

    With `suffix`, each name gets `.<suffix>` (the same convention as the services' `--topic-suffix`)
    and the consumer group the role `<suffix>`, so a test or a side-by-side stack on one broker sees
    only its own messages.
    """

    services: tuple[str, ...] = CATALOGUE.services
    suffix: str | None = None

    def _named(self, name: str) -> str:
        return f"{name}.{self.suffix}" if self.suffix else name

    def commands(self, service: str) -> str:
        return self._named(commands_topic(service))

    def events(self, service: str) -> str:
        return self._named(events_topic(service))

    @property
    def runs(self) -> str:
        return self._named(RUNS)

    @property
    def alerts(self) -> str:
        return self._named(ALERTS)

    @property
    def group(self) -> str:
        return group_id(COORDINATOR, self.suffix) if self.suffix else group_id(COORDINATOR)

    @property
    def dlq(self) -> str:
        return dlq_topic(self.group)

    def consumed(self) -> list[str]:
        """What the ledger projection reads: every service's events, and the run facts."""
        return [self.events(s) for s in self.services] + [self.runs]

    def specs(self) -> list[TopicSpec]:
        """The catalogue's specs of every topic above, renamed when a suffix is in use."""
        canonical = CoordinatorTopics(self.services)
        renames = {canonical.runs: self.runs, canonical.alerts: self.alerts, canonical.dlq: self.dlq}
        for service in self.services:
            renames[canonical.commands(service)] = self.commands(service)
            renames[canonical.events(service)] = self.events(service)
        return [replace(spec, name=renames[spec.name])
                for spec in catalogue(list(self.services), groups=[canonical.group]) if spec.name in renames]
