"""The topics the coordinator reads and writes, per the topic catalogue; a suffix gives a test its own copies.

The coordinator knows no service by name: it reads every service's events topic through a pattern and
sends compensations to the commands topic of the service a step names."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kinshasa.topics.catalogue import (
    ALERTS,
    COORDINATOR,
    RUNS,
    TopicSpec,
    catalogue,
    commands_topic,
    dlq_topic,
    events_topic,
    events_topic_pattern,
    group_id,
)


@dataclass(frozen=True)
class CoordinatorTopics:
    """Names of every topic the coordinator touches.

    With `suffix`, each name gets `.<suffix>` (the same convention as the services' `--topic-suffix`)
    and the consumer group the role `<suffix>`, so a test or a side-by-side stack on one broker sees
    only its own messages.
    """

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
        """What the ledger projection reads: every service's events (a pattern, so a service registered
        later is read too), and the run facts."""
        return [events_topic_pattern(self.suffix), self.runs]

    def specs(self) -> list[TopicSpec]:
        """The catalogue's specs of the coordinator's own topics, renamed when a suffix is in use (each
        service creates its own commands and events topics)."""
        canonical = CoordinatorTopics()
        renames = {canonical.runs: self.runs, canonical.alerts: self.alerts, canonical.dlq: self.dlq}
        return [replace(spec, name=renames[spec.name])
                for spec in catalogue([], groups=[canonical.group]) if spec.name in renames]
