"""Breaker precision: two gateway processes, one PostgreSQL database, 64 writers, exactly N accepted."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kinshasa.infra.process import free_port
from kinshasa.kernel.database import create_engine
from kinshasa.topics.catalogue import ALERTS, RUNS, commands_topic
from tests.conftest import REPO
from tests.integration.gateway.conftest import (
    AGENT_KEY,
    OPERATOR_KEY,
    PRINCIPALS,
    TopicReader,
    outbox_drained,
)
from tests.integration.gateway.replicas import post

pytestmark = pytest.mark.postgres

LIMIT = 25
WRITERS = 64
ATTEMPTS_PER_WRITER = 3


def _spawn(
    tmp: Path, name: str, database_url: str, bootstrap: str, catalogue: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "KINSHASA_DATA_DIR": str(tmp / "data"),
        "KINSHASA_KAFKA_BOOTSTRAP": bootstrap,
        "KINSHASA_GATEWAY_CATALOGUE_TOPIC": catalogue,
        "KINSHASA_GATEWAY_DATABASE_URL": database_url,
        "KINSHASA_GATEWAY_CREDENTIALS_FILE": str(tmp / "credentials.json"),
        "KINSHASA_GATEWAY_HOST": "127.0.0.1",
        "KINSHASA_GATEWAY_PORT": str(port),
        "KINSHASA_LOG_LEVEL": "WARNING",
    }
    log = (tmp / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kinshasa.gateway", "serve"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"gateway at {url} never became healthy:\n{log.read_text()[-3000:]}")


@pytest.fixture
def two_gateways(postgres: Any, kafka: Any, tmp_path: Path,
                 examples_catalogue: str) -> Iterator[tuple[list[str], str]]:
    """Two gateway processes on one new PostgreSQL database: their URLs, and the database's."""
    from tests.conftest import _create_database

    database_url = asyncio.run(_create_database(postgres, f"t_{uuid.uuid4().hex[:12]}"))
    (tmp_path / "credentials.json").write_text(json.dumps(PRINCIPALS))
    started = [_spawn(tmp_path, f"gw{i}", database_url, kafka.bootstrap, examples_catalogue)
               for i in range(2)]
    try:
        for i, (proc, url) in enumerate(started):
            _wait_ready(url, proc, tmp_path / f"gw{i}.log")
        yield [url for _proc, url in started], database_url
    finally:
        for proc, _url in started:
            proc.terminate()
        for proc, _url in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


async def test_exactly_the_threshold_is_accepted(two_gateways: tuple[list[str], str], kafka: Any) -> None:
    (first, second), database_url = two_gateways
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        policy = await post(
            client,
            first,
            OPERATOR_KEY,
            'mutation { setPolicy(scope: DEFAULT, reason: "precision", settings: {maxWrites: %d, '  # noqa: UP031
            "maxVelocity: 100000, quarantineWindowS: 0}) { version } }" % LIMIT,
        )
        assert not policy.get("errors"), policy
        run_id = (
            await post(client, second, AGENT_KEY, 'mutation { startRun(entryPoint: "precision") { id } }')
        )["data"]["startRun"]["id"]
        mutation = 'mutation($r: ID!) { createDocument(runId: $r, input: {title: "x"}) { commandId status } }'
        gate = asyncio.Event()

        async def writer(index: int) -> list[dict[str, Any]]:
            await gate.wait()
            url = (first, second)[index % 2]
            return [
                await post(client, url, AGENT_KEY, mutation, {"r": run_id})
                for _ in range(ATTEMPTS_PER_WRITER)
            ]

        tasks = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
        await asyncio.sleep(0.1)
        gate.set()
        results = [r for batch in await asyncio.gather(*tasks) for r in batch]

    accepted = [r["data"]["createDocument"]["commandId"] for r in results if not r.get("errors")]
    refused = [r["errors"][0]["extensions"]["code"] for r in results if r.get("errors")]
    assert len(accepted) == LIMIT
    # The trip refuses with BREAKER_OPEN; with auto-revert (the default) it also rang the revert doorbell,
    # so writes after that commit find the run REVERTING: RUN_CLOSED.
    assert "BREAKER_OPEN" in refused and set(refused) <= {"BREAKER_OPEN", "RUN_CLOSED"}
    assert len(refused) == WRITERS * ATTEMPTS_PER_WRITER - LIMIT

    # Both gateways' relays have published all the writes left in the shared outbox: what is on Kafka is
    # all there will be.
    engine = create_engine(database_url)
    try:
        await outbox_drained(engine)
    finally:
        await engine.dispose()
    reader = TopicReader(kafka.bootstrap)
    published = await reader.envelopes([commands_topic("documents")], run_id)
    assert sorted(str(e.message_id) for e in published) == sorted(accepted)
    run_facts = await reader.envelopes([RUNS], run_id)
    assert len([e for e in run_facts if e.type == "run.tripped"]) == 1
    assert len(await reader.envelopes([ALERTS], run_id)) == 1
    async with httpx.AsyncClient(timeout=30) as client:
        stored = await post(
            client,
            first,
            OPERATOR_KEY,
            f'{{ alerts(runId: "{run_id}") {{ id }} '
            f'run(id: "{run_id}") {{ breaker {{ writes tripCount state }} }} }}',
        )
    assert len(stored["data"]["alerts"]) == 1
    assert stored["data"]["run"]["breaker"] == {"writes": LIMIT, "tripCount": 1, "state": "OPEN"}
