"""The whole stack as real processes for the e2e suite: the launcher's own plan, one Popen per process.

`kinshasa up` runs the same `StackPlan.processes()` under honcho, which stops everything when one
process exits. The suite needs to SIGKILL one process and start it again with the same command and
environment, so it starts the plan itself and keeps a handle per process name. Infrastructure comes
from `LocalInfra` (as `kinshasa up` does), on free ports under a temporary data directory, with the
checkout's Kafka jar cache so the broker is never downloaded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kinshasa.gateway.principals import write_dev_credentials
from kinshasa.infra.process import InfraError, ManagedProcess, free_port, port_open
from kinshasa.infra.stack import LocalInfra
from kinshasa.kernel.admin_api import load_or_create_internal_token
from kinshasa.launcher import StackPlan, StackPorts, create_databases, ensure_stack_topics
from kinshasa.settings import SERVICE_NAMES, InfraSettings, StackSettings

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".kinshasa" / "cache"
START_TIMEOUT_S = 120.0


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.25) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what` after a generous deadline.

    A probe that raises is retried (what it watches may still be coming up), except for InfraError,
    which says waiting is pointless (the process died).
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except InfraError:
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{detail}")
        time.sleep(interval_s)


@dataclass
class Process:
    """One stack process: the plan's command and environment, run as the infrastructure's children are.

    `ManagedProcess` gives it its own process group, a log file, and a parent-death signal, so a test
    run that is itself killed leaves nothing behind. That signal follows the starting thread: start
    and restart processes from the test's main thread only.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    managed: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.managed = ManagedProcess(self.name, self.argv, self.log_path,
                                      self.log_path.with_suffix(".pid"), env=os.environ | self.env, cwd=REPO)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start {time.strftime('%H:%M:%S')} ---\n".encode())
        self.managed.start(attached=True)

    def alive(self) -> bool:
        return self.managed.alive()

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush, no offset commit. What a crash looks like."""
        popen = self.managed.popen
        assert popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM without waiting, so several processes can shut down at once."""
        if self.alive() and self.managed.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.managed.popen.pid, signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL what is left."""
        self.managed.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self.managed.log_tail(lines)


@dataclass
class Stack:
    """A running stack: infrastructure, processes by name, where to reach them and the dev keys."""

    data_dir: Path
    ports: StackPorts
    infra: LocalInfra
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}/graphql"

    @property
    def credentials_path(self) -> Path:
        return self.data_dir / "credentials.json"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    def key(self, kind: str) -> str:
        document = json.loads(self.credentials_path.read_text())
        return str(next(p["key"] for p in document["principals"] if p["kind"] == kind))

    @property
    def gateway_urls(self) -> list[str]:
        """Every gateway replica's GraphQL endpoint, the first one first."""
        ports = (self.ports.gateway, *self.ports.gateway_replicas)
        return [f"http://127.0.0.1:{port}/graphql" for port in ports]

    def health_url(self, name: str) -> str:
        replicas = {f"gateway-{i}": port for i, port in enumerate(self.ports.gateway_replicas, start=2)}
        port = {"gateway": self.ports.gateway, "coordinator": self.ports.coordinator, **replicas}.get(name)
        return f"http://127.0.0.1:{port or self.ports.services[name]}/healthz"

    def healthy(self, name: str) -> bool:
        if name == "smtp-sink":
            return port_open(self.ports.smtp)
        try:
            return httpx.get(self.health_url(name), timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        process = self.processes[name]

        def probe() -> bool:
            if not process.alive():
                raise InfraError(f"{name} exited during start-up:\n{process.log_tail()}")
            return self.healthy(name)

        try:
            wait_for(f"{name} to answer /healthz", probe, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast lines of {process.log_path}:\n{process.log_tail()}") from None

    def kill(self, name: str) -> None:
        self.processes[name].kill()

    def stop_one(self, name: str) -> None:
        """A clean stop (SIGTERM), as an operator or a deploy would do it."""
        self.processes[name].stop()

    def revive(self) -> list[str]:
        """Start again whatever is not running, so one failed test does not take the next one down."""
        dead = [name for name, p in self.processes.items() if not p.alive()]
        for name in dead:
            self.restart(name)
        return dead

    def service_url(self, name: str) -> str:
        """A service's own read API (`GET /entities/{type}/{id}[/versions]`), behind the gateway."""
        return f"http://127.0.0.1:{self.ports.services[name]}"

    def restart(self, name: str) -> None:
        """Start a process again with exactly the command and environment the plan gave it."""
        process = self.processes[name]
        if process.alive():
            process.stop()
        process.start()
        self.wait_healthy(name)

    def stop(self) -> None:
        # Every process at once (each shuts down on its own), the infrastructure they talk to last.
        for process in self.processes.values():
            with contextlib.suppress(Exception):
                process.terminate()
        for process in self.processes.values():
            with contextlib.suppress(Exception):
                process.stop()
        with contextlib.suppress(Exception):
            self.infra.down(report=lambda _line: None)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"==> {name} <==\n{p.log_tail(lines)}" for name, p in self.processes.items())


@contextlib.contextmanager
def running_stack(keep_data: bool = False, gateway_replicas: int = 1) -> Iterator[Stack]:
    """Start infrastructure and every process of `StackPlan` on free ports; stop all of it on exit.

    With more than one gateway replica (`gateway`, `gateway-2`, ...), the replicas share one database, so
    the stack runs on PostgreSQL (every component gets a database of its own on one local server).
    """
    data_dir = Path(tempfile.mkdtemp(prefix="kinshasa-e2e-"))
    kafka_port, controller_port, temporal_port = free_port(), free_port(), free_port()
    stack_settings = StackSettings(data_dir=data_dir, kafka_bootstrap=f"127.0.0.1:{kafka_port}",
                                   temporal_address=f"127.0.0.1:{temporal_port}", log_level="INFO")
    infra_settings = InfraSettings(kafka_port=kafka_port, kafka_controller_port=controller_port,
                                   temporal_port=temporal_port, cache_dir=CACHE,
                                   start_timeout_s=START_TIMEOUT_S)
    ports = StackPorts(gateway=free_port(), coordinator=free_port(), smtp=free_port(),
                       services={name: free_port() for name in SERVICE_NAMES},
                       gateway_replicas=[free_port() for _ in range(gateway_replicas - 1)])
    infra = LocalInfra.from_settings(stack_settings, infra_settings)
    stack = Stack(data_dir=data_dir, ports=ports, infra=infra)
    logs = data_dir / "logs"
    logs.mkdir()
    try:
        postgres = gateway_replicas > 1
        if postgres:
            # The server runs as its own user (when we are root), which must reach its directory below.
            data_dir.chmod(0o711)
        stack.infra.up(with_postgres=postgres, attached=True, report=lambda _line: None)
        # What `kinshasa up` does before it starts the processes.
        ensure_stack_topics(stack_settings, SERVICE_NAMES, report=lambda _line: None)
        load_or_create_internal_token(data_dir)
        plan = StackPlan(stack_settings, ports, postgres_url=stack.infra.postgres().url if postgres else None)
        if plan.postgres_url is not None:
            asyncio.run(create_databases(plan.postgres_url, plan.databases()))
            # Replicas starting together must serve the same keys: write them before either starts.
            write_dev_credentials(stack.credentials_path)
        for name, argv, env in plan.processes():
            process = Process(name, argv, env, logs / f"{name}.log")
            stack.processes[name] = process
            process.start()
        for name in stack.processes:
            stack.wait_healthy(name)
        wait_for("the gateway to write the dev credentials", stack.credentials_path.exists)
        yield stack
    finally:
        stack.stop()
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
