"""`kinshasa up` itself (what `make run` runs): it comes up, carries a write end to end, and stops clean.

The rest of the suite starts the launcher's process plan directly so it can kill single processes;
this test covers the command a user types, honcho and all, on free ports and a fresh data directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kinshasa.infra.process import InfraError, ManagedProcess, free_port, port_open
from kinshasa.infra.stack import LocalInfra
from kinshasa.settings import SERVICE_NAMES, InfraSettings, StackSettings, service_env_prefix
from tests.e2e.api import Api
from tests.e2e.stack import CACHE, REPO, START_TIMEOUT_S, wait_for


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int], Path]]:
    ports = {"kafka": free_port(), "controller": free_port(), "temporal": free_port(),
             "gateway": free_port(), "coordinator": free_port(), "smtp": free_port(),
             **{name: free_port() for name in (*SERVICE_NAMES, "tickets")}}
    env = {
        "KINSHASA_DATA_DIR": str(tmp_path),
        "KINSHASA_INFRA_KAFKA_PORT": str(ports["kafka"]),
        "KINSHASA_INFRA_KAFKA_CONTROLLER_PORT": str(ports["controller"]),
        "KINSHASA_INFRA_TEMPORAL_PORT": str(ports["temporal"]),
        "KINSHASA_INFRA_CACHE_DIR": str(CACHE),
        "KINSHASA_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "KINSHASA_TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}",
        "KINSHASA_GATEWAY_PORT": str(ports["gateway"]),
        "KINSHASA_COORDINATOR_ADMIN_PORT": str(ports["coordinator"]),
        "KINSHASA_SVC_NOTIFIER_SMTP_PORT": str(ports["smtp"]),
        **{f"{service_env_prefix(name)}ADMIN_PORT": str(ports[name]) for name in (*SERVICE_NAMES, "tickets")},
        # The tickets example is a package of its own: importable as `make` installs it, or from here.
        "PYTHONPATH": os.pathsep.join([str(REPO / "examples" / "tickets"), os.environ.get("PYTHONPATH", "")]),
    }
    log = tmp_path / "up.log"
    # Attached: if the test run itself is killed, `kinshasa up` gets SIGTERM and stops its whole stack.
    managed = ManagedProcess("kinshasa-up", [sys.executable, "-m", "kinshasa.cli", "up",
                                             "--service", "tickets.service:tickets"], log,
                             tmp_path / "up.pid", env=os.environ | env, cwd=REPO)
    managed.start(attached=True)
    assert managed.popen is not None
    process = managed.popen
    try:
        yield process, ports, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # Whatever happened above, nothing the command started may outlive the test.
        with contextlib.suppress(Exception):
            infra = InfraSettings(kafka_port=ports["kafka"], kafka_controller_port=ports["controller"],
                                  temporal_port=ports["temporal"], cache_dir=CACHE)
            LocalInfra.from_settings(StackSettings(data_dir=tmp_path), infra).down(report=lambda _: None)


def test_kinshasa_up_runs_the_stack_and_ctrl_c_stops_all_of_it(
        up: tuple[subprocess.Popen[bytes], dict[str, int], Path]) -> None:
    process, ports, log = up
    try:
        _exercise(process, ports, log)
    except BaseException:
        print(f"\nlast lines of {log}:\n{log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
        raise


def _exercise(process: subprocess.Popen[bytes], ports: dict[str, int], log: Path) -> None:
    def banner() -> bool:
        if process.poll() is not None:
            raise InfraError(f"`kinshasa up` exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        return "Kinshasa is up." in log.read_text(errors="replace")

    wait_for("`kinshasa up` to print its banner", banner, timeout_s=START_TIMEOUT_S)
    url = f"http://127.0.0.1:{ports['gateway']}/graphql"
    mcp = f"http://127.0.0.1:{ports['gateway']}/mcp"
    assert url in log.read_text() and mcp in log.read_text()
    credentials = log.parent / "credentials.json"
    # The gateway writes the file in place, so it can exist before it holds JSON: retry the read.
    keys = wait_for("the dev credentials", lambda: {
        p["kind"]: p["key"] for p in json.loads(credentials.read_text())["principals"]})
    agent, operator = Api(url, keys["agent"]), Api(url, keys["operator"])
    wait_for("the gateway to answer", lambda: agent.call("{ me { kind } }")["me"]["kind"] == "agent",
             timeout_s=START_TIMEOUT_S)

    operator.set_policy("e2e.up", quarantineWindowS=0.0)
    run_id = agent.start_run("e2e.up")
    receipt = agent.write(run_id, "createDocument", title="hello from kinshasa up")
    wait_for("the document to be applied",
             lambda: agent.command(receipt["commandId"])["result"] == "APPLIED", timeout_s=120)
    document = agent.call("query($id: ID!) { document(id: $id) { title } }", id=receipt["entityId"])
    assert document["document"] == {"title": "hello from kinshasa up"}
    # The MCP endpoint the banner names is served, and only to a known key.
    assert httpx.post(mcp, json={}, timeout=10.0).status_code == 401
    # A service of one's own, added with --service, is written to like any other.
    ticket = wait_for("openTicket in the gateway's schema", lambda: agent.write(
        run_id, "openTicket", title="from kinshasa up --service"), timeout_s=60)
    wait_for("the ticket to be applied",
             lambda: agent.command(ticket["commandId"])["result"] == "APPLIED", timeout_s=120)
    opened = agent.call('query($id: ID!) { entity(service: "tickets", type: "ticket", id: $id) { state } }',
                        id=ticket["entityId"])["entity"]
    assert opened["state"]["title"] == "from kinshasa up --service"

    # Ctrl-C and SIGTERM take the same path: every process and the infrastructure stop.
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=90)
    still_open = {name: port for name, port in ports.items() if name != "controller" and port_open(port)}
    assert still_open == {}, (
        f"still listening after `kinshasa up` stopped: {still_open}\n{log.read_text()[-3000:]}")
