"""Components check their topics at start and refuse to run on a topic that is missing or below the
configured minimums, naming each problem; `kinshasa topics ensure` creates the topics, then they start.

Real broker, real components: a service and the coordinator in-process, the gateway in-process, and each
of the three as its own process for its exit code; `kinshasa up`'s ensure step before any process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from typer.testing import CliRunner

from kinshasa.coordinator.runtime import CoordinatorOptions, CoordinatorRuntime
from kinshasa.coordinator.topic_names import CoordinatorTopics
from kinshasa.gateway.app import Gateway
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.launcher import ensure_stack_topics
from kinshasa.services import documents
from kinshasa.services.kit.runtime import ServiceRuntime, ServiceTopics
from kinshasa.settings import CoordinatorSettings, ServiceSettings, StackSettings, service_env_prefix
from kinshasa.topics.admin import describe_topics, ensure_topics, list_topics
from kinshasa.topics.catalogue import (
    RUNS,
    TopicSpec,
    catalogue_topic_spec,
    commands_topic,
    dlq_topic,
    events_topic,
    group_id,
)
from kinshasa.topics.checks import TopicCheckError
from kinshasa.topics.cli import app as topics_app
from kinshasa.topics.producer import AsyncProducer
from tests.conftest import REPO
from tests.integration.services.helpers import Running, command, new_entity_id, read_topic

SERVICE = "documents"


def service_runtime(kafka: KafkaBroker, tmp_path: Path, topics: ServiceTopics,
                    min_replication: int = 1) -> ServiceRuntime:
    """The documents service on `topics`, built directly: no harness creates its topics first."""
    settings = ServiceSettings(_env_prefix=service_env_prefix(SERVICE), admin_port=free_port(),
                               database_url=f"sqlite+aiosqlite:///{tmp_path / 'documents.sqlite3'}")
    return ServiceRuntime(documents.documents, settings=settings, topics=topics, token="t",
                          stack=StackSettings(kafka_bootstrap=kafka.bootstrap, data_dir=tmp_path,
                                              min_replication=min_replication))


async def refusal(runtime: ServiceRuntime | CoordinatorRuntime) -> TopicCheckError:
    """Run `runtime` and return the TopicCheckError its start ended with."""
    with pytest.raises(TopicCheckError) as refused:
        await asyncio.wait_for(runtime.run(asyncio.Event()), 60)
    assert not runtime.ready.is_set()
    return refused.value


def committed(bootstrap: str, group: str, topic: str) -> list[int]:
    """The offsets `group` has committed on `topic`, on every partition it committed on."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        deadline = time.monotonic() + 30
        while True:
            try:
                found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=30)
                break
            except KafkaException as exc:
                # The group's coordinator is found lazily, for a group nobody ever joined too.
                if exc.args[0].code() != KafkaError.NOT_COORDINATOR or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()
    return [tp.offset for tp in found if tp.offset >= 0]


async def test_a_service_missing_a_topic_refuses_to_start_and_consumes_and_produces_nothing(
        kafka: KafkaBroker, tmp_path: Path, unique: str) -> None:
    topics = ServiceTopics.for_service(SERVICE, f"t{unique}")
    await asyncio.to_thread(ensure_topics, kafka.bootstrap,
                            [spec for spec in topics.specs(SERVICE) if spec.name != topics.events])
    entity = new_entity_id()
    async with AsyncProducer(kafka.bootstrap, client_id=f"test-{unique}") as producer:
        await producer.send_envelope(topics.commands, command(
            SERVICE, "create", {"title": "t", "body": "b"}, entity))

    error = await refusal(service_runtime(kafka, tmp_path, topics))

    assert [p.line() for p in error.problems] == [f"{topics.events}: missing"]
    message = str(error)
    assert message.startswith(f"{SERVICE} refuses to start")
    assert f"{topics.events}: missing" in message and "`kinshasa topics ensure`" in message
    # The start ended before the consumer joined and before the declaration was published.
    assert await asyncio.to_thread(committed, kafka.bootstrap, topics.group, topics.commands) == []
    assert await asyncio.to_thread(read_topic, kafka.bootstrap, topics.declarations) == []
    assert topics.events not in await asyncio.to_thread(list_topics, kafka.bootstrap)


async def test_a_service_refuses_a_commands_topic_with_fewer_partitions_than_the_catalogue(
        kafka: KafkaBroker, tmp_path: Path, unique: str) -> None:
    topics = ServiceTopics.for_service(SERVICE, f"t{unique}")
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, [TopicSpec(topics.commands, 2)])
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, topics.specs(SERVICE))  # the rest; never altered

    error = await refusal(service_runtime(kafka, tmp_path, topics))

    assert [p.line() for p in error.problems] == [
        f"{topics.commands}: 2 partition(s), fewer than the 6 the catalogue gives it"]


