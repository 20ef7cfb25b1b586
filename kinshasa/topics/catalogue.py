"""The topic catalogue: the only place Kinshasa topic and consumer-group names are spelled.

Every other module asks this one for a name (`commands_topic("documents")`, `dlq_topic(group)`), so a
rename is one edit and `kinshasa topics ensure` can create and verify exactly what the code uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from kinshasa.settings import SERVICE_NAMES

PREFIX = "kinshasa"
RUNS = "kinshasa.runs"
ALERTS = "kinshasa.alerts"
# Each service's declaration, keyed by service name; compacted, so the newest per service is kept.
CATALOGUE = "kinshasa.catalogue"

GATEWAY = "gateway"
COORDINATOR = "coordinator"
COMPONENTS = (GATEWAY, COORDINATOR)

COMMAND_PARTITIONS = 6
EVENT_PARTITIONS = 6
RUN_PARTITIONS = 3
ALERT_PARTITIONS = 1
# One partition: every reader sees every service's declarations in one order.
CATALOGUE_PARTITIONS = 1
DLQ_PARTITIONS = 1

KeyedBy = Literal["entity", "run", "group", "service"]

# Same shape as the envelope's type segments (`documents` in `documents.archive`), so a service name is
# also a valid env-var fragment (KINSHASA_SVC_DOCUMENTS_) and can never contain a dot.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# Kafka's own rule for topic names.
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_GROUP_RE = re.compile(rf"^{PREFIX}(\.[a-z][a-z0-9_]*)+$")

# The log is the record: the ledger projection and every audit replay read it from the beginning, so
# commands, events and run facts are never deleted by time or size.
_FOREVER = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
_THIRTY_DAYS_MS = str(30 * 24 * 3600 * 1000)


class TopicNameError(ValueError):
    """A service, component, group or topic name the catalogue refuses."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic as the code expects it: what `ensure_topics` creates and verifies."""

    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    keyed_by: KeyedBy = "entity"
    description: str = ""

    def __post_init__(self) -> None:
        check_topic_name(self.name)
        if self.partitions < 1:
            raise TopicNameError(f"topic {self.name}: partitions must be at least 1, got {self.partitions}")
        for key, value in self.configs.items():
            if not isinstance(value, str):
                # describe_configs answers in strings; a non-string here would be a permanent mismatch.
                raise TypeError(f"topic {self.name}: config {key} must be a string, got {value!r}")


def check_topic_name(name: str) -> str:
    """Return `name` if Kafka accepts it as a topic name, else raise TopicNameError."""
    if not _TOPIC_RE.match(name) or name in (".", ".."):
        raise TopicNameError(
            f"invalid topic name {name!r}: use 1-249 characters from a-z, A-Z, 0-9, '.', '_' and '-'"
        )
    return name


def check_service_name(service: str) -> str:
    """Return `service` if it can name a service's topics and consumer group, else raise TopicNameError."""
    if not _NAME_RE.match(service):
        raise TopicNameError(
            f"invalid service name {service!r}: use a lowercase name of letters, digits and '_' "
            "starting with a letter (at most 48 characters), e.g. 'documents'"
        )
    if service in COMPONENTS:
        raise TopicNameError(
            f"{service!r} is a Kinshasa component, not a service: pick another service name"
        )
    return service


def commands_topic(service: str) -> str:
    """Where the gateway (forward) and the coordinator (compensate) send a service its commands."""
    return f"{PREFIX}.commands.{check_service_name(service)}"


def events_topic(service: str) -> str:
    """Where a service reports what it did with each command (`*.applied`, `*.rejected`, ...)."""
    return f"{PREFIX}.events.{check_service_name(service)}"


def group_id(component: str, role: str | None = None) -> str:
    """The consumer group of a component: `kinshasa.gateway`, `kinshasa.coordinator`, `kinshasa.svc.<name>`.

    `role` names a second consumer in the same component (`group_id("coordinator", "alerts")` ->
    `kinshasa.coordinator.alerts`); give each such group its own DLQ by passing it to `catalogue`.
    """
    if component in COMPONENTS:
        base = f"{PREFIX}.{component}"
    else:
        base = f"{PREFIX}.svc.{check_service_name(component)}"
    if role is None:
        return base
    if not _NAME_RE.match(role):
        raise TopicNameError(
            f"invalid consumer role {role!r}: use a lowercase name of letters, digits and '_', "
            "e.g. 'projector'"
        )
    return f"{base}.{role}"


def check_group_id(group: str) -> str:
    """Return `group` if it is a Kinshasa consumer group name, else raise TopicNameError."""
    if not _GROUP_RE.match(group):
        raise TopicNameError(
            f"invalid consumer group {group!r}: build it with group_id(), e.g. group_id('documents') "
            "-> 'kinshasa.svc.documents'"
        )
    return group


def dlq_topic(group: str) -> str:
    """The dead-letter topic of one consuming group: messages it gave up on, kept for reprocessing."""
    return check_topic_name(f"{check_group_id(group)}.dlq")


