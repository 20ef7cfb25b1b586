"""Idempotent topic creation: create what the catalogue lists, verify what already exists, never alter it.

These calls block (they are for process start-up and the CLI); from async code use
`await asyncio.to_thread(ensure_topics, ...)`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from kinshasa.topics.catalogue import TopicSpec
from kinshasa.topics.discovery import client_config


class TopicAdminError(RuntimeError):
    """Kafka refused or did not answer an admin request."""


@dataclass(frozen=True)
class TopicMismatch:
    """One way an existing topic differs from its catalogue entry (`field`: 'partitions' or a config key)."""

    topic: str
    field: str
    expected: str
    actual: str | None

    def line(self) -> str:
        return (f"{self.topic}: {self.field} is {self.actual} on the broker, "
                f"the catalogue says {self.expected}")


@dataclass(frozen=True)
class TopicState:
    """What the broker holds for one topic: partitions, replication factor and every config value."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]


@dataclass
class EnsureReport:
    """The outcome of `ensure_topics`: what was created, what already existed and how it differs."""

    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    mismatches: list[TopicMismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def compare(spec: TopicSpec, state: TopicState, replication_factor: int | None = None) -> list[TopicMismatch]:
    """How `state` differs from `spec`: partition count, each catalogue config, and the replication factor.

    Only configs the catalogue names are compared; broker defaults for the rest are nobody's contract.
    The replication factor and min.insync.replicas are minimums: a topic an operator made safer than
    asked for is no mismatch.
    """
    mismatches: list[TopicMismatch] = []
    if state.partitions != spec.partitions:
        mismatches.append(TopicMismatch(spec.name, "partitions", str(spec.partitions), str(state.partitions)))
    if replication_factor is not None and state.replication_factor < replication_factor:
        mismatches.append(TopicMismatch(spec.name, "replication_factor", str(replication_factor),
                                        str(state.replication_factor)))
    for key, expected in sorted(spec.configs.items()):
        actual = state.configs.get(key)
        if key == "min.insync.replicas" and actual is not None and int(actual) >= int(expected):
            continue
        if actual != expected:
            mismatches.append(TopicMismatch(spec.name, key, expected, actual))
    return mismatches


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient(client_config(bootstrap))


def _unreachable(bootstrap: str, what: str, exc: BaseException) -> TopicAdminError:
    return TopicAdminError(
        f"{what} on Kafka at {bootstrap} failed: {exc}. Check the broker is running "
        "(`kinshasa infra status`) and that --bootstrap / KINSHASA_KAFKA_BOOTSTRAP points at it."
    )


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return int(exc.args[0].code())
    return None


def list_topics(bootstrap: str, timeout: float = 30.0) -> dict[str, int]:
    """Every topic on the broker with its partition count (internal `__` topics left out)."""
    try:
        meta = _admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise _unreachable(bootstrap, "listing topics", exc) from exc
    return {name: len(t.partitions) for name, t in meta.topics.items() if not name.startswith("__")}


def describe_topics(bootstrap: str, names: Iterable[str], timeout: float = 30.0) -> dict[str, TopicState]:
    """Partitions, replication factor and configs of each named topic; missing topics are left out."""
    names = sorted(set(names))
    if not names:
        return {}
    admin = _admin(bootstrap)
    return _describe(admin, bootstrap, names, timeout)


def _describe(
    admin: AdminClient, bootstrap: str, names: Sequence[str], timeout: float
) -> dict[str, TopicState]:
    try:
        topic_futures = admin.describe_topics(TopicCollection(list(names)), request_timeout=timeout)
    except KafkaException as exc:
        raise _unreachable(bootstrap, "describing topics", exc) from exc
    shapes: dict[str, tuple[int, int]] = {}
    for name, future in topic_futures.items():
        try:
            description = future.result(timeout=timeout)
        except KafkaException as exc:
            if _error_code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise _unreachable(bootstrap, f"describing topic {name}", exc) from exc
        partitions = description.partitions
        replicas = len(partitions[0].replicas) if partitions else 0
        shapes[name] = (len(partitions), replicas)
    if not shapes:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in shapes]
    try:
        config_futures: dict[Any, Future[Any]] = admin.describe_configs(resources, request_timeout=timeout)
    except KafkaException as exc:
        raise _unreachable(bootstrap, "describing topic configs", exc) from exc
    states: dict[str, TopicState] = {}
    for resource, future in config_futures.items():
        try:
            entries = future.result(timeout=timeout)
        except KafkaException as exc:
            raise _unreachable(bootstrap, f"describing configs of {resource.name}", exc) from exc
        partitions, replicas = shapes[resource.name]
        configs = {key: entry.value for key, entry in entries.items() if entry.value is not None}
        states[resource.name] = TopicState(resource.name, partitions, replicas, configs)
    return states


