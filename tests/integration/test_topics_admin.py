"""Topic creation against the real broker: idempotent, race-tolerant, and loud about drifted topics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from typer.testing import CliRunner

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.topics.admin import (
    TopicAdminError,
    TopicMismatch,
    describe_topics,
    ensure_topics,
    list_topics,
)
from kinshasa.topics.catalogue import TopicSpec, catalogue, commands_topic, dlq_topic, events_topic, group_id
from kinshasa.topics.cli import app


def test_catalogue_created_once_then_only_verified(kafka: KafkaBroker, unique: str) -> None:
    service = f"svc{unique}"
    specs = catalogue(services=[service], groups=[group_id(service)])
    own = {commands_topic(service), events_topic(service), dlq_topic(group_id(service))}

    first = ensure_topics(kafka.bootstrap, specs)
    # kinshasa.runs/alerts are shared with other tests on this broker, so they may exist already.
    assert own <= set(first.created)
    assert set(first.created) | set(first.existing) == {s.name for s in specs}
    assert first.mismatches == []

    second = ensure_topics(kafka.bootstrap, specs)
    assert second.created == []
    assert sorted(second.existing) == sorted(s.name for s in specs)
    assert second.ok

    states = describe_topics(kafka.bootstrap, own)
    assert states[commands_topic(service)].partitions == 6
    assert states[commands_topic(service)].configs["retention.ms"] == "-1"
    assert states[dlq_topic(group_id(service))].partitions == 1


def test_full_default_catalogue_is_idempotent(kafka: KafkaBroker) -> None:
    specs = catalogue()
    ensure_topics(kafka.bootstrap, specs)
    again = ensure_topics(kafka.bootstrap, specs)
    assert again.created == []
    assert again.mismatches == []
    assert set(again.existing) == {s.name for s in specs}


def test_drifted_topic_is_reported_not_altered(kafka: KafkaBroker, unique: str) -> None:
    name = f"test.drift.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(name, 2, {"retention.ms": "-1"})])

    wanted = TopicSpec(name, 3, {"retention.ms": "86400000", "cleanup.policy": "delete"})
    report = ensure_topics(kafka.bootstrap, [wanted])

    assert report.created == []
    assert report.existing == [name]
    assert report.mismatches == [
        TopicMismatch(name, "partitions", "3", "2"),
        TopicMismatch(name, "retention.ms", "86400000", "-1"),
    ]
    assert not report.ok
    state = describe_topics(kafka.bootstrap, [name])[name]
    assert state.partitions == 2
    assert state.configs["retention.ms"] == "-1"


def test_concurrent_ensures_create_each_topic_once(kafka: KafkaBroker, unique: str) -> None:
    specs = [TopicSpec(f"test.race.{unique}.{i}", 2) for i in range(5)]
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda _: ensure_topics(kafka.bootstrap, specs), range(4)))
    created = [name for r in reports for name in r.created]
    assert sorted(created) == sorted(s.name for s in specs)  # TOPIC_ALREADY_EXISTS counted as existing
    for report in reports:
        assert set(report.created) | set(report.existing) == {s.name for s in specs}
        assert report.mismatches == []


def test_missing_topics_are_left_out_of_describe(kafka: KafkaBroker, unique: str) -> None:
    name = f"test.present.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(name, 1)])
    states = describe_topics(kafka.bootstrap, [name, f"test.absent.{unique}"])
    assert list(states) == [name]
    assert states[name].replication_factor == 1
    assert list_topics(kafka.bootstrap)[name] == 1


def test_impossible_min_insync_replicas_is_refused(kafka: KafkaBroker, unique: str) -> None:
    spec = TopicSpec(f"test.isr.{unique}", 1, {"min.insync.replicas": "2"})
    with pytest.raises(ValueError, match="replication factor"):
        ensure_topics(kafka.bootstrap, [spec], replication_factor=1)
    assert f"test.isr.{unique}" not in list_topics(kafka.bootstrap)


def test_unreachable_broker_says_what_to_check() -> None:
    with pytest.raises(TopicAdminError, match="kinshasa infra status"):
        ensure_topics(f"127.0.0.1:{free_port()}", [TopicSpec("test.nowhere", 1)], timeout=1.0)


def test_cli_ensure_and_list(kafka: KafkaBroker) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["ensure", "--bootstrap", kafka.bootstrap])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["ensure", "--bootstrap", kafka.bootstrap])
    assert second.exit_code == 0, second.output
    assert f"0 created, {len(catalogue())} existing, 0 mismatches" in second.output

    listed = runner.invoke(app, ["list", "--bootstrap", kafka.bootstrap])
    assert listed.exit_code == 0, listed.output
    assert commands_topic("documents") in listed.output
    assert "missing" not in listed.output

    down = runner.invoke(app, ["list", "--bootstrap", f"127.0.0.1:{free_port()}", "--timeout", "1"])
    assert down.exit_code == 2
    assert "kinshasa infra status" in down.output


def test_cli_ensure_exits_1_on_drift(kafka: KafkaBroker, unique: str) -> None:
    service = f"svc{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(commands_topic(service), 2)])
    result = CliRunner().invoke(app, ["ensure", "--bootstrap", kafka.bootstrap, "--service", service])
    assert result.exit_code == 1, result.output
    assert f"MISMATCH  {commands_topic(service)}: partitions is 2 on the broker, the catalogue says 6" \
        in result.output
    assert f"created   {events_topic(service)}" in result.output
    assert "never altered" in result.output

    bad = CliRunner().invoke(app, ["ensure", "--bootstrap", kafka.bootstrap, "--service", "Bad-Name"])
    assert bad.exit_code == 2
    assert "invalid service name" in bad.output
