"""Apache Kafka's own broker in KRaft mode, one node or a cluster, its jars fetched from Maven Central."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient

from kinshasa.infra.maven import fetch_jars
from kinshasa.infra.process import InfraError, ManagedProcess, free_port, port_open, wait_until

_LOG4J2 = """<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="WARN"/>
    <Logger name="org.apache.kafka" level="WARN"/>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <!-- A node's registration, a few lines a start, so one that cannot register says why. -->
    <Logger name="kafka.server.BrokerLifecycleManager" level="INFO"/>
    <Logger name="org.apache.kafka.controller.QuorumController" level="INFO"/>
    <Logger name="org.apache.kafka.controller.ClusterControlManager" level="INFO"/>
    <Logger name="org.apache.kafka.controller.BrokerHeartbeatManager" level="INFO"/>
    <Root level="INFO"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""

NO_MAVEN = (
    "Kafka's jars are fetched with Maven ('mvn'), which is not on PATH. Either install Maven "
    "(Debian: apt-get install maven), or download the official Apache Kafka binary tarball, "
    "unpack it and set KAFKA_HOME to its directory, or run the whole stack with "
    "'docker compose up' if you have Docker."
)


def kafka_libs(cache_dir: Path, version: str, kafka_home: Path | None) -> Path:
    """The directory of broker jars: KAFKA_HOME/libs, or a Maven download cached per version.

    The cache is filled once (Maven itself caches in ~/.m2 too), so later starts are offline.
    """
    if kafka_home is not None:
        libs = kafka_home / "libs"
        if not any(libs.glob("kafka_*.jar")):
            raise InfraError(f"KAFKA_HOME={kafka_home} has no libs/kafka_*.jar; point it at an "
                             "unpacked Apache Kafka binary tarball.")
        return libs
    return fetch_jars("kafka/pom.xml", cache_dir / f"kafka-{version}" / "libs", {"kafka.version": version},
                      what=f"the Kafka broker {version}", no_maven=NO_MAVEN)


def _kafka_uuid() -> str:
    """A base64url UUID without padding, as Kafka's cluster and directory ids are."""
    # One starting with '-' would be read by StorageTool as an option.
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):
            return value


@dataclass(frozen=True)
class Voter:
    """One controller of a quorum: its node id, controller port and metadata directory id."""

    node_id: int
    controller_port: int
    directory_id: str


@dataclass(frozen=True)
class Quorum:
    """The controllers every node of a cluster is formatted with and finds its peers through."""

    cluster_id: str
    voters: tuple[Voter, ...]

    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{v.controller_port}" for v in self.voters)

    def initial_controllers(self) -> str:
        """StorageTool's `--initial-controllers` value: the same on every node (id@host:port:directory)."""
        return ",".join(f"{v.node_id}@127.0.0.1:{v.controller_port}:{v.directory_id}" for v in self.voters)


# What a node logs as it exits because it could not register with its controller in time.
GAVE_UP_REGISTERING = "unable to register with the controller quorum"
START_ATTEMPTS = 3


