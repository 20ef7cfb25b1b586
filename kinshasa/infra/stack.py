"""The local infrastructure as one unit: `kinshasa infra up|down|status` and the test fixtures share it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kinshasa.infra.kafka import KafkaBroker, KafkaCluster, kafka_libs, stop_together
from kinshasa.infra.postgres import PostgresCluster
from kinshasa.infra.process import InfraError, ManagedProcess, free_port
from kinshasa.infra.temporal import TemporalServer
from kinshasa.settings import InfraSettings, StackSettings


@dataclass
class ComponentStatus:
    name: str
    address: str
    pid: int | None
    alive: bool
    healthy: bool

    def line(self) -> str:
        state = "healthy" if self.healthy else ("starting/unhealthy" if self.alive else "down")
        return f"{self.name:<10} {state:<18} {self.address:<22} pid={self.pid or '-'}"


def _port_or_free(preferred: int) -> int:
    """`preferred` if nothing holds it, else any free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


@dataclass
class LocalInfra:
    """Kafka, Temporal and (on request) PostgreSQL rooted in one directory.

    The state file records ports so that `status` and `down` from another shell find the same
    processes that `up` started.
    """

    root: Path
    infra: InfraSettings = field(default_factory=InfraSettings)
    cache_dir: Path | None = None

    @classmethod
    def from_settings(cls, stack: StackSettings, infra: InfraSettings) -> LocalInfra:
        return cls(root=stack.data_dir.resolve() / "infra", infra=infra,
                   cache_dir=(infra.cache_dir or stack.data_dir / "cache").resolve())

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def _state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_path.read_text()))
        except (OSError, ValueError):
            return {}

    def _save_state(self, **ports: int | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in (self._state() | ports).items() if v is not None}
        self.state_path.write_text(json.dumps(state, indent=2))

    def kafka(self) -> KafkaBroker:
        state = self._state()
        libs = kafka_libs(self.cache_dir or self.root / "cache", self.infra.kafka_version,
                          self.infra.kafka_home)
        return KafkaBroker(root=self.root / "kafka", libs=libs,
                           port=state.get("kafka_port", self.infra.kafka_port),
                           controller_port=state.get("kafka_controller_port",
                                                     self.infra.kafka_controller_port),
                           heap=self.infra.kafka_heap)

    @property
    def cluster_root(self) -> Path:
        return self.root / "kafka-cluster"

    def kafka_cluster(self, size: int) -> KafkaCluster:
        """`size` Kafka nodes; node 1 on the configured ports, node i on those plus 100 * (i - 1) if free.

        The ports are chosen once, when the cluster is first formatted, and recorded with it.
        """
        libs = kafka_libs(self.cache_dir or self.root / "cache", self.infra.kafka_version,
                          self.infra.kafka_home)
        state = self._state()
        port = state.get("kafka_port", self.infra.kafka_port)
        controller = state.get("kafka_controller_port", self.infra.kafka_controller_port)
        ports = [(port, controller)] + [(_port_or_free(port + 100 * i), _port_or_free(controller + 100 * i))
                                        for i in range(1, size)]
        cluster = KafkaCluster(root=self.cluster_root, libs=libs, size=size, ports=ports,
                               heap=self.infra.kafka_heap)
        if cluster.size != size:
            raise InfraError(f"the Kafka cluster under {self.cluster_root} was formatted with {cluster.size} "
                             f"nodes, not {size}: use --brokers {cluster.size}, or stop it and remove that "
                             "directory to start afresh (its data goes with it)")
        return cluster

    def kafka_brokers(self) -> int:
        """How many Kafka nodes `up` last started (1 unless `up --brokers N` said otherwise)."""
        return int(self._state().get("kafka_brokers", 1))

    def _kafka_pid_files(self) -> list[tuple[str, Path]]:
        """Each Kafka node that may be running, by name and pid file: found without resolving any jar."""
        single = [("kafka", self.root / "kafka" / "kafka.pid")]
        nodes = sorted(self.cluster_root.glob("node-*/kafka.pid"), key=lambda p: p.parent.name)
        return single + [(f"kafka-{p.parent.name.removeprefix('node-')}", p) for p in nodes]

    def _kafka_running(self) -> list[ManagedProcess]:
        processes = [ManagedProcess(name, [], pid.with_name("kafka.log"), pid)
                     for name, pid in self._kafka_pid_files() if pid.exists()]
        return [process for process in processes if process.alive()]

    def _up_kafka(self, brokers: int | None, attached: bool, report: Callable[[str], None],
                  took: dict[str, float]) -> None:
        running = self._kafka_running()
        if brokers is None:
            brokers = self.kafka_brokers() if running else 1
        if brokers < 1:
            raise InfraError(f"--brokers must be at least 1, not {brokers}")
        if running and brokers != self.kafka_brokers():
            raise InfraError(f"Kafka is running with {self.kafka_brokers()} broker(s); run "
                             f"'kinshasa infra down' first to start it with {brokers}")
        if brokers == 1:
            kafka = self.kafka()
            if kafka.process.alive() and kafka.ready():
                report(f"kafka already running on {kafka.bootstrap}")
                return
            t0 = time.monotonic()
            kafka.start(attached=attached, timeout=self.infra.start_timeout_s)
            took["kafka"] = time.monotonic() - t0
            self._save_state(kafka_port=kafka.port, kafka_controller_port=kafka.controller_port,
                             kafka_brokers=None)
            report(f"kafka ready on {kafka.bootstrap} in {took['kafka']:.1f}s")
            return
        cluster = self.kafka_cluster(brokers)
        if len(running) == brokers and cluster.ready():
            report(f"kafka ({brokers} brokers) already running on {cluster.bootstrap}")
            return
        # A node left over from a partial start would hold its ports; start the cluster as one.
        stop_together(running)
        t0 = time.monotonic()
        cluster.start(attached=attached, timeout=self.infra.start_timeout_s)
        took["kafka"] = time.monotonic() - t0
        self._save_state(kafka_brokers=brokers)
        report(f"kafka ({brokers} brokers, replication factor {cluster.nodes[0].replication}, "
               f"min.insync.replicas {cluster.nodes[0].min_insync}) ready on {cluster.bootstrap} "
               f"in {took['kafka']:.1f}s")

    def temporal(self) -> TemporalServer:
        state = self._state()
        server = TemporalServer(root=self.root / "temporal",
                                port=state.get("temporal_port", self.infra.temporal_port))
        if "temporal_http_port" in state:
            server.http_port = state["temporal_http_port"]
        return server

    def postgres(self) -> PostgresCluster:
        state = self._state()
        return PostgresCluster(root=self.root / "postgres",
                               port=state.get("postgres_port", self.infra.postgres_port))

    def up(self, with_postgres: bool = False, attached: bool = False,
           report: Callable[[str], None] = print, brokers: int | None = None) -> dict[str, float]:
        """Start whatever is not running; return seconds each start took.

        `brokers` Kafka nodes (default: as many as are running, else 1); with 3, a KRaft cluster whose
        topics default to replication factor 3 and min.insync.replicas 2.
        """
        took: dict[str, float] = {}
        self._up_kafka(brokers, attached, report, took)
        temporal = self.temporal()
        if temporal.process.alive() and temporal.ready():
            report(f"temporal already running on {temporal.address}")
        else:
            t0 = time.monotonic()
            temporal.start(attached=attached, timeout=self.infra.start_timeout_s)
            took["temporal"] = time.monotonic() - t0
            self._save_state(temporal_port=temporal.port, temporal_http_port=temporal.http_port)
            report(f"temporal ready on {temporal.address} in {took['temporal']:.1f}s")
        if with_postgres:
            pg = self.postgres()
            if pg.process.alive() and pg.ready():
                report(f"postgres already running: {pg.url}")
            else:
                t0 = time.monotonic()
                pg.start(attached=attached, timeout=self.infra.start_timeout_s)
                took["postgres"] = time.monotonic() - t0
                self._save_state(postgres_port=pg.port)
                report(f"postgres ready in {took['postgres']:.1f}s: {pg.url}")
        return took

    def status(self) -> list[ComponentStatus]:
        rows: list[ComponentStatus] = []
        try:
            brokers = self.kafka_brokers()
            nodes = [self.kafka()] if brokers == 1 else self.kafka_cluster(brokers).nodes
            for node in nodes:
                alive = node.process.alive()
                rows.append(ComponentStatus(node.process.name, node.bootstrap, node.process.pid, alive,
                                            alive and node.ready()))
        except InfraError as exc:
            rows.append(ComponentStatus("kafka", str(exc)[:60], None, False, False))
        temporal = self.temporal()
        alive = temporal.process.alive()
        rows.append(ComponentStatus("temporal", temporal.address, temporal.process.pid, alive,
                                    alive and temporal.ready()))
        pg = self.postgres()
        if pg.process.pid is not None or "postgres_port" in self._state():
            alive = pg.process.alive()
            rows.append(ComponentStatus("postgres", f"127.0.0.1:{pg.port}", pg.process.pid, alive,
                                        alive and pg.ready()))
        return rows

    def down(self, report: Callable[[str], None] = print) -> None:
        for name, process in (("postgres", self.postgres().process),
                              ("temporal", self.temporal().process)):
            if process.alive():
                process.stop()
                report(f"{name} stopped")
        # Building the brokers would resolve jars; stopping needs only their pid files.
        running = self._kafka_running()
        stop_together(running)
        for process in running:
            report(f"{process.name} stopped")
        for _, pid_file in self._kafka_pid_files():
            pid_file.unlink(missing_ok=True)
        if self.state_path.exists():
            self._save_state(kafka_brokers=None)