async def test_below_the_minimum_replication_every_topic_is_named_with_what_it_lacks(
        kafka: KafkaBroker, tmp_path: Path, unique: str) -> None:
    # A single broker's topics have one replica: a deployment that asks for three refuses them all.
    topics = ServiceTopics.for_service(SERVICE, f"t{unique}")
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, topics.specs(SERVICE))

    error = await refusal(service_runtime(kafka, tmp_path, topics, min_replication=3))

    lines = {p.line() for p in error.problems}
    for spec in topics.specs(SERVICE):
        assert f"{spec.name}: replication factor 1, below KINSHASA_MIN_REPLICATION=3" in lines
        # min.insync.replicas defaults to one less than the replication asked for.
        assert f"{spec.name}: min.insync.replicas 1, below KINSHASA_MIN_INSYNC_REPLICAS=2" in lines
    assert len(lines) == 2 * len(topics.specs(SERVICE))


async def test_the_coordinator_refuses_to_start_on_missing_topics_before_it_reaches_temporal(
        kafka: KafkaBroker, tmp_path: Path, unique: str) -> None:
    suffix = f"t{unique}"
    topics = CoordinatorTopics(suffix=suffix)
    # Temporal is nowhere: the refusal comes first.
    stack = StackSettings(kafka_bootstrap=kafka.bootstrap, data_dir=tmp_path,
                          temporal_address=f"127.0.0.1:{free_port()}")
    settings = CoordinatorSettings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", admin_port=0)
    runtime = CoordinatorRuntime(stack=stack, settings=settings, token="t",
                                 options=CoordinatorOptions(topic_suffix=suffix))
    error = await refusal(runtime)
    assert sorted(p.line() for p in error.problems) == sorted(
        f"{name}: missing" for name in (topics.runs, topics.alerts, topics.dlq))
    assert str(error).startswith("coordinator refuses to start")


async def test_the_gateway_refuses_a_catalogue_topic_that_is_not_compacted(
        kafka: KafkaBroker, tmp_path: Path, unique: str) -> None:
    topic = f"kinshasa.catalogue.t{unique}"
    # Created by hand with the broker's default policy: old declarations would be deleted by time.
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, [TopicSpec(topic, 1)])
    gateway = Gateway(GatewayConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}", dev_mode=True,
                                    catalogue_topic=topic, background=False),
                      StackSettings(kafka_bootstrap=kafka.bootstrap, data_dir=tmp_path))
    try:
        with pytest.raises(TopicCheckError) as refused:
            await gateway.start()
    finally:
        await gateway.stop()
    assert [p.line() for p in refused.value.problems] == [
        f"{topic}: cleanup.policy delete, it must be compact"]
    assert gateway.follower is None  # the catalogue was never read


def component_process(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kinshasa.cli", *argv], cwd=REPO, env=os.environ | env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("argv", "code", "component"), [
    (["service", SERVICE, "--topic-suffix", "{suffix}"], 1, SERVICE),
    (["coordinator", "--topic-suffix", "{suffix}"], 1, "coordinator"),
    (["gateway"], 3, "gateway"),  # uvicorn's code for a failed startup
], ids=["service", "coordinator", "gateway"])
def test_a_refusing_component_exits_non_zero_saying_what_to_run(
        kafka: KafkaBroker, tmp_path: Path, unique: str, argv: list[str], code: int, component: str) -> None:
    suffix = f"t{unique}"
    env = {"KINSHASA_KAFKA_BOOTSTRAP": kafka.bootstrap, "KINSHASA_DATA_DIR": str(tmp_path),
           "KINSHASA_LOG_FORMAT": "console", "KINSHASA_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
           # The gateway's shared topics exist on the session broker; on a cluster of three they fall short.
           "KINSHASA_MIN_REPLICATION": "3" if component == "gateway" else "1",
           f"{service_env_prefix(SERVICE)}ADMIN_PORT": str(free_port()),
           "KINSHASA_COORDINATOR_ADMIN_PORT": str(free_port()),
           "KINSHASA_GATEWAY_PORT": str(free_port()), "KINSHASA_GATEWAY_DEV_MODE": "true"}
    done = component_process([a.format(suffix=suffix) for a in argv], env)
    assert done.returncode == code, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert f"{component} refuses to start" in output
    assert "`kinshasa topics ensure`" in output
    assert ("below KINSHASA_MIN_REPLICATION=3" if component == "gateway" else ": missing") in output


async def test_topics_ensure_creates_what_a_refusing_service_lacked_then_it_starts(
        kafka: KafkaBroker, tmp_path: Path, unique: str) -> None:
    suffix = f"t{unique}"
    topics = ServiceTopics.for_service(SERVICE, suffix)
    await refusal(service_runtime(kafka, tmp_path, topics))

    runner = CliRunner()
    args = ["ensure", "--bootstrap", kafka.bootstrap, "--service", SERVICE, "--topic-suffix", suffix]
    first = await asyncio.to_thread(runner.invoke, topics_app, args)
    assert first.exit_code == 0, first.output
    for spec in topics.specs(SERVICE):
        assert f"created   {spec.name}" in first.output
    again = await asyncio.to_thread(runner.invoke, topics_app, args)
    assert again.exit_code == 0, again.output
    assert "0 created" in again.output and "0 mismatches" in again.output

    running = Running(service_runtime(kafka, tmp_path, topics))
    try:
        await running.started()
    finally:
        await running.shutdown()
    assert len(await asyncio.to_thread(read_topic, kafka.bootstrap, topics.declarations)) == 1


