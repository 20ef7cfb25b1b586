"""`kinshasa mcp`: the MCP server over stdio, for an agent host that starts it as a subprocess.

One process is one session: one key, one SDK client, and (with KINSHASA_MCP_ENTRY_POINT) one bound run,
finished when the host closes stdin or stops the process with SIGTERM. Nothing but protocol messages goes
to stdout; logs go to stderr.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server

from kinshasa.client.client import Kinshasa
from kinshasa.client.errors import KinshasaError
from kinshasa.mcp.server import Caller, KinshasaMcp, RunBinding
from kinshasa.mcp.settings import McpSettings

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot serve with this key or URL: the message says what to change."""


async def check_key(client: Kinshasa, url: str) -> str:
    """Who the key is, asked once at start so a wrong key fails now instead of on every tool call.

    A gateway that does not answer yet is not fatal: the host may have started us before the stack.
    """
    try:
        me = (await client.query("query Me { me { id kind } }"))["me"]
    except KinshasaError as exc:
        if exc.code in ("UNAUTHENTICATED", "FORBIDDEN"):
            raise StartupError(f"the gateway at {url} refused the key ({exc.message}): set KINSHASA_KEY "
                               "or --key-file to an agent's or operator's key") from exc
        log.warning("the gateway at %s did not answer yet (%s); serving anyway", url, exc)
        return "unknown"
    return f"{me['kind']} {me['id']}"


async def serve_stdio(url: str, key: str, settings: McpSettings) -> None:
    """Serve MCP on stdin/stdout until the host closes stdin; then finish the bound run, if any."""
    async with Kinshasa(url, key) as client:
        who = await check_key(client, url)
        binding = RunBinding(settings.entry_point, settings.purpose, key) if settings.entry_point else None
        caller = Caller(key, binding)

        @asynccontextmanager
        async def shared(_key: str) -> AsyncIterator[Kinshasa]:
            yield client  # one client for the process; closed when serving ends

        def caller_of(_ctx: ServerRequestContext[Any, Any]) -> Caller:
            return caller

        server = KinshasaMcp(shared, settings, caller_of).server()
        log.info("kinshasa mcp serving %s against %s%s", who, url,
                 f", run bound to entry point {settings.entry_point}" if binding else "")
        async def finish() -> None:
            if binding is not None:
                await binding.close(shared)

        try:
            async with anyio.create_task_group() as serving:
                serving.start_soon(_stop_on_sigterm, finish)
                async with stdio_server() as (read_stream, write_stream):
                    await server.run(read_stream, write_stream, server.create_initialization_options())
                serving.cancel_scope.cancel()  # stdin closed: the signal watcher has nothing left to do
        finally:
            await finish()


async def _stop_on_sigterm(finish: Callable[[], Awaitable[None]]) -> None:
    """A host that stops the server with SIGTERM (most do) ends the session as closing stdin would: the
    bound run is finished, then the process exits. It exits at once rather than unwinding, because the
    thread that reads stdin cannot be cancelled and would hold the exit until the host closed stdin."""
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log.info("SIGTERM: finishing the session")
            with anyio.CancelScope(shield=True):
                try:
                    await finish()
                except Exception:
                    log.exception("could not finish the bound run on SIGTERM")
            logging.shutdown()
            os._exit(0)
