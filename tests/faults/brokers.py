"""A Kafka broker of a fault test's own: the test kills or pauses it, so it cannot be the session's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kinshasa.infra.kafka import KafkaBroker, kafka_libs
from kinshasa.infra.process import free_port
from kinshasa.settings import InfraSettings
from kinshasa.testing import PluginSettings


@contextmanager
def own_broker(root: Path) -> Iterator[KafkaBroker]:
    infra = InfraSettings()
    broker = KafkaBroker(root=root, port=free_port(), controller_port=free_port(),
                         libs=kafka_libs(PluginSettings().cache_dir, infra.kafka_version, infra.kafka_home))
    broker.start(attached=True)
    try:
        yield broker
    finally:
        broker.stop()


def broker_pid(broker: KafkaBroker) -> int:
    pid = broker.process.pid
    assert pid is not None, "the broker is not running"
    return pid
