"""What a component refuses in a topic, as a pure decision over what the broker describes."""

from __future__ import annotations

import pytest

from kinshasa.coordinator.topic_names import CoordinatorTopics
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.settings import StackSettings
from kinshasa.topics.admin import TopicState
from kinshasa.topics.catalogue import (
    TopicNameError,
    catalogue,
    catalogue_topic_spec,
    commands_topic,
    with_suffix,
)
from kinshasa.topics.checks import TopicCheckError, TopicMinimums, TopicProblem, topic_problems

COMMANDS = next(spec for spec in catalogue(["documents"]) if spec.name == commands_topic("documents"))
CLUSTER = TopicMinimums(replication=3, insync_replicas=2)


def state(partitions: int = 6, replicas: int = 3, insync: str = "2", cleanup: str = "delete") -> TopicState:
    return TopicState(COMMANDS.name, partitions, replicas,
                      {"min.insync.replicas": insync, "cleanup.policy": cleanup, "retention.ms": "-1"})


def reasons(found: TopicState | None, minimums: TopicMinimums = CLUSTER) -> list[str]:
    return [p.reason for p in topic_problems(COMMANDS, found, minimums)]


def test_a_topic_at_the_minimums_or_above_them_is_accepted() -> None:
    assert reasons(state()) == []
    # Grown by an operator: more partitions, replicas and in-sync replicas than asked for.
    assert reasons(state(partitions=12, replicas=5, insync="3")) == []


def test_each_shortfall_is_named_with_the_setting_it_misses() -> None:
    assert reasons(None) == ["missing"]
    assert reasons(state(partitions=3)) == ["3 partition(s), fewer than the 6 the catalogue gives it"]
    assert reasons(state(replicas=2)) == ["replication factor 2, below KINSHASA_MIN_REPLICATION=3"]
    assert reasons(state(insync="1")) == ["min.insync.replicas 1, below KINSHASA_MIN_INSYNC_REPLICAS=2"]
    assert reasons(state(replicas=1, insync="1")) == [
        "replication factor 1, below KINSHASA_MIN_REPLICATION=3",
        "min.insync.replicas 1, below KINSHASA_MIN_INSYNC_REPLICAS=2",
    ]


def test_an_insync_minimum_above_the_replicas_is_refused_even_when_the_minimums_are_low() -> None:
    # No acks=all write could ever be acknowledged on such a topic.
    assert reasons(state(replicas=1, insync="2"), TopicMinimums()) == [
        "min.insync.replicas 2 exceeds its replication factor 1: no acks=all write can succeed"]


def test_the_cleanup_policy_must_be_the_catalogues() -> None:
    assert reasons(state(cleanup="compact")) == ["cleanup.policy compact, it must be delete"]
    spec = catalogue_topic_spec()
    deleting = TopicState(spec.name, 1, 1, {"cleanup.policy": "delete", "min.insync.replicas": "1"})
    assert [p.reason for p in topic_problems(spec, deleting, TopicMinimums())] == [
        "cleanup.policy delete, it must be compact"]


def test_the_refusal_lists_every_problem_and_what_to_run() -> None:
    error = TopicCheckError("gateway", [TopicProblem("kinshasa.runs", "missing"),
                                        TopicProblem("kinshasa.alerts", "replication factor 1, below X")])
    message = str(error)
    assert message.startswith("gateway refuses to start: 2 problem(s)")
    assert "  - kinshasa.runs: missing\n  - kinshasa.alerts: replication factor 1, below X\n" in message
    assert "`kinshasa topics ensure`" in message and "never alters an existing topic" in message


def test_minimums_come_from_the_stack_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TopicMinimums.from_settings(StackSettings()) == TopicMinimums(1, 1)
    monkeypatch.setenv("KINSHASA_MIN_REPLICATION", "3")
    # min.insync.replicas one below the replication: a write survives losing one broker of three.
    assert TopicMinimums.from_settings(StackSettings()) == TopicMinimums(3, 2)
    monkeypatch.setenv("KINSHASA_MIN_INSYNC_REPLICAS", "3")
    assert TopicMinimums.from_settings(StackSettings()) == TopicMinimums(3, 3)
    given = TopicMinimums.from_settings(StackSettings(), replication=5, insync_replicas=None)
    assert given == TopicMinimums(5, 3)


def test_an_insync_minimum_above_the_replication_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="KINSHASA_MIN_INSYNC_REPLICAS=2 exceeds KINSHASA_MIN_REPLICATION=1"):
        TopicMinimums(replication=1, insync_replicas=2)


@pytest.mark.parametrize("service", ["documents", "ledger"])
def test_a_suffixed_catalogue_names_the_topics_suffixed_components_check(service: str) -> None:
    suffixed = {with_suffix(spec, "abc").name: with_suffix(spec, "abc") for spec in catalogue([service])}
    checked = [*ServiceTopics.for_service(service, "abc").specs(service), *CoordinatorTopics("abc").specs()]
    for spec in checked:
        assert suffixed[spec.name] == spec


def test_a_suffix_is_a_name_not_a_path() -> None:
    with pytest.raises(TopicNameError, match="invalid topic suffix"):
        with_suffix(COMMANDS, "Bad.Suffix")
