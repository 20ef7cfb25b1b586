"""Topic checks at start: a component verifies the topics it uses against the configured minimums and
refuses to start on any that falls short; only `kinshasa topics ensure` creates topics.

A component that created its own topics would, on a cluster, create them with whatever replication it
was given, and the first one up would decide for everyone; one that trusted what it found would run on an
under-replicated topic and learn it when a broker dies. So each reads what the broker holds and names
every shortfall before it consumes or produces anything.

Blocking, like the admin calls it rests on: from async code, `await asyncio.to_thread(check_topics, ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kinshasa.settings import StackSettings
from kinshasa.topics.admin import TopicMismatch, TopicState, describe_topics
from kinshasa.topics.catalogue import TopicSpec

MIN_INSYNC = "min.insync.replicas"
CLEANUP = "cleanup.policy"
# The broker's own default, for a topic whose description somehow leaves it out.
_BROKER_DEFAULT_INSYNC = "1"


@dataclass(frozen=True)
class TopicMinimums:
    """The least every topic must have: KINSHASA_MIN_REPLICATION and KINSHASA_MIN_INSYNC_REPLICAS."""

    replication: int = 1
    insync_replicas: int = 1

    def __post_init__(self) -> None:
        if self.replication < 1 or self.insync_replicas < 1:
            raise ValueError(f"KINSHASA_MIN_REPLICATION ({self.replication}) and "
                             f"KINSHASA_MIN_INSYNC_REPLICAS ({self.insync_replicas}) must each be at least 1")
        if self.insync_replicas > self.replication:
            raise ValueError(
                f"KINSHASA_MIN_INSYNC_REPLICAS={self.insync_replicas} exceeds KINSHASA_MIN_REPLICATION="
                f"{self.replication}: a topic with the minimum replication could never take an acks=all "
                "write; lower the first or raise the second")

    @classmethod
    def from_settings(cls, stack: StackSettings, replication: int | None = None,
                      insync_replicas: int | None = None) -> TopicMinimums:
        """The stack's minimums, or those given in their place; min.insync.replicas defaults to one less
        than the replication factor (at least 1)."""
        if replication is None:
            replication = stack.min_replication
        if insync_replicas is None:
            insync_replicas = stack.min_insync_replicas
        return cls(replication, max(1, replication - 1) if insync_replicas is None else insync_replicas)


@dataclass(frozen=True)
class TopicProblem:
    """One reason a topic cannot be used as it is."""

    topic: str
    reason: str

    def line(self) -> str:
        return f"{self.topic}: {self.reason}"


class TopicCheckError(RuntimeError):
    """A topic the component uses is missing or below the minimums: the component does not start."""

    def __init__(self, component: str, problems: Sequence[TopicProblem]) -> None:
        self.component = component
        self.problems = list(problems)
        lines = "\n".join(f"  - {p.line()}" for p in self.problems)
        super().__init__(
            f"{component} refuses to start: {len(self.problems)} problem(s) with the topics it uses, and "
            f"nothing was consumed or produced:\n{lines}\n"
            "Run `kinshasa topics ensure` against this broker with this deployment's "
            "KINSHASA_MIN_REPLICATION (add --service NAME for a service of your own, --topic-suffix S for "
            "an isolated copy) to create missing topics. It never alters an existing topic: raise a "
            "replication factor with kafka-reassign-partitions, min.insync.replicas with kafka-configs, or "
            "delete the topic and ensure it again.")


def topic_problems(spec: TopicSpec, state: TopicState | None, minimums: TopicMinimums) -> list[TopicProblem]:
    """Why `state` cannot serve as `spec` under `minimums`; empty when it can.

    More partitions, more replicas or a higher min.insync.replicas than asked for are fine: an operator
    may have grown them. Fewer partitions than the catalogue's would put keys where no reader of the
    catalogue's count expects them; a compacted command log would drop commands, a deleting catalogue
    topic would forget services.
    """
    if state is None:
        return [TopicProblem(spec.name, "missing")]
    problems: list[TopicProblem] = []
    if state.partitions < spec.partitions:
        problems.append(TopicProblem(spec.name, f"{state.partitions} partition(s), fewer than the "
                                                f"{spec.partitions} the catalogue gives it"))
    if state.replication_factor < minimums.replication:
        problems.append(TopicProblem(spec.name, f"replication factor {state.replication_factor}, below "
                                                f"KINSHASA_MIN_REPLICATION={minimums.replication}"))
    insync = int(state.configs.get(MIN_INSYNC, _BROKER_DEFAULT_INSYNC))
    if insync < minimums.insync_replicas:
        problems.append(TopicProblem(spec.name, f"min.insync.replicas {insync}, below "
                                                f"KINSHASA_MIN_INSYNC_REPLICAS={minimums.insync_replicas}"))
    if insync > state.replication_factor:
        problems.append(TopicProblem(spec.name, f"min.insync.replicas {insync} exceeds its replication "
                                                f"factor {state.replication_factor}: no acks=all write can "
                                                "succeed"))
    wanted = spec.configs.get(CLEANUP)
    if wanted is not None and state.configs.get(CLEANUP) != wanted:
        problems.append(TopicProblem(spec.name, f"cleanup.policy {state.configs.get(CLEANUP)}, it must be "
                                                f"{wanted}"))
    return problems


def check_topics(
    bootstrap: str,
    specs: Sequence[TopicSpec],
    minimums: TopicMinimums,
    *,
    component: str,
    timeout: float = 30.0,
) -> list[TopicMismatch]:
    """Raise TopicCheckError naming every topic of `specs` that is missing or falls short of `minimums`.

    Returns the differences from the catalogue a component can run with (a retention, more partitions),
    for it to log. Raises TopicAdminError when the broker does not answer.
    """
    states = describe_topics(bootstrap, [spec.name for spec in specs], timeout=timeout)
    problems: list[TopicProblem] = []
    tolerated: list[TopicMismatch] = []
    for spec in specs:
        state = states.get(spec.name)
        problems.extend(topic_problems(spec, state, minimums))
        if state is None:
            continue
        if state.partitions > spec.partitions:
            tolerated.append(TopicMismatch(spec.name, "partitions", str(spec.partitions),
                                           str(state.partitions)))
        for key, expected in sorted(spec.configs.items()):
            if key not in (MIN_INSYNC, CLEANUP) and state.configs.get(key) != expected:
                tolerated.append(TopicMismatch(spec.name, key, expected, state.configs.get(key)))
    if problems:
        raise TopicCheckError(component, problems)
    return tolerated
