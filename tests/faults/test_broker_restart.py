"""A lone broker restarted after a crash that gives up registering with its controller is launched again,
and answers; one that exits for another reason is not."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from kinshasa.infra import kafka
from kinshasa.infra.kafka import GAVE_UP_REGISTERING, KafkaBroker, kafka_libs
from kinshasa.infra.process import InfraError, ManagedProcess, free_port
from kinshasa.settings import InfraSettings
from kinshasa.testing import PluginSettings

# A controller that keeps a dead node's session for two minutes, and a node that waits only 4 s to
# register: restarted after a crash, the node gives up.
IMPATIENT = {"broker.session.timeout.ms": "120000", "initial.broker.registration.timeout.ms": "4000"}


@dataclass
class _ImpatientAfterItsFirstStart(KafkaBroker):
    """Kafka's defaults for its first launch, impatient for the `impatient_launches` after it, then the
    defaults again."""

    impatient_launches: int = 1
    launches: int = 0

    def launch(self, attached: bool) -> ManagedProcess:
        self.launches += 1
        self.overrides = IMPATIENT if 1 < self.launches <= 1 + self.impatient_launches else {}
        return super().launch(attached)


def _node(root: Path, impatient_launches: int) -> _ImpatientAfterItsFirstStart:
    infra = InfraSettings()
    return _ImpatientAfterItsFirstStart(root=root, port=free_port(), controller_port=free_port(),
                                        libs=kafka_libs(PluginSettings().cache_dir, infra.kafka_version,
                                                        infra.kafka_home),
                                        impatient_launches=impatient_launches)


def _log(node: KafkaBroker) -> str:
    return node.process.log_path.read_text(errors="replace")


def test_a_restarted_broker_that_gave_up_registering_is_launched_again(tmp_path: Path) -> None:
    node = _node(tmp_path / "kafka", impatient_launches=1)
    node.start(attached=True)
    try:
        assert GAVE_UP_REGISTERING not in _log(node)
        node.kill()
        node.start(attached=True)
        assert node.launches == 3  # the first start, the impatient launch, the one that registered
        assert _log(node).count(GAVE_UP_REGISTERING) == 1
        assert node.ready()
    finally:
        node.stop()


def test_a_broker_that_keeps_giving_up_fails_after_its_attempts(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "START_ATTEMPTS", 2)  # two are enough to show it, in less time than three
    node = _node(tmp_path / "kafka", impatient_launches=2)
    node.start(attached=True)
    try:
        node.kill()
        with pytest.raises(InfraError, match="exited during start-up"):
            node.start(attached=True)
        assert node.launches == 3  # the first start, then two launches
        assert _log(node).count(GAVE_UP_REGISTERING) == 2
    finally:
        node.stop()


def test_a_broker_that_exits_for_another_reason_is_not_launched_again(tmp_path: Path) -> None:
    node = _node(tmp_path / "kafka", impatient_launches=0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", node.port))  # its listener's port, taken
        taken.listen()
        try:
            with pytest.raises(InfraError, match="exited during start-up"):
                node.start(attached=True)
        finally:
            node.stop()
    assert node.launches == 1
    assert GAVE_UP_REGISTERING not in _log(node)
