"""The official MCP client against `kinshasa mcp` (stdio) and /mcp on the gateway (streamable HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import mcp_types as types
import pytest
from confluent_kafka import Producer
from mcp import Client, ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types.version import LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION

from kinshasa.topics.catalogue import commands_topic
from tests.e2e.api import Api
from tests.e2e.stack import Stack

TRANSPORTS = ["stdio", "http"]
UNAUTHENTICATED = "send 'Authorization: Bearer <key>' with an agent's or operator's key"
FIXED_AGENT_TOOLS = {"start_run", "finish_run", "get_command", "get_run", "get_entity"}
OPERATOR_TOOLS = {"list_alerts", "revert_run", "release_run", "discard_run", "approve_egress", "deny_egress",
                  "dlq_count", "dlq_inspect", "dlq_reprocess", "outbox_status"}


def _mcp_url(stack: Stack) -> str:
    return stack.gateway_url.removesuffix("/graphql") + "/mcp"


@asynccontextmanager
async def mcp_session(stack: Stack, transport: str, kind: str = "agent", *,
                      entry_point: str | None = None) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session with the stack's `kind` key, over `transport`."""
    key = stack.key(kind)
    if transport == "stdio":
        env = {"KINSHASA_KEY": key, "KINSHASA_LOG_LEVEL": "WARNING"}
        if entry_point is not None:
            env["KINSHASA_MCP_ENTRY_POINT"] = entry_point
        params = StdioServerParameters(command=sys.executable, args=["-m", "kinshasa.cli", "mcp", "--url",
                                                                     stack.gateway_url], env=env)
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session
        return
    headers = {"Authorization": f"Bearer {key}"}
    if entry_point is not None:
        headers["Kinshasa-Entry-Point"] = entry_point
    async with (create_mcp_http_client(headers=headers) as http,
                streamable_http_client(_mcp_url(stack), http_client=http) as (read, write),
                ClientSession(read, write) as session):
        await session.initialize()
        yield session


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool call that must succeed; its structured answer."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {_text(result)}"
    answer: dict[str, Any] = json.loads(_text(result))
    return answer


