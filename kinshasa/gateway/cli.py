"""`kinshasa gateway`: serve the gateway (uvicorn + releaser + relay + listener) and manage its keys."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from typing import Any, TextIO

import typer
import uvicorn

from kinshasa.gateway.principals import hash_key, new_key
from kinshasa.kernel.component import UVICORN_IMPLEMENTATION
from kinshasa.kernel.logs import configure_logging
from kinshasa.settings import StackSettings

COMPONENT = "gateway"

app = typer.Typer(
    help="The GraphQL gateway: agents' only door.",
    no_args_is_help=False,
    add_completion=False,
    invoke_without_command=True,
)


@app.callback()
def main(ctx: typer.Context) -> None:
    """Serve the gateway when no subcommand is given."""
    if ctx.invoked_subcommand is None:
        serve()


def configure_gateway_logging(stack: StackSettings, stream: TextIO | None = None) -> logging.Handler:
    """The kernel's logging, as every component sets it up: KINSHASA_LOG_LEVEL and KINSHASA_LOG_FORMAT."""
    return configure_logging(COMPONENT, stack.log_level, stream=stream, fmt=stack.log_format)


# No log config of uvicorn's own: its loggers (uvicorn.error) propagate to the kernel's root handler, so
# its lines come out in the same format; no access log (a line per agent write would drown the rest).
UVICORN_LOGGING: dict[str, Any] = {"log_config": None, "access_log": False, **UVICORN_IMPLEMENTATION}


@app.command("serve")
def serve() -> None:
    """Run the gateway in the foreground on KINSHASA_GATEWAY_HOST:PORT until Ctrl-C."""
    from kinshasa.gateway.app import bootstrap

    stack = StackSettings()
    configure_gateway_logging(stack)
    gateway = bootstrap(stack=stack)
    server = uvicorn.Server(uvicorn.Config(
        gateway.app,
        host=gateway.settings.host,
        port=gateway.settings.port,
        lifespan="on",
        **UVICORN_LOGGING,
    ))
    failures: list[Exception] = []

    def gave_up(failure: Exception) -> None:
        # A background task the supervisor does not restart any more: shut down as on SIGTERM, then
        # exit non-zero so the orchestrator starts a fresh gateway.
        failures.append(failure)
        server.should_exit = True

    gateway.on_give_up = gave_up
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if failures:
        typer.echo(f"gateway stopped: {failures[0]}", err=True)
        raise typer.Exit(code=1)
    if not server.started:
        raise typer.Exit(code=3)  # uvicorn's own code when startup fails


@app.command("reader", hidden=True)
def reader() -> None:
    """A reader of a gateway, started by it (kinshasa/gateway/readers.py): settings on stdin, its port on
    stdout; it serves costly reads for that gateway alone until stdin closes."""
    import sys

    from kinshasa.gateway.app import Gateway
    from kinshasa.gateway.principals import PrincipalRegistry
    from kinshasa.gateway.readers import ReaderStart

    start = ReaderStart.read(sys.stdin)
    configure_gateway_logging(start.stack, stream=sys.stderr)
    gateway = Gateway(start.settings, start.stack, registry=PrincipalRegistry(), reader_secret=start.secret)
    server = _ReaderServer(uvicorn.Config(gateway.app, lifespan="on", **UVICORN_LOGGING))

    def stop(_failure: object = None) -> None:
        server.should_exit = True

    # A follower that fails for good leaves a stale schema: exit, and the gateway starts a fresh reader.
    gateway.on_give_up = stop
    start.on_close(sys.stdin, stop)
    start.announce(sys.stdout)
    server.run(sockets=[start.socket])
    if not server.started:
        raise typer.Exit(code=3)


class _ReaderServer(uvicorn.Server):
    """A reader ignores Ctrl-C (sent to the whole process group): its gateway stops it, by closing its
    stdin, once the gateway's own requests are done."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGINT:
            return
        super().handle_exit(sig, frame)


@app.command("new-key")
def new_key_command(
    principal_id: str = typer.Argument(..., help="the principal's id, e.g. agent-7"),
    kind: str = typer.Option("agent", help="agent or operator"),
    scope: list[str] = typer.Option(
        ["*"], help="globs over the operations an agent may call (orders.*) and the services it may read "
        "(orders:read); * is everything"
    ),
    entry_point: list[str] = typer.Option(
        [], help="an entry point the agent may start runs at (repeat it); none given: any"
    ),
) -> None:
    """Print a fresh key and the credentials entry holding only its hash."""
    if kind not in ("agent", "operator"):
        raise typer.BadParameter("kind must be agent or operator")
    if entry_point and kind != "agent":
        raise typer.BadParameter("only an agent has entry points")
    key = new_key()
    typer.echo(f"key (give it to the principal; it is not stored): {key}")
    entry: dict[str, Any] = {"id": principal_id, "kind": kind, "scopes": scope, "key_sha256": hash_key(key)}
    if entry_point:
        entry["entryPoints"] = entry_point
    typer.echo(json.dumps(entry))
