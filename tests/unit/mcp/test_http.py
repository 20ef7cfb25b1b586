"""Which HTTP requests belong to an MCP session (the condition for binding a run to it), and the
endpoint's per-key clients."""

from __future__ import annotations

from typing import Any

from mcp_types.version import LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION

from kinshasa.mcp.http import McpEndpoint, session_id
from kinshasa.mcp.settings import McpSettings


def test_a_handshake_request_belongs_to_the_session_it_names() -> None:
    assert session_id({"mcp-session-id": "s1", "mcp-protocol-version": LATEST_HANDSHAKE_VERSION}) == "s1"
    # The handshake protocol's first revision sent no version header.
    assert session_id({"mcp-session-id": "s1"}) == "s1"


def test_a_request_of_the_per_request_protocol_has_no_session_even_if_it_names_one() -> None:
    assert session_id({"mcp-protocol-version": LATEST_MODERN_VERSION}) is None
    # The SDK serves it one request at a time whatever id it carries: no run may be bound to that id.
    assert session_id({"mcp-session-id": "s1", "mcp-protocol-version": LATEST_MODERN_VERSION}) is None


def test_a_request_naming_no_session_has_none() -> None:
    assert session_id({"mcp-protocol-version": LATEST_HANDSHAKE_VERSION}) is None
    assert session_id({"mcp-session-id": ""}) is None


async def test_a_client_evicted_while_a_call_uses_it_is_closed_when_that_call_is_done() -> None:
    async def graphql(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("no request is sent in this test")

    endpoint = McpEndpoint(graphql, lambda _key: None, McpSettings(), client_limit=1)
    async with endpoint.client("key-a") as a:
        async with endpoint.client("key-b") as b:
            assert not a.closed  # evicted by key-b, still in use
        assert not b.closed  # the one kept
        assert not a.closed
    assert a.closed and not b.closed
    async with endpoint.client("key-c"):
        pass
    assert b.closed  # evicted while nobody used it: closed at once