@dataclass
class KafkaBroker:
    """One broker+controller on loopback, with its data, config and log under `root`.

    Alone (`quorum=None`) it is a single-node dynamic quorum formatted `--standalone`; as a node of a
    `KafkaCluster` it joins the cluster's quorum and replicates internal topics `replication` times.
    """

    root: Path
    libs: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    node_id: int = 1
    quorum: Quorum | None = None
    replication: int = 1
    min_insync: int = 1
    overrides: Mapping[str, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="kafka" if self.quorum is None else f"kafka-{self.node_id}",
            argv=[
                "java", f"-Xms{self.heap}", f"-Xmx{self.heap}", "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dkafka.logs.dir={self.root / 'logs'}",
                f"-Dlog4j2.configurationFile={self.root / 'log4j2.xml'}",
                "-cp", f"{self.libs}/*", "kafka.Kafka", str(self.root / "server.properties"),
            ],
            log_path=self.root / "kafka.log",
            pid_path=self.root / "kafka.pid",
        )

    def config(self) -> dict[str, str]:
        """This node's server.properties."""
        data = self.root / "data"
        rf, isr = str(self.replication), str(self.min_insync)
        voters = (self.quorum.bootstrap_servers() if self.quorum is not None
                  else f"127.0.0.1:{self.controller_port}")
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.bootstrap.servers": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            # New topics and internal ones alike: a write acknowledged with acks=all is on `min_insync`
            # nodes, so it survives losing any one of them.
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "unclean.leader.election.enable": "false",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        return props | dict(self.overrides)

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "server.properties").write_text(
            "".join(f"{k}={v}\n" for k, v in self.config().items()))
        (self.root / "log4j2.xml").write_text(_LOG4J2)

    def format_args(self) -> list[str]:
        """StorageTool's arguments; `-g` makes a second format a no-op, so restarts keep the data."""
        if self.quorum is not None:
            cid, quorum = self.quorum.cluster_id, ["--initial-controllers", self.quorum.initial_controllers()]
        else:
            cluster_id_file = self.root / "cluster.id"
            if not cluster_id_file.exists():
                cluster_id_file.write_text(_kafka_uuid())
            cid, quorum = cluster_id_file.read_text().strip(), ["--standalone"]
        return ["format", *quorum, "-t", cid, "-c", str(self.root / "server.properties"), "-g"]

    def _format(self) -> None:
        """Format the KRaft storage once; the cluster id is kept so restarts reuse the data."""
        result = subprocess.run(
            ["java", "-Xmx256m", "-XX:TieredStopAtLevel=1",
             f"-Dlog4j2.configurationFile={self.root / 'log4j2.xml'}", "-cp", f"{self.libs}/*",
             "kafka.tools.StorageTool", *self.format_args()],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise InfraError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def ready(self) -> bool:
        """The broker answers a metadata request: a real readiness check, not a sleep."""
        # Probe the port first so librdkafka does not log connection refusals while Java boots.
        if not port_open(self.port):
            return False
        try:
            admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 1000})
            meta = admin.list_topics(timeout=1.0)
            return len(meta.brokers) > 0
        except Exception:
            return False

    def launch(self, attached: bool) -> ManagedProcess:
        """Configure, format (once) and start the JVM without waiting for it to answer."""
        self._write_config()
        self._format()
        process = self.process
        process.start(attached=attached)
        self._running = process
        return process

    def start(self, attached: bool, timeout: float = 90.0) -> float:
        """Launch the node and wait until it answers; the seconds it took.

        A node that cannot register with its controller within Kafka's initial registration timeout
        (60 s) exits. Restarted after a crash, a lone node must first wait for its controller to expire
        the previous incarnation's session (`broker.session.timeout.ms`, 9 s), and it usually registers
        about then; once, in a full CI run, a restarted node gave up instead, for a reason not known.
        It is launched again, as a supervisor would, up to `START_ATTEMPTS` launches in all (which needs
        `timeout` above the 60 s). Any other exit fails at once. A cluster's first start
        (`KafkaCluster.start`) launches its nodes together and does not retry; `KafkaCluster.restart`
        comes here.
        """
        started = time.monotonic()
        launches = 0
        while True:
            log_from = self._log_size()
            process = self.launch(attached)
            launches += 1
            try:
                wait_until(self.ready, process, timeout, f"Kafka broker on {self.bootstrap}")
                return time.monotonic() - started
            except InfraError:
                if launches == START_ATTEMPTS or process.alive() or not self._gave_up_registering(log_from):
                    raise

    def _log_size(self) -> int:
        log = self.process.log_path
        return log.stat().st_size if log.exists() else 0

    def _gave_up_registering(self, log_from: int) -> bool:
        """Whether the launch whose log begins at byte `log_from` exited for want of a registration."""
        with open(self.process.log_path, "rb") as log:
            log.seek(log_from)
            return GAVE_UP_REGISTERING in log.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL the node (no clean shutdown, as a crash or power loss) and wait until it is gone."""
        process = getattr(self, "_running", self.process)
        pid = process.pid
        if pid is not None and process.alive():
            os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process.alive() and time.monotonic() < deadline:
                time.sleep(0.02)

    def stop(self) -> None:
        getattr(self, "_running", self.process).stop()


def stop_together(processes: Sequence[ManagedProcess]) -> None:
    """Stop several nodes at once: stopped one by one, the last ones would wait on a quorum already gone."""
    with ThreadPoolExecutor(max_workers=max(1, len(processes))) as pool:
        list(pool.map(lambda process: process.stop(), processes))


@dataclass
class KafkaCluster:
    """`size` broker+controller nodes on loopback (ids 1..size), one KRaft quorum, under `root/node-<id>`.

    Topics default to replication factor `size` (capped at 3) and `min.insync.replicas` one less, so an
    `acks=all` write survives any one node. The layout (cluster id, directory ids, ports) is recorded in
    `root/cluster.json` when the cluster is first formatted and reused afterwards, because the quorum's
    endpoints are written into the formatted metadata: `ports` only chooses them the first time.
    """

    root: Path
    libs: Path
    size: int = 3
    ports: Sequence[tuple[int, int]] | None = None
    heap: str = "512m"
    overrides: Mapping[str, str] = field(default_factory=dict)
    nodes: list[KafkaBroker] = field(init=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InfraError(f"a Kafka cluster needs at least one node, not {self.size}")
        quorum, broker_ports = self._layout()
        self.size = len(quorum.voters)
        replication = min(self.size, 3)
        self.nodes = [
            KafkaBroker(root=self.root / f"node-{voter.node_id}", libs=self.libs, port=port,
                        controller_port=voter.controller_port, heap=self.heap, node_id=voter.node_id,
                        quorum=quorum, replication=replication, min_insync=max(1, replication - 1),
                        overrides=self.overrides)
            for voter, port in zip(quorum.voters, broker_ports, strict=True)
        ]

    @property
    def layout_path(self) -> Path:
        return self.root / "cluster.json"

    def _layout(self) -> tuple[Quorum, list[int]]:
        """The recorded quorum and broker ports, recorded first if this root was never formatted."""
        try:
            recorded = json.loads(self.layout_path.read_text())
        except FileNotFoundError:
            ports = list(self.ports or [(free_port(), free_port()) for _ in range(self.size)])
            if len(ports) != self.size:
                raise InfraError(f"{len(ports)} port pairs given for {self.size} Kafka nodes") from None
            recorded = {"cluster_id": _kafka_uuid(),
                        "nodes": [{"node_id": i, "port": port, "controller_port": controller,
                                   "directory_id": _kafka_uuid()}
                                  for i, (port, controller) in enumerate(ports, start=1)]}
            self.root.mkdir(parents=True, exist_ok=True)
            self.layout_path.write_text(json.dumps(recorded, indent=2))
        except ValueError as exc:
            raise InfraError(f"{self.layout_path} is not valid JSON; remove {self.root} to start the "
                             "cluster afresh (its data goes with it)") from exc
        nodes = recorded["nodes"]
        quorum = Quorum(recorded["cluster_id"], tuple(
            Voter(int(n["node_id"]), int(n["controller_port"]), n["directory_id"]) for n in nodes))
        return quorum, [int(n["port"]) for n in nodes]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> KafkaBroker:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no Kafka node {node_id}; this cluster has nodes 1..{self.size}")

    def ready(self) -> bool:
        """Every node answers and the cluster's metadata lists all of them as live brokers."""
        if not all(node.ready() for node in self.nodes):
            return False
        try:
            admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 1000})
            return len(admin.list_topics(timeout=2.0).brokers) == self.size
        except Exception:
            return False

    def start(self, attached: bool, timeout: float = 120.0) -> float:
        """Start every node, then wait for all: no node is ready before a majority of controllers runs."""
        t0 = time.monotonic()
        processes = [node.launch(attached) for node in self.nodes]
        while not self.ready():
            for process in processes:
                if not process.alive():
                    raise InfraError(f"Kafka node {process.name} exited during start-up; last lines of "
                                     f"{process.log_path}:\n{process.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise InfraError(f"the Kafka cluster on {self.bootstrap} did not become ready within "
                                 f"{timeout:.0f}s; see the kafka.log of each node under {self.root}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def kill(self, node_id: int) -> None:
        """SIGKILL one node, as a crash would; `restart` brings it back on its own data."""
        self.node(node_id).kill()

    def restart(self, node_id: int, attached: bool = True, timeout: float = 90.0) -> float:
        node = self.node(node_id)
        return node.start(attached=attached, timeout=timeout)

    def stop(self) -> None:
        stop_together([getattr(node, "_running", node.process) for node in self.nodes])