def default_groups(services: Iterable[str] = SERVICE_NAMES) -> list[str]:
    """Every consuming group of a stack: one per service, the gateway's and the coordinator's."""
    return [group_id(s) for s in services] + [group_id(GATEWAY), group_id(COORDINATOR)]


def catalogue(
    services: Sequence[str] = SERVICE_NAMES,
    groups: Sequence[str] | None = None,
    *,
    min_insync_replicas: int = 1,
) -> list[TopicSpec]:
    """Every topic a stack with these services and consumer groups needs, in a stable order.

    `groups` defaults to `default_groups(services)`. `min_insync_replicas` is 1 for the single-node
    local broker; on a cluster with replication factor 3 pass 2, so an acks=all write survives a broker loss.
    """
    if min_insync_replicas < 1:
        raise ValueError(f"min_insync_replicas must be at least 1, got {min_insync_replicas}")
    if len(set(services)) != len(services):
        raise TopicNameError(f"duplicate service names in {list(services)}: list each service once")
    isr = {"min.insync.replicas": str(min_insync_replicas)}
    specs: list[TopicSpec] = []
    for service in services:
        specs.append(TopicSpec(
            commands_topic(service), COMMAND_PARTITIONS, {**_FOREVER, **isr}, "entity",
            f"commands for {service}: forward from the gateway, compensate from the coordinator",
        ))
        specs.append(TopicSpec(
            events_topic(service), EVENT_PARTITIONS, {**_FOREVER, **isr}, "entity",
            f"what {service} did with each command: applied, rejected, compensated, compensation_failed",
        ))
    specs.append(TopicSpec(
        RUNS, RUN_PARTITIONS, {**_FOREVER, **isr}, "run",
        "run lifecycle: started, finished, tripped, revert_requested, reverted, revert_failed, "
        "released, discarded",
    ))
    specs.append(TopicSpec(
        ALERTS, ALERT_PARTITIONS,
        {"cleanup.policy": "delete", "retention.ms": _THIRTY_DAYS_MS, **isr}, "run",
        "operator alerts: breaker trips, revert failures",
    ))
    specs.append(catalogue_topic_spec(min_insync_replicas))
    for group in default_groups(services) if groups is None else groups:
        # One partition: a DLQ is small, read by operators in arrival order; kept until reprocessed.
        specs.append(TopicSpec(
            dlq_topic(group), DLQ_PARTITIONS, {**_FOREVER, **isr}, "group",
            f"messages {group} gave up on, with the original key and headers, until reprocessed",
        ))
    _check_unique(specs)
    return specs


def catalogue_topic_spec(min_insync_replicas: int = 1, name: str = CATALOGUE) -> TopicSpec:
    """`kinshasa.catalogue`: compacted, never deleted by time, so a gateway starting late reads every
    service's newest declaration."""
    return TopicSpec(
        name, CATALOGUE_PARTITIONS,
        {"cleanup.policy": "compact", "retention.ms": "-1",
         "min.insync.replicas": str(min_insync_replicas)}, "service",
        "service declarations: operations, inverses and read models, newest per service",
    )


def with_suffix(spec: TopicSpec, suffix: str) -> TopicSpec:
    """`spec` for an isolated copy of the stack (`--topic-suffix`): `<topic>.<suffix>`, and for a DLQ the
    one of the group `<group>.<suffix>` (`kinshasa.svc.documents.<suffix>.dlq`), as the components name
    them."""
    if not _NAME_RE.match(suffix):
        raise TopicNameError(f"invalid topic suffix {suffix!r}: use lowercase letters, digits and '_', "
                             "starting with a letter")
    if spec.keyed_by == "group" and spec.name.endswith(".dlq"):
        return replace(spec, name=check_topic_name(f"{spec.name.removesuffix('.dlq')}.{suffix}.dlq"))
    return replace(spec, name=check_topic_name(f"{spec.name}.{suffix}"))


def events_topic_pattern(suffix: str | None = None) -> str:
    """A subscription regex matching every service's events topic (with `suffix`: only its copies), so
    a consumer picks up a service that starts after it."""
    tail = rf"\.{re.escape(suffix)}" if suffix else ""
    return rf"^{re.escape(PREFIX)}\.events\.[a-z][a-z0-9_]*{tail}$"


def service_dlq_pattern() -> str:
    """A subscription regex matching every service's dead-letter topic (`kinshasa.svc.<name>.dlq`)."""
    return rf"^{re.escape(PREFIX)}\.svc\.[a-z][a-z0-9_]*\.dlq$"


def _check_unique(specs: Sequence[TopicSpec]) -> None:
    # Kafka maps '.' and '_' to the same metric name, so topics differing only there collide too.
    seen: dict[str, str] = {}
    for spec in specs:
        folded = spec.name.replace(".", "_")
        if folded in seen:
            raise TopicNameError(
                f"topics {seen[folded]!r} and {spec.name!r} collide (Kafka treats '.' and '_' alike in "
                "metric names, and duplicates are one topic): rename a service or group"
            )
        seen[folded] = spec.name
