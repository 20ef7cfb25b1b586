"""A Kafka broker or cluster of a fault test's own: the test kills or pauses it, not the session's."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from kinshasa.infra.kafka import KafkaBroker, KafkaCluster, kafka_libs
from kinshasa.infra.process import free_port
from kinshasa.settings import InfraSettings
from kinshasa.testing import PluginSettings


@contextmanager
def own_broker(root: Path, overrides: Mapping[str, str] | None = None) -> Iterator[KafkaBroker]:
    infra = InfraSettings()
    broker = KafkaBroker(root=root, port=free_port(), controller_port=free_port(),
                         libs=kafka_libs(PluginSettings().cache_dir, infra.kafka_version, infra.kafka_home),
                         overrides=dict(overrides or {}))
    broker.start(attached=True)
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def own_cluster(root: Path, heap: str = "384m") -> Iterator[KafkaCluster]:
    """Three broker+controller nodes, replication factor 3 and min.insync.replicas 2 by default.

    A dead node is fenced after 6 s without a heartbeat instead of Kafka's 9 s, so the test waits less
    for the partitions it followed to shrink their ISR; still well above a JVM pause on a busy machine.
    """
    infra = InfraSettings()
    cluster = KafkaCluster(root=root, libs=kafka_libs(PluginSettings().cache_dir, infra.kafka_version,
                                                       infra.kafka_home),
                           size=3, heap=heap,
                           overrides={"broker.session.timeout.ms": "6000",
                                      "broker.heartbeat.interval.ms": "1500"})
    cluster.start(attached=True)
    try:
        yield cluster
    finally:
        cluster.stop()


def broker_pid(broker: KafkaBroker) -> int:
    pid = broker.process.pid
    assert pid is not None, "the broker is not running"
    return pid