async def refusal(session: ClientSession, tool: str, **arguments: Any) -> str:
    """A tool call that must be refused; the text the agent reads."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool} was expected to be refused, it answered {_text(result)}"
    return _text(result)


async def poll(what: str, probe: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.25)


def _entry_point(name: str, operator: Api, **policy: Any) -> str:
    chosen = f"e2e.mcp.{name}.{uuid.uuid4().hex[:8]}"
    operator.set_policy(chosen, quarantineWindowS=0.0, **policy)
    return chosen


def _runs_at(entry_point: str, operator: Api) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = operator.call(
        "query($e: String!) { runs(filter: {entryPoint: $e}) { nodes { id status } } }", e=entry_point
    )["runs"]["nodes"]
    return found


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_tool_list_matches_the_catalogue(stack: Stack, agent: Api, transport: str) -> None:
    operations = agent.call("query { operations { mutation inputSchema allowed } }")["operations"]
    async with mcp_session(stack, transport) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    writes = {_snake(op["mutation"]): op for op in operations if op["allowed"]}
    assert set(tools) == FIXED_AGENT_TOOLS | set(writes)
    for name, op in writes.items():
        declared = json.loads(op["inputSchema"])
        schema = tools[name].input_schema
        # The operation's own schema, plus the run and the idempotency key.
        assert {k: v for k, v in schema["properties"].items() if k not in ("run_id", "idempotency_key")} \
            == declared.get("properties", {})
        assert "run_id" in schema["required"]
        assert "held" in (tools[name].description or "").lower()


def _snake(mutation: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in mutation)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_agent_key_sees_no_operator_tool_and_calling_one_is_refused(
        stack: Stack, transport: str) -> None:
    async with mcp_session(stack, transport) as session:
        names = {t.name for t in (await session.list_tools()).tools}
        assert not names & OPERATOR_TOOLS
        text = await refusal(session, "dlq_inspect", component="documents", limit=5)
        assert text.startswith("FORBIDDEN: ")
        assert (await refusal(session, "outbox_status")).startswith("FORBIDDEN: ")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_operator_key_gets_the_operator_tools_and_no_writes(stack: Stack, transport: str) -> None:
    async with mcp_session(stack, transport, "operator") as session:
        names = {t.name for t in (await session.list_tools()).tools}
        assert names == OPERATOR_TOOLS | {"get_command", "get_run", "get_entity"}
        status = await call(session, "outbox_status")
        components = {c["component"] for c in status["components"]}
        assert {"gateway", "documents"} <= components
        assert all("pending" in c and "oldestPendingAgeS" in c and "dead" in c for c in status["components"])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_write_through_a_tool_is_applied(stack: Stack, operator: Api, transport: str) -> None:
    chosen = _entry_point("write", operator)
    async with mcp_session(stack, transport) as session:
        run_id = (await call(session, "start_run", entry_point=chosen, purpose="e2e: one write"))["runId"]
        title = f"written through MCP over {transport}"
        receipt = await call(session, "create_document", run_id=run_id, title=title)
        assert receipt["runId"] == run_id and receipt["mutation"] == "createDocument"

        async def applied() -> dict[str, Any] | None:
            now = await call(session, "get_command", command_id=receipt["commandId"])
            return now if now["status"] == "APPLIED" else None

        done = await poll("the write's receipt to say APPLIED", applied)
        assert done["appliedAt"] is not None
        entity = await call(session, "get_entity", service="documents", type="document",
                            id=receipt["entityId"])
        assert entity["state"]["title"] == title
        assert (await call(session, "finish_run", run_id=run_id))["status"] == "FINISHED"
        # A finished run takes no more writes, and the refusal says what to do.
        closed = await refusal(session, "create_document", run_id=run_id, title="too late")
        assert closed.startswith("RUN_CLOSED: ")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_tripped_breaker_comes_back_as_breaker_open(
        stack: Stack, operator: Api, transport: str) -> None:
    chosen = _entry_point("breaker", operator, maxWrites=1)
    async with mcp_session(stack, transport) as session:
        run_id = (await call(session, "start_run", entry_point=chosen))["runId"]
        await call(session, "create_document", run_id=run_id, title="the one allowed write")
        text = await refusal(session, "create_document", run_id=run_id, title="one too many")
        assert text.startswith("BREAKER_OPEN: stop writing in this run; an operator has been alerted.")
        run = await call(session, "get_run", run_id=run_id)
        assert run["breaker"]["state"] == "OPEN"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_bound_session_writes_without_run_ids_and_leaves_one_finished_run(
        stack: Stack, operator: Api, transport: str) -> None:
    chosen = _entry_point("bound", operator)
    async with mcp_session(stack, transport, entry_point=chosen) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert "run_id" not in tools["create_document"].input_schema["required"]
        first = await call(session, "create_document", title="bound write one")
        second = await call(session, "create_document", title="bound write two")
        assert first["runId"] == second["runId"]

    async def finished() -> list[dict[str, Any]] | None:
        found = _runs_at(chosen, operator)
        return found if found and all(r["status"] == "FINISHED" for r in found) else None

    only = await poll("the session's run to be finished", finished)
    assert only == [{"id": first["runId"], "status": "FINISHED"}]


def test_a_bound_stdio_session_stopped_with_sigterm_finishes_its_run(stack: Stack, operator: Api) -> None:
    """Most hosts stop a stdio server with SIGTERM rather than by closing stdin: the run still finishes.

    Spoken as newline-delimited JSON-RPC on the process's own pipes, so the test holds its pid."""
    chosen = _entry_point("sigterm", operator)
    env = {**os.environ, "KINSHASA_KEY": stack.key("agent"), "KINSHASA_MCP_ENTRY_POINT": chosen,
           "KINSHASA_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "kinshasa.cli", "mcp", "--url", stack.gateway_url],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    assert server.stdin is not None and server.stdout is not None

    def ask(message_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(json.dumps({"jsonrpc": "2.0", "id": message_id, "method": method,
                                       "params": params}) + "\n")
        server.stdin.flush()
        while True:
            answer: dict[str, Any] = json.loads(server.stdout.readline())
            if answer.get("id") == message_id:
                return answer

    try:
        ask(1, "initialize", {"protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": {},
                              "clientInfo": {"name": "e2e", "version": "1"}})
        server.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
        server.stdin.flush()
        written = ask(2, "tools/call", {"name": "create_document", "arguments": {"title": "then SIGTERM"}})
        assert not written["result"].get("isError"), written
        assert [r["status"] for r in _runs_at(chosen, operator)] == ["RUNNING"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    # The process finished its run before it exited: no waiting needed.
    assert [r["status"] for r in _runs_at(chosen, operator)] == ["FINISHED"]


async def test_a_per_request_client_must_name_its_run_and_a_write_starts_none(
        stack: Stack, operator: Api) -> None:
    # A run bound per request would be started and finished around each write: the breaker's per-run
    # limits would never trip. So a client without a session is refused until it names a run.
    chosen = _entry_point("per-request", operator, maxWrites=1)
    headers = {"Authorization": f"Bearer {stack.key('agent')}", "Kinshasa-Entry-Point": chosen}
    async with (create_mcp_http_client(headers=headers) as http,
                Client(streamable_http_client(_mcp_url(stack), http_client=http),
                       mode=LATEST_MODERN_VERSION, cache=None) as client):
        assert client.session.protocol_version == LATEST_MODERN_VERSION
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert "run_id" in tools["create_document"].input_schema["required"]

        result = await client.call_tool("create_document", {"title": "no run named"})
        assert result.is_error, _text(result)
        text = _text(result)
        assert text.startswith("VALIDATION:")
        assert "run_id: required" in text and "no session to bind a run to" in text
        assert "call start_run first" in text
        assert _runs_at(chosen, operator) == []

        # Naming a run works, and that run's limits hold across requests.
        started = await client.call_tool("start_run", {"entry_point": chosen})
        run_id = json.loads(_text(started))["runId"]
        written = await client.call_tool("create_document", {"run_id": run_id, "title": "the one allowed"})
        assert not written.is_error, _text(written)
        again = await client.call_tool("create_document", {"run_id": run_id, "title": "one too many"})
        assert again.is_error and _text(again).startswith("BREAKER_OPEN:")
    assert [r["id"] for r in _runs_at(chosen, operator)] == [run_id]


async def test_operator_dlq_tools_act_on_a_real_dead_letter(stack: Stack) -> None:
    # A message the documents service cannot parse: it dead-letters it at once, named by its header.
    message_id = f"mcp-poison-{uuid.uuid4().hex}"
    producer = Producer({"bootstrap.servers": stack.infra.kafka().bootstrap})
    producer.produce(commands_topic("documents"), key=b"documents:mcp-poison", value=b"{not json at all",
                     headers=[("message_id", message_id.encode()), ("type", b"documents.rename")])
    assert producer.flush(30) == 0

    async with mcp_session(stack, "http", "operator") as session:
        async def dead_letter() -> dict[str, Any] | None:
            letters = await call(session, "dlq_inspect", component="documents", limit=200)
            return next((e for e in letters["entries"] if e["message_id"] == message_id), None)

        letter = await poll("the poison message in the documents DLQ", dead_letter)
        assert letter["status"] == "open"
        counts = await call(session, "dlq_count")
        documents = next(c for c in counts["components"] if c["component"] == "documents")
        assert documents["count"] >= 1 and counts["total"] >= documents["count"]

        answer = await call(session, "dlq_reprocess", component="documents", message_ids=[message_id])
        # Reprocessed with the service's own handler: still unparsable, so it fails again and stays.
        [outcome] = answer["results"]
        assert outcome["message_id"] == message_id and outcome["outcome"] == "failed"
        assert outcome["error"]
        assert await dead_letter() is not None

    # The same dead letter is seen over stdio too.
    async with mcp_session(stack, "stdio", "operator") as session:
        letters = await call(session, "dlq_inspect", component="documents", limit=200)
        assert any(e["message_id"] == message_id for e in letters["entries"])


def test_mcp_over_http_refuses_a_request_without_a_known_key(stack: Stack) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic abc"}):
        response = httpx.post(_mcp_url(stack), json=body, timeout=10.0,
                              headers={"Accept": "application/json, text/event-stream", **headers})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        # Nothing internal: the same two fields whatever was wrong with the key.
        assert response.json() == {"error": "unauthenticated", "message": UNAUTHENTICATED}


def test_an_mcp_session_over_http_answers_only_the_key_that_opened_it(stack: Stack) -> None:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    opening = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": {},
                          "clientInfo": {"name": "e2e", "version": "0"}}}
    agent_headers = {**headers, "Authorization": f"Bearer {stack.key('agent')}"}
    opened = httpx.post(_mcp_url(stack), json=opening, headers=agent_headers, timeout=10.0)
    assert opened.status_code == 200
    session = {"mcp-session-id": opened.headers["mcp-session-id"],
               "mcp-protocol-version": LATEST_HANDSHAKE_VERSION}
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    stranger = httpx.post(_mcp_url(stack), json=listing, timeout=10.0,
                          headers={**headers, **session, "Authorization": f"Bearer {stack.key('operator')}"})
    assert stranger.status_code == 404
    closed = httpx.delete(_mcp_url(stack), headers={**agent_headers, **session}, timeout=10.0)
    assert closed.status_code < 300