def _wait_visible(admin: AdminClient, bootstrap: str, names: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(names)
    while waiting:
        try:
            waiting -= set(admin.list_topics(timeout=timeout).topics)
        except KafkaException as exc:
            raise _unreachable(bootstrap, "listing topics", exc) from exc
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise TopicAdminError(
                f"topics {sorted(waiting)} were created but the broker at {bootstrap} still does not list "
                f"them after {timeout}s; check the broker log, then run `kinshasa topics ensure` again"
            )
        time.sleep(0.1)


def ensure_topics(
    bootstrap: str,
    specs: Sequence[TopicSpec],
    replication_factor: int = 1,
    timeout: float = 30.0,
    *,
    min_insync_replicas: int | None = None,
) -> EnsureReport:
    """Create each missing topic of `specs`; report how existing ones differ from their spec.

    `min_insync_replicas`, when given, replaces the specs' own (the catalogue's default is 1), so one
    call creates every topic at a deployment's minimums (`kinshasa topics ensure`).

    Idempotent: a second call creates nothing. A topic another process created between our listing and
    our create (TOPIC_ALREADY_EXISTS) counts as existing and is verified like the others. Existing topics
    are never altered: a mismatch is for an operator to resolve (partitions can only grow, and growing
    them moves keys between partitions, which breaks per-entity order for in-flight messages).
    """
    if min_insync_replicas is not None:
        specs = [replace(spec, configs={**spec.configs, "min.insync.replicas": str(min_insync_replicas)})
                 for spec in specs]
    by_name = {spec.name: spec for spec in specs}
    if len(by_name) != len(specs):
        raise ValueError("specs name the same topic twice: pass each topic once")
    for spec in specs:
        isr = int(spec.configs.get("min.insync.replicas", "1"))
        if isr > replication_factor:
            raise ValueError(
                f"{spec.name}: min.insync.replicas={isr} exceeds replication factor {replication_factor}, "
                "so no acks=all write could ever succeed: raise the replication factor "
                "(KINSHASA_MIN_REPLICATION) or lower min.insync.replicas (KINSHASA_MIN_INSYNC_REPLICAS)"
            )
    admin = _admin(bootstrap)
    try:
        present = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise _unreachable(bootstrap, "listing topics", exc) from exc

    report = EnsureReport()
    existing = [name for name in by_name if name in present]
    missing = [by_name[name] for name in by_name if name not in present]
    if missing:
        new_topics = [NewTopic(spec.name, num_partitions=spec.partitions,
                               replication_factor=replication_factor, config=dict(spec.configs))
                      for spec in missing]
        try:
            futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
        except KafkaException as exc:
            raise _unreachable(bootstrap, "creating topics", exc) from exc
        failures: list[str] = []
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
                report.created.append(name)
            except KafkaException as exc:
                if _error_code(exc) == KafkaError.TOPIC_ALREADY_EXISTS:
                    existing.append(name)
                else:
                    failures.append(f"{name}: {exc}")
        if failures:
            raise TopicAdminError(
                "Kafka refused to create topics: " + "; ".join(failures)
                + ". Fix the cause (broker limits, ACLs, replication factor vs broker count) and run "
                "`kinshasa topics ensure` again; topics already created are kept."
            )

    # The controller acknowledges a create before the broker serves the topic's metadata (seconds, on a
    # busy broker); wait, so a caller can describe, produce to or subscribe to it right away.
    raced = [name for name in existing if name not in present]
    _wait_visible(admin, bootstrap, report.created + raced, timeout)
    states = _describe(admin, bootstrap, existing, timeout) if existing else {}
    for name in sorted(existing):
        report.existing.append(name)
        state = states.get(name)
        if state is None:
            # Deleted between our listing and our describe; the next ensure will create it.
            report.mismatches.append(TopicMismatch(name, "exists", "yes", "no"))
            continue
        report.mismatches.extend(compare(by_name[name], state, replication_factor))
    report.created.sort()
    return report
