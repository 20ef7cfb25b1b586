"""Apache Kafka's own broker in single-node KRaft mode, its jars fetched from Maven Central and cached."""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from confluent_kafka.admin import AdminClient

from kinshasa.infra.process import InfraError, ManagedProcess, port_open, wait_until

_LOG4J2 = """<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="WARN"/>
    <Logger name="org.apache.kafka" level="WARN"/>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
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
    libs = cache_dir / f"kafka-{version}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(NO_MAVEN)
    if shutil.which("java") is None:
        raise InfraError("Java 17+ is needed to run the Kafka broker and 'java' is not on PATH "
                         "(Debian: apt-get install openjdk-17-jre-headless).")
    pom = resources.files("kinshasa.infra").joinpath("kafka/pom.xml")
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    with resources.as_file(pom) as pom_path:
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom_path), f"-Dkafka.version={version}",
             "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
             "-DincludeScope=runtime"],
            capture_output=True, text=True, check=False,
        )
    if result.returncode != 0:
        raise InfraError(f"Maven could not fetch Kafka {version}'s jars:\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    marker.write_text(version)
    return libs


@dataclass
class KafkaBroker:
    """One broker+controller on loopback, with its data, config and log under `root`."""

    root: Path
    libs: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="kafka",
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

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        (self.root / "server.properties").write_text(
            "".join(f"{k}={v}\n" for k, v in props.items()))
        (self.root / "log4j2.xml").write_text(_LOG4J2)

    def _format(self) -> None:
        """Format the KRaft storage once; the cluster id is kept so restarts reuse the data."""
        cluster_id_file = self.root / "cluster.id"
        if not cluster_id_file.exists():
            # Kafka wants a base64url UUID without padding, which is what random-uuid prints.
            # ...and one starting with '-' would be read by StorageTool as an option.
            cid = "-"
            while cid.startswith("-"):
                cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            cluster_id_file.write_text(cid)
        cid = cluster_id_file.read_text().strip()
        result = subprocess.run(
            ["java", "-Xmx256m", "-XX:TieredStopAtLevel=1",
             f"-Dlog4j2.configurationFile={self.root / 'log4j2.xml'}", "-cp", f"{self.libs}/*",
             "kafka.tools.StorageTool", "format", "--standalone", "-t", cid,
             "-c", str(self.root / "server.properties"), "-g"],
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

    def start(self, attached: bool, timeout: float = 90.0) -> float:
        self._write_config()
        self._format()
        process = self.process
        process.start(attached=attached)
        self._running = process
        return wait_until(self.ready, process, timeout, f"Kafka broker on {self.bootstrap}")

    def stop(self) -> None:
        getattr(self, "_running", self.process).stop()
