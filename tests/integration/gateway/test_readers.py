"""Costly reads in reader processes, against a real gateway, its real reader children and a real database.

The gateway under test runs in process; its readers are the real `kinshasa.gateway reader` children it
starts at the first costly read. That a read was answered by a reader is read from the gateway's
/metrics (`kinshasa_offloaded_reads_total`), a count the gateway keeps of the answers its readers gave.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.readers import PRINCIPAL_HEADER, SECRET_HEADER
from kinshasa.gateway.settings import GatewayConfig, PrincipalLimits
from kinshasa.settings import StackSettings
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, Client, Harness, registry

COSTLY = "{ runs(first: 50) { nodes { id status commands(first: 20) { commandId status } } } }"
CHEAP = "{ runs(first: 1) { nodes { id } } }"
THRESHOLD = 1_000
OFFLOADED = re.compile(r'^kinshasa_offloaded_reads_total\{component="gateway"\} (\S+)$', re.MULTILINE)
READY_WITHIN_S = 90.0
# Where the database is does not matter here: the first test reads through a reader on both backends.
SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


async def offloaded(harness: Harness) -> float:
    response = await harness.client.http.get(
        "/metrics", headers={"Authorization": f"Bearer {harness.gateway.internal_token}"})
    assert response.status_code == 200, response.text
    found = OFFLOADED.search(response.text)
    assert found is not None, "the gateway's /metrics has no kinshasa_offloaded_reads_total"
    return float(found.group(1))


async def until_offloaded(harness: Harness, query: str, key: str = AGENT_KEY) -> dict[str, Any]:
    """Ask `query` until a reader answers it (the first asks start the readers); that answer."""
    deadline = time.monotonic() + READY_WITHIN_S
    while True:
        before = await offloaded(harness)
        body = await harness.client.gql(query, key=key)
        if await offloaded(harness) > before:
            return body
        assert time.monotonic() < deadline, "no reader answered within the time a reader takes to start"
        await asyncio.sleep(0.2)


async def some_commands(client: Client) -> None:
    for _ in range(2):
        run_id = await client.start_run()
        for index in range(3):
            body = await client.create_document(run_id, f"doc {index}")
            assert not body.get("errors"), body


def reader_pid(harness: Harness) -> int:
    pid = harness.gateway.reads.readers[0].pid
    assert pid is not None
    return pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_costly_read_is_answered_by_a_reader_process_with_the_gateways_own_answer(
        serve: Callable[..., Any]) -> None:
    async with serve(read_offload_cost=THRESHOLD) as harness:
        client = harness.client
        await some_commands(client)
        documents, schema = harness.gateway.query_cache, harness.gateway.schema._schema
        costly, cheap = (documents.cost(schema, query, None, None) for query in (COSTLY, CHEAP))
        assert costly >= THRESHOLD > cheap
        first = await client.gql(COSTLY)  # no reader yet: answered here, and the readers start
        assert not first.get("errors"), first
        assert len(first["data"]["runs"]["nodes"]) == 2

        answer = await until_offloaded(harness, COSTLY)
        assert answer == first
        pid = reader_pid(harness)
        assert pid != os.getpid() and alive(pid)
        # Reads under the threshold and every write stay in the gateway.
        before = await offloaded(harness)
        assert (await client.data(CHEAP))["runs"]["nodes"]
        run_id = await client.start_run()
        assert not (await client.create_document(run_id)).get("errors")
        assert await offloaded(harness) == before
        # An operator's costly read is offloaded too, and sees what an operator sees.
        operator = await until_offloaded(harness, COSTLY, key=OPERATOR_KEY)
        assert len(operator["data"]["runs"]["nodes"]) >= 3


@SQLITE
async def test_an_offloaded_read_is_still_charged_to_its_principal(serve: Callable[..., Any]) -> None:
    limited = {"agent-1": PrincipalLimits(rate_per_s=1, rate_burst=THRESHOLD * 10)}
    async with serve(read_offload_cost=THRESHOLD, principal_limits=limited) as harness:
        await until_offloaded(harness, COSTLY, key=OPERATOR_KEY)  # the readers are up
        before = await offloaded(harness)
        refused: dict[str, Any] | None = None
        for _ in range(40):  # ten costly reads fill the burst at most, then a refusal
            body = await harness.client.gql(COSTLY)
            if body.get("errors"):
                refused = body["errors"][0]
                break
        assert await offloaded(harness) > before, "no read of the limited agent went to a reader"
        assert refused is not None, "the limited agent's costly reads were never refused"
        assert refused["extensions"]["code"] == "RATE_LIMITED"
        assert refused["extensions"]["retryAfterS"] > 0
        # The gateway refused it without running GraphQL, in the very shape GraphQL itself refuses it.
        routed = await harness.client.raw({"query": COSTLY})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.gateway.graphql_app),
                                     base_url="http://gateway") as graphql_only:
            direct = await graphql_only.post("/graphql", json={"query": COSTLY},
                                             headers={"Authorization": f"Bearer {AGENT_KEY}"})
        assert routed.status_code == direct.status_code
        a, b = routed.json(), direct.json()
        assert a.keys() == b.keys() and a["data"] is None is b["data"]
        assert [e.keys() for e in a["errors"]] == [e.keys() for e in b["errors"]]
        assert a["errors"][0]["extensions"].keys() == b["errors"][0]["extensions"].keys()
        assert a["errors"][0]["extensions"]["code"] == b["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
        # Nothing charged stays in flight: the principal's count is back to zero.
        assert harness.gateway.fairness.in_flight("agent-1") == 0


@SQLITE
async def test_a_reader_answers_its_gateway_alone_and_only_reads(serve: Callable[..., Any]) -> None:
    async with serve(read_offload_cost=THRESHOLD) as harness:
        await until_offloaded(harness, COSTLY)
        url = harness.gateway.reads.readers[0].url
        assert url is not None and url.startswith("http://127.0.0.1:")
        secret = harness.gateway.reads.secret
        operator = '{"id": "op-1", "kind": "operator", "scopes": ["*"], "entryPoints": null}'

        async def post(headers: dict[str, str], query: str = CHEAP, path: str = "/graphql") -> httpx.Response:
            return await http.post(f"{url}{path}", json={"query": query}, headers=headers)

        async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
            # An agent's own key is not enough: a reader takes requests from its gateway only.
            direct = await post({"Authorization": f"Bearer {AGENT_KEY}"})
            assert direct.status_code == 403
            assert direct.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"
            # Nor is the stack's internal token, which every component holds: only the pool's own secret.
            for wrong in ("not-the-secret", harness.gateway.internal_token):
                forged = await post({SECRET_HEADER: wrong, PRINCIPAL_HEADER: operator})
                assert forged.status_code == 403
            # With the secret, still only queries: no write, no operator mutation, no other path.
            write = await post({SECRET_HEADER: secret, PRINCIPAL_HEADER: operator},
                               'mutation { startRun(entryPoint: "x") { id } }')
            assert write.status_code == 403
            assert write.json()["errors"][0]["message"] == "a gateway's reader runs queries only"
            for path in ("/metrics", "/admin/dlq", "/mcp"):
                assert (await post({SECRET_HEADER: secret}, path=path)).status_code == 403
            # With the secret but no principal, nothing is read.
            nobody = await post({SECRET_HEADER: secret})
            assert nobody.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
            read = await post({SECRET_HEADER: secret, PRINCIPAL_HEADER: operator})
            assert read.status_code == 200 and read.json()["data"]["runs"] is not None
            assert (await http.get(f"{url}/healthz")).status_code == 200


@SQLITE
async def test_a_killed_reader_is_restarted_and_meanwhile_its_reads_run_in_the_gateway(
        serve: Callable[..., Any]) -> None:
    async with serve(read_offload_cost=THRESHOLD) as harness:
        await some_commands(harness.client)
        expected = await until_offloaded(harness, COSTLY)
        killed = reader_pid(harness)
        os.kill(killed, signal.SIGKILL)
        # Every read is answered, whoever answers it, until a new reader does.
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            before = await offloaded(harness)
            assert await harness.client.gql(COSTLY) == expected
            if await offloaded(harness) > before and reader_pid(harness) != killed:
                break
            assert time.monotonic() < deadline, "the killed reader was not replaced"
            await asyncio.sleep(0.1)
        assert harness.gateway.supervisor.health()["reader-1"].restarts >= 1


@SQLITE
async def test_a_stopped_gateway_stops_its_readers(serve: Callable[..., Any]) -> None:
    async with serve(read_offload_cost=THRESHOLD) as harness:
        await until_offloaded(harness, COSTLY)
        pid = reader_pid(harness)
    # `serve` stopped the gateway: its reader finished and exited on its own (closed stdin), not killed.
    assert not alive(pid)


PARENT = textwrap.dedent("""
    import asyncio, json, sys
    from kinshasa.gateway.readers import ReaderProcess
    from kinshasa.gateway.settings import GatewayConfig, PrincipalLimits
    from kinshasa.settings import StackSettings

    given = json.loads(sys.argv[1])
    reader = ReaderProcess("reader-1", GatewayConfig(**given["gateway"]), StackSettings(**given["stack"]),
                           "a-token-of-the-test", 10)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(reader.run(stop))
        while reader.url is None:
            assert not task.done(), task
            await asyncio.sleep(0.05)
        print(reader.pid, flush=True)
        await task

    asyncio.run(main())
""")


@SQLITE
def test_a_reader_dies_with_its_gateway_even_a_sigkilled_one(
        database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str) -> None:
    import json

    settings = GatewayConfig(database_url=database_url, background=False, readers=0,
                             catalogue_topic=examples_catalogue)
    stack = StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap)
    given = json.dumps({"gateway": settings.model_dump(mode="json"), "stack": stack.model_dump(mode="json")})
    # The reader's gateway migrates the database first, as a gateway does before it starts readers.
    asyncio.run(_install(settings, stack))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, given], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the parent did not start its reader (exit {parent.poll()})"
        child = int(line)
        assert alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _running(child):
            assert time.monotonic() < deadline, "the reader outlived its SIGKILLed gateway"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()


async def _install(settings: GatewayConfig, stack: StackSettings) -> None:
    gateway = Gateway(settings, stack, registry=registry())
    try:
        await gateway.install()
    finally:
        await gateway.engine.dispose()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by init, but not at once)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
