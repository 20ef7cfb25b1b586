"""`kinshasa gateway`: serve the gateway (uvicorn + releaser + relay + listener) and manage its keys."""

from __future__ import annotations

import json
import logging

import typer
import uvicorn

from kinshasa.gateway.principals import hash_key, new_key

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


@app.command("serve")
def serve() -> None:
    """Run the gateway in the foreground on KINSHASA_GATEWAY_HOST:PORT until Ctrl-C."""
    from kinshasa.gateway.app import bootstrap
    from kinshasa.settings import StackSettings

    stack = StackSettings()
    logging.basicConfig(level=stack.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    gateway = bootstrap(stack=stack)
    uvicorn.run(
        gateway.app,
        host=gateway.settings.host,
        port=gateway.settings.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


@app.command("new-key")
def new_key_command(
    principal_id: str = typer.Argument(..., help="the principal's id, e.g. agent-7"),
    kind: str = typer.Option("agent", help="agent or operator"),
    scope: list[str] = typer.Option(["*"], help="operation globs an agent may call"),
) -> None:
    """Print a fresh key and the credentials entry holding only its hash."""
    if kind not in ("agent", "operator"):
        raise typer.BadParameter("kind must be agent or operator")
    key = new_key()
    typer.echo(f"key (give it to the principal; it is not stored): {key}")
    typer.echo(json.dumps({"id": principal_id, "kind": kind, "scopes": scope, "key_sha256": hash_key(key)}))