def test_topics_ensure_creates_at_the_configured_minimums(
        kafka: KafkaBroker, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # One broker cannot hold three replicas; one replica with min.insync.replicas 1 is all it can check.
    monkeypatch.setenv("KINSHASA_MIN_REPLICATION", "1")
    suffix = f"t{unique}"
    result = CliRunner().invoke(topics_app, ["ensure", "--bootstrap", kafka.bootstrap, "--service", SERVICE,
                                             "--topic-suffix", suffix])
    assert result.exit_code == 0, result.output
    name = catalogue_topic_spec(name=f"kinshasa.catalogue.{suffix}").name
    state = describe_topics(kafka.bootstrap, [name])[name]
    assert (state.replication_factor, state.configs["min.insync.replicas"],
            state.configs["cleanup.policy"]) == (1, "1", "compact")

    monkeypatch.setenv("KINSHASA_MIN_REPLICATION", "3")
    refused = CliRunner().invoke(topics_app, ["ensure", "--bootstrap", kafka.bootstrap, "--service", SERVICE,
                                              "--topic-suffix", f"u{unique}"])
    # The broker says why it cannot: three replicas on one broker.
    assert refused.exit_code == 2, refused.output
    assert "replication factor" in refused.output.lower()


def test_kinshasa_up_makes_the_topics_of_every_service_it_starts_its_own_included(
        kafka: KafkaBroker, tmp_path: Path, unique: str) -> None:
    own = f"svc{unique}"
    lines: list[str] = []
    stack = StackSettings(kafka_bootstrap=kafka.bootstrap, data_dir=tmp_path)
    ensure_stack_topics(stack, [SERVICE, own], lines.append)
    present = list_topics(kafka.bootstrap)
    assert {commands_topic(own), events_topic(own), dlq_topic(group_id(own))} <= set(present)
    assert lines[0].startswith("topics: 3 created, ")

    ensure_stack_topics(stack, [SERVICE, own], lines.append)
    assert lines[1].startswith("topics: 0 created, ")


def test_kinshasa_up_stops_before_any_process_on_topics_its_components_would_refuse(
        kafka: KafkaBroker, tmp_path: Path) -> None:
    # The session broker's topics have one replica; a stack asking for three gets the whole list at once.
    stack = StackSettings(kafka_bootstrap=kafka.bootstrap, data_dir=tmp_path, min_replication=3)
    with pytest.raises(TopicCheckError) as refused:
        ensure_stack_topics(stack, [SERVICE], lambda _line: None)
    assert str(refused.value).startswith("kinshasa up refuses to start")
    assert f"{RUNS}: replication factor 1, below KINSHASA_MIN_REPLICATION=3" in str(refused.value)


def test_topics_ensure_passes_a_grown_topic_and_fails_one_components_would_refuse(
        kafka: KafkaBroker, unique: str) -> None:
    """A deployment waits on `topics ensure`: a topic an operator grew must not keep it from starting."""
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

    grown, shrunk = f"t{unique}", f"u{unique}"
    args = ["ensure", "--bootstrap", kafka.bootstrap, "--service", SERVICE, "--topic-suffix"]
    assert CliRunner().invoke(topics_app, [*args, grown]).exit_code == 0
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    commands_topic = ServiceTopics.for_service(SERVICE, grown).commands
    partitions = describe_topics(kafka.bootstrap, [commands_topic])[commands_topic].partitions
    for future in admin.create_partitions([NewPartitions(commands_topic, partitions + 2)]).values():
        future.result(30)
    deadline = time.monotonic() + 30
    while describe_topics(kafka.bootstrap, [commands_topic])[commands_topic].partitions != partitions + 2:
        assert time.monotonic() < deadline, "the broker never showed the grown topic"
        time.sleep(0.1)

    again = CliRunner().invoke(topics_app, [*args, grown])
    assert again.exit_code == 0, again.output
    assert "1 mismatches" in again.output and commands_topic in again.output
    strict = CliRunner().invoke(topics_app, [*args, grown, "--strict"])
    assert strict.exit_code == 1, strict.output

    # A topic with fewer partitions than the catalogue's is one the service would refuse: ensure says so.
    short = ServiceTopics.for_service(SERVICE, shrunk).commands
    for future in admin.create_topics([NewTopic(short, num_partitions=1, replication_factor=1)]).values():
        future.result(30)
    refused = CliRunner().invoke(topics_app, [*args, shrunk])
    assert refused.exit_code == 1, refused.output
    assert "Components would refuse these topics" in refused.output and short in refused.output
