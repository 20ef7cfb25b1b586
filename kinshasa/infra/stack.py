"""The local infrastructure as one unit: `kinshasa infra up|down|status` and the test fixtures share it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kinshasa.infra.kafka import KafkaBroker, kafka_libs
from kinshasa.infra.postgres import PostgresCluster
from kinshasa.infra.process import InfraError, ManagedProcess
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

    def _state(self) -> dict[str, int]:
        try:
            return dict(json.loads(self.state_path.read_text()))
        except (OSError, ValueError):
            return {}

    def _save_state(self, **ports: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = self._state() | ports
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
           report: Callable[[str], None] = print) -> dict[str, float]:
        """Start whatever is not running; return seconds each start took."""
        took: dict[str, float] = {}
        kafka = self.kafka()
        if kafka.process.alive() and kafka.ready():
            report(f"kafka already running on {kafka.bootstrap}")
        else:
            t0 = time.monotonic()
            kafka.start(attached=attached, timeout=self.infra.start_timeout_s)
            took["kafka"] = time.monotonic() - t0
            self._save_state(kafka_port=kafka.port, kafka_controller_port=kafka.controller_port)
            report(f"kafka ready on {kafka.bootstrap} in {took['kafka']:.1f}s")
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
            kafka = self.kafka()
            alive = kafka.process.alive()
            rows.append(ComponentStatus("kafka", kafka.bootstrap, kafka.process.pid, alive,
                                        alive and kafka.ready()))
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
        kafka_root = self.root / "kafka"
        if (kafka_root / "kafka.pid").exists():
            # Building the broker would resolve jars; stopping needs only the pid file.
            proc = ManagedProcess("kafka", [], kafka_root / "kafka.log", kafka_root / "kafka.pid")
            if proc.alive():
                proc.stop()
                report("kafka stopped")
            else:
                proc.pid_path.unlink(missing_ok=True)
