"""The operator's `kinshasa revert`, `kinshasa runs` and `kinshasa run` against a real gateway.

The gateway runs in this process (its own database, the session's Kafka) and serves HTTP on a free
port; the CLI runs as the operator would run it, as a child process with an operator key.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.principals import PrincipalRegistry
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.kernel.component import QuietServer
from kinshasa.operator.gateway_client import GatewayClient, GatewayError, timeline
from kinshasa.settings import StackSettings

REPO = Path(__file__).resolve().parents[3]
AGENT_KEY = "cli-agent-key-" + "a" * 40
OPERATOR_KEY = "cli-operator-key-" + "o" * 40


@pytest.fixture
async def gateway_url(kafka: KafkaBroker, tmp_path: Path, examples_catalogue: str) -> AsyncIterator[str]:
    registry = PrincipalRegistry.from_document({"principals": [
        {"id": "cli-agent", "kind": "agent", "scopes": ["*"], "key": AGENT_KEY},
        {"id": "cli-operator", "kind": "operator", "scopes": ["*"], "key": OPERATOR_KEY}]})
    settings = GatewayConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.sqlite3'}",
                             dev_mode=False, catalogue_topic=examples_catalogue)
    gateway = Gateway(settings, StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap),
                      registry=registry)
    await gateway.start()
    port = free_port()
    server = QuietServer(uvicorn.Config(gateway.app, host="127.0.0.1", port=port, log_config=None,
                                    lifespan="off"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/graphql"
    finally:
        server.should_exit = True
        await task
        await gateway.stop()


async def _agent(url: str, query: str, variables: dict[str, str]) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=30) as http:
        body = (await http.post(url, json={"query": query, "variables": variables},
                                headers={"Authorization": f"Bearer {AGENT_KEY}"})).json()
    assert not body.get("errors"), body
    data: dict[str, object] = body["data"]
    return data


async def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kinshasa.cli", *args, "--gateway", url, "--key", OPERATOR_KEY]
    return await asyncio.to_thread(subprocess.run, argv, cwd=REPO, capture_output=True, text=True, timeout=60)


async def test_operator_commands_revert_list_and_show_runs_through_the_gateway(gateway_url: str) -> None:
    started = await _agent(gateway_url, 'mutation { startRun(entryPoint: "cli-test", purpose: "p") { id } }',
                           {})
    run_id = str(started["startRun"]["id"])  # type: ignore[index]
    for title in ("one", "two"):
        await _agent(gateway_url, 'mutation($r: ID!, $t: String!) { createDocument(runId: $r, '
                     'input: {title: $t, body: "b"}) { commandId } }', {"r": run_id, "t": title})

    listed = await _cli(gateway_url, "runs", "--agent", "cli-agent")
    assert listed.returncode == 0, listed.stderr
    assert "RUN" in listed.stdout.splitlines()[0] and run_id in listed.stdout and "RUNNING" in listed.stdout

    shown = await _cli(gateway_url, "run", run_id, "--steps", "5")
    assert shown.returncode == 0, shown.stderr
    assert f"run {run_id}  (RUNNING)" in shown.stdout and "entry point cli-test" in shown.stdout
    # No coordinator is configured here: the timeline says so instead of failing.
    assert "could not be reached" in shown.stdout and "warning:" in shown.stderr

    reverted = await _cli(gateway_url, "revert", "--run", run_id, "--reason", "cli test", "--no-wait")
    assert reverted.returncode == 0, reverted.stderr
    assert "revert requested for 1 run(s)" in reverted.stdout and "REVERTING" in reverted.stdout

    # The bulk form finds the run by agent; it is already reverting, so it is left alone, and the
    # progress display follows it until the (short) timeout because no coordinator finishes it here.
    bulk = await _cli(gateway_url, "revert", "--agent", "cli-agent", "--reason", "again", "--timeout", "2")
    assert bulk.returncode == 4, bulk.stdout + bulk.stderr
    assert "already reverting or reverted" in bulk.stdout and "runs 0/1 settled" in bulk.stdout
    assert "still reverting" in bulk.stderr

    # One run by id takes the same door as the bulk form: already reverting, it is left alone too.
    again = await _cli(gateway_url, "revert", "--run", run_id, "--reason", "once more", "--no-wait")
    assert again.returncode == 0, again.stderr
    assert "revert requested for 0 run(s); 1 already reverting or reverted (left alone)" in again.stdout

    refused = await _cli(gateway_url, "revert", "--reason", "nothing selected")
    assert refused.returncode == 1 and "say which runs" in refused.stderr
    unknown = await _cli(gateway_url, "run", "no-such-run")
    assert unknown.returncode == 1 and "RUN_NOT_FOUND" in unknown.stderr

    client = GatewayClient(url=gateway_url, key=AGENT_KEY)
    with pytest.raises(GatewayError) as refused_agent:
        await client.revert_runs({"runIds": [run_id]}, "agents may not")
    assert refused_agent.value.code == "FORBIDDEN"
    operator = GatewayClient(url=gateway_url, key=OPERATOR_KEY)
    detail = await operator.run(run_id)
    # Held in quarantine when the bell rang, so discarded rather than published: nothing to undo.
    counts = detail["counts"]
    assert detail["status"] == "REVERTING" and counts["published"] + counts["discarded"] == 2
    assert timeline(detail)[0] == f"run {run_id}  (REVERTING)"
