"""/mcp on the gateway: the MCP server over streamable HTTP, each request authenticated by its Bearer key.

Tool calls go to the gateway's own GraphQL app in process (httpx.ASGITransport): the same auth,
fairness, breaker and error coding as /graphql, with no network hop. A request without a key the
gateway knows is answered 401 before the MCP layer sees it, and the answer names nothing internal.
An MCP session is bound to the key that opened it (the SDK's session manager answers 404 to another).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from kinshasa.client.client import Kinshasa
from kinshasa.mcp.server import Caller, KinshasaMcp, RunBinding
from kinshasa.mcp.settings import McpSettings

if TYPE_CHECKING:
    # Only a type: the gateway mounts this endpoint and hands it its authenticator.
    from kinshasa.gateway.principals import Principal

log = logging.getLogger(__name__)

PATH = "/mcp"
# The GraphQL URL the in-process client posts to: only its path matters to the ASGI app.
INTERNAL_URL = "http://gateway/graphql"
# A header an MCP gateway or host may send to bind the session's run to an entry point of its choosing
# (KINSHASA_MCP_ENTRY_POINT is the gateway-wide default).
ENTRY_POINT_HEADER = "kinshasa-entry-point"
BINDING_STATE = "kinshasa.run_binding"
ASGIApp = Callable[..., Any]
# Why a client of the per-request protocol must name its run: binding one per request would start and
# finish a run around every write, so per-run limits (the breaker) would never trip.
NO_SESSION = ("because this protocol (MCP 2026-07-28, each request on its own) has no session to bind a run "
              "to: call start_run first and pass its run_id to every write")


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def session_id(headers: Mapping[str, str]) -> str | None:
    """The MCP session a request belongs to; None for a request of the per-request protocol.

    Follows the SDK's routing: a request whose protocol-version header names no handshake version is
    served one request at a time, whatever `Mcp-Session-Id` it carries, so it has no session.
    """
    version = headers.get(MCP_PROTOCOL_VERSION_HEADER)
    if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
        return None
    return headers.get(MCP_SESSION_ID_HEADER) or None


async def _answer(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class McpEndpoint:
    """The ASGI app behind /mcp. `running()` must wrap the time it serves (the gateway's lifespan)."""

    def __init__(self, graphql: ASGIApp, authenticate: Callable[[str], Principal | None],
                 settings: McpSettings, client_limit: int = 256) -> None:
        self.graphql = graphql
        self.authenticate = authenticate
        self.settings = settings
        self.client_limit = client_limit
        # One SDK client per key, kept (its catalogue cache with it) across requests and sessions. One
        # evicted while a call still uses it is closed when that call is done, not under it.
        self._clients: OrderedDict[str, Kinshasa] = OrderedDict()
        self._users: dict[Kinshasa, int] = {}
        self._retired: set[Kinshasa] = set()
        self.tools = KinshasaMcp(self.client, settings, self._caller)
        self.server = self.tools.server()
        self._manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def client(self, key: str) -> AsyncIterator[Kinshasa]:
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = self._clients.get(digest)
        if found is None:
            found = Kinshasa(INTERNAL_URL, key, transport=httpx.ASGITransport(app=self.graphql))
            self._clients[digest] = found
            while len(self._clients) > self.client_limit:
                _, evicted = self._clients.popitem(last=False)
                if self._users.get(evicted):
                    self._retired.add(evicted)
                else:
                    await evicted.aclose()
        self._clients.move_to_end(digest)
        self._users[found] = self._users.get(found, 0) + 1
        try:
            yield found
        finally:
            self._users[found] -= 1
            if not self._users[found]:
                del self._users[found]
                if found in self._retired:
                    self._retired.discard(found)
                    await found.aclose()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve sessions until the block ends; sessions still open then are closed (bound runs finished)."""
        # The SDK's manager runs once per instance: a fresh one per serving period.
        self._manager = StreamableHTTPSessionManager(
            app=self.server,
            max_sessions=self.settings.max_sessions,
            session_idle_timeout=self.settings.session_idle_timeout_s,
        )
        try:
            async with self._manager.run():
                yield
        finally:
            self._manager = None
            clients, self._clients = [*self._clients.values(), *self._retired], OrderedDict()
            self._retired = set()
            for client in clients:
                await client.aclose()

    def _caller(self, ctx: ServerRequestContext[Any, Any]) -> Caller | None:
        request = ctx.request
        key = bearer_key(request.headers.get("authorization")) if request is not None else None
        if request is None or key is None:
            return None
        entry_point = request.headers.get(ENTRY_POINT_HEADER) or self.settings.entry_point
        if not entry_point:
            return Caller(key)
        if session_id(request.headers) is None:
            return Caller(key, unbound=NO_SESSION)
        return Caller(key, self._binding(ctx, key, entry_point))

    def _binding(self, ctx: ServerRequestContext[Any, Any], key: str, entry_point: str) -> RunBinding | None:
        """The MCP session's run binding, made on its first request and closed with the session.

        The SDK gives handlers no public way to the connection yet (its `Context.connection` is not
        built by the runner in 2.3), so this reads the session's private reference; the e2e test of
        run binding over HTTP fails if a release moves it.
        """
        connection = getattr(ctx.session, "_connection", None)
        if connection is None:
            return None
        binding: RunBinding | None = connection.state.get(BINDING_STATE)
        if binding is None:
            binding = RunBinding(entry_point, self.settings.purpose, key)
            connection.state[BINDING_STATE] = binding
            connection.exit_stack.push_async_callback(binding.close, self.client)
        return binding

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = bearer_key(headers.get("authorization"))
        principal = self.authenticate(key) if key else None
        if principal is None:
            await _answer(send, 401, {"error": "unauthenticated",
                                      "message": "send 'Authorization: Bearer <key>' with an agent's or "
                                                 "operator's key"},
                          [(b"www-authenticate", b'Bearer realm="kinshasa"')])
            return
        if self._manager is None:
            body = {"error": "unavailable", "message": "the MCP endpoint is not serving yet: retry soon"}
            await _answer(send, 503, body, [])
            return
        # The session manager binds each session to this identity: another key gets 404 for it.
        digest = hashlib.sha256(key.encode()).hexdigest() if key else ""
        user = AuthenticatedUser(AccessToken(token=digest, client_id=principal.id, scopes=[], subject=digest))
        await self._manager.handle_request({**scope, "user": user}, receive, send)


class McpRoute:
    """ASGI middleware sending /mcp to the MCP endpoint and everything else on."""

    def __init__(self, app: ASGIApp, endpoint: McpEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").rstrip("/") == PATH:
            await self.endpoint(scope, receive, send)
            return
        await self.app(scope, receive, send)
