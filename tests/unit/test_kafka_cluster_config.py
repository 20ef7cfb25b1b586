"""The three-node Kafka cluster's generated configuration: one quorum, its own ports and data per node,
replication factor 3 and min.insync.replicas 2, and a layout that survives a restart (no process starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinshasa.infra.kafka import KafkaBroker, KafkaCluster
from kinshasa.infra.process import InfraError
from kinshasa.infra.stack import LocalInfra
from kinshasa.settings import InfraSettings

PORTS = [(19092, 19093), (19192, 19193), (19292, 19293)]


def _cluster(root: Path, ports: list[tuple[int, int]] | None = None) -> KafkaCluster:
    return KafkaCluster(root=root, libs=root / "libs", size=3, ports=ports or PORTS)


def test_each_node_is_broker_and_controller_of_one_quorum_with_own_ports_and_data(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    configs = [node.config() for node in cluster.nodes]
    assert [c["node.id"] for c in configs] == ["1", "2", "3"]
    assert {c["process.roles"] for c in configs} == {"broker,controller"}
    assert {c["controller.quorum.bootstrap.servers"] for c in configs} == {
        "127.0.0.1:19093,127.0.0.1:19193,127.0.0.1:19293"}
    assert all("controller.quorum.voters" not in c for c in configs)  # a dynamic quorum
    assert [c["listeners"] for c in configs] == [
        f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}" for port, controller in PORTS]
    assert len({c["log.dirs"] for c in configs}) == 3
    assert cluster.bootstrap == "127.0.0.1:19092,127.0.0.1:19192,127.0.0.1:19292"


def test_new_and_internal_topics_default_to_three_replicas_and_two_in_sync(tmp_path: Path) -> None:
    for config in (node.config() for node in _cluster(tmp_path).nodes):
        assert (config["default.replication.factor"], config["offsets.topic.replication.factor"],
                config["transaction.state.log.replication.factor"],
                config["share.coordinator.state.topic.replication.factor"]) == ("3", "3", "3", "3")
        assert (config["min.insync.replicas"], config["transaction.state.log.min.isr"],
                config["share.coordinator.state.topic.min.isr"]) == ("2", "2", "2")
        assert config["unclean.leader.election.enable"] == "false"


def test_every_node_is_formatted_with_the_same_cluster_id_and_initial_controllers(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    args = [node.format_args() for node in cluster.nodes]
    assert all("--standalone" not in a for a in args)
    initial = {a[a.index("--initial-controllers") + 1] for a in args}
    cluster_ids = {a[a.index("-t") + 1] for a in args}
    assert len(initial) == 1 and len(cluster_ids) == 1
    voters = initial.pop().split(",")
    assert [v.rsplit(":", 2)[0] for v in voters] == ["1@127.0.0.1", "2@127.0.0.1", "3@127.0.0.1"]
    assert [int(v.rsplit(":", 2)[1]) for v in voters] == [c for _, c in PORTS]
    assert len({v.rsplit(":", 1)[1] for v in voters}) == 3  # one metadata directory id per node
    assert all("-g" in a for a in args)  # formatting again on restart keeps the data


def test_a_single_broker_keeps_its_standalone_quorum_and_replication_factor_one(tmp_path: Path) -> None:
    broker = KafkaBroker(root=tmp_path, libs=tmp_path)
    assert "--standalone" in broker.format_args()
    config = broker.config()
    assert (config["node.id"], config["default.replication.factor"], config["min.insync.replicas"]) == (
        "1", "1", "1")
    assert broker.process.name == "kafka"


def test_the_recorded_layout_wins_over_ports_given_later(tmp_path: Path) -> None:
    first = _cluster(tmp_path)
    again = _cluster(tmp_path, ports=[(1, 2), (3, 4), (5, 6)])
    assert again.bootstrap == first.bootstrap
    assert [n.format_args() for n in again.nodes] == [n.format_args() for n in first.nodes]


def test_local_infra_puts_node_one_on_the_configured_ports_and_refuses_another_size(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    libs = cache / "kafka-4.1.1" / "libs"
    libs.mkdir(parents=True)
    (libs / ".complete").write_text("4.1.1")
    infra = LocalInfra(root=tmp_path / "infra", cache_dir=cache,
                       infra=InfraSettings(kafka_port=29092, kafka_controller_port=29093,
                                           kafka_version="4.1.1"))
    cluster = infra.kafka_cluster(3)
    assert cluster.nodes[0].bootstrap == "127.0.0.1:29092"
    assert cluster.nodes[0].controller_port == 29093
    assert [n.process.name for n in cluster.nodes] == ["kafka-1", "kafka-2", "kafka-3"]
    assert infra.kafka_brokers() == 1  # nothing started yet
    with pytest.raises(InfraError, match="--brokers 3"):
        infra.kafka_cluster(5)
