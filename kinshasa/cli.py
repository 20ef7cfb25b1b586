"""The `kinshasa` command: infrastructure, the stack, components and operator tools hang off this app."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

from kinshasa.infra.process import InfraError
from kinshasa.infra.stack import LocalInfra
from kinshasa.settings import InfraSettings, StackSettings

app = typer.Typer(help="Kinshasa: the deterministic ring AI agents write through.",
                  no_args_is_help=True, add_completion=False)
infra_app = typer.Typer(help="Local Kafka, Temporal and PostgreSQL, started by the project itself.",
                        no_args_is_help=True)
app.add_typer(infra_app, name="infra")


def _mount() -> None:
    """Each component owns its commands; this app only gathers them under one name."""
    from kinshasa.client.cli import app as client_app
    from kinshasa.conformance.cli import app as conformance_app
    from kinshasa.coordinator.cli import app as coordinator_app
    from kinshasa.demo import app as demo_app
    from kinshasa.gateway.cli import app as gateway_app
    from kinshasa.kernel.receipts_cli import app as receipts_app
    from kinshasa.migrations.cli import app as db_app
    from kinshasa.operator.incident_commands import app as incidents_app
    from kinshasa.operator.run_commands import app as operator_app
    from kinshasa.scaffold.cli import app as scaffold_app
    from kinshasa.services.cli import app as service_app
    from kinshasa.topics.cli import app as topics_app

    app.add_typer(topics_app, name="topics")
    app.add_typer(receipts_app, name="receipts", help="Verify a component's hash-chained receipts.")
    app.add_typer(db_app, name="db", help="Migrate a component's database, or show its schema version.")
    app.add_typer(service_app, name="service")
    app.add_typer(gateway_app, name="gateway")
    app.add_typer(coordinator_app, name="coordinator")
    # Operator verbs read best at the top: `kinshasa revert --run ID`.
    app.add_typer(operator_app)
    # `kinshasa incidents`, `kinshasa incident ID`, `kinshasa policy backtest`, `kinshasa proposal accept ID`.
    app.add_typer(incidents_app)
    app.add_typer(demo_app)
    app.add_typer(conformance_app)
    app.add_typer(scaffold_app)
    app.add_typer(client_app)


_mount()


def _local_infra() -> LocalInfra:
    return LocalInfra.from_settings(StackSettings(), InfraSettings())


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@infra_app.command("up")
def infra_up(postgres: bool = typer.Option(False, "--postgres", help="Also start PostgreSQL."),
             brokers: int | None = typer.Option(
                 None, "--brokers", min=1, metavar="N",
                 help="Kafka nodes to run (default: as many as are running, else 1). With 3: a KRaft "
                      "cluster, replication factor 3 and min.insync.replicas 2 for new topics.")) -> None:
    """Start the infrastructure in the background; `kinshasa infra down` stops it."""
    try:
        _local_infra().up(with_postgres=postgres, attached=False, report=typer.echo, brokers=brokers)
    except InfraError as exc:
        _fail(exc)
    infra_status()


@infra_app.command("status")
def infra_status() -> None:
    """Show each piece of infrastructure, its address and whether it answers."""
    rows = _local_infra().status()
    for row in rows:
        typer.echo(row.line())
    if not all(r.healthy for r in rows):
        raise typer.Exit(code=3)


@infra_app.command("down")
def infra_down() -> None:
    """Stop every infrastructure process `infra up` started."""
    _local_infra().down(report=typer.echo)


@app.command("up")
def up(postgres: str | None = typer.Option(
        None, "--postgres", metavar="URL",
        help="Run every component on this PostgreSQL server (one database per component)."),
       service: list[str] = typer.Option(
        [], "--service", metavar="PACKAGE.MODULE:ATTRIBUTE",
        help="Also run this service of yours (repeatable), e.g. tickets.service:tickets.")) -> None:
    """Start the whole stack in the foreground; Ctrl-C stops all of it."""
    from kinshasa.launcher import run_stack
    from kinshasa.topics.admin import TopicAdminError
    from kinshasa.topics.checks import TopicCheckError

    # Turn SIGTERM into the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run_stack(postgres, report=typer.echo, services=service)
    except (InfraError, LookupError, ValueError, TopicAdminError, TopicCheckError) as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("stopped.")


@app.command("mcp")
def mcp(url: str | None = typer.Option(
            None, "--url", envvar="KINSHASA_URL", metavar="URL",
            help="The gateway (its GraphQL URL or its base URL); default from KINSHASA_GATEWAY_HOST/PORT: "
                 "http://127.0.0.1:8000/graphql."),
        key: str | None = typer.Option(
            None, "--key", envvar="KINSHASA_KEY", metavar="KEY", show_default=False,
            help="The agent's or operator's key. Prefer KINSHASA_KEY or --key-file: a key on the command "
                 "line is visible in the process list."),
        key_file: Path | None = typer.Option(
            None, "--key-file", metavar="PATH",
            help="A file holding the key; it wins over --key and KINSHASA_KEY.")) -> None:
    """Serve Kinshasa as MCP tools on stdin/stdout, for an agent host that starts it as a subprocess.

    The key comes from --key-file, else --key or KINSHASA_KEY. With KINSHASA_MCP_ENTRY_POINT=NAME the
    session starts its own run on its first write and finishes it on exit.
    """
    import anyio

    from kinshasa.client.client import graphql_url
    from kinshasa.kernel.logs import configure_logging
    from kinshasa.mcp.settings import McpSettings
    from kinshasa.mcp.stdio import StartupError, serve_stdio
    from kinshasa.settings import GatewaySettings

    stack = StackSettings()
    # stdout carries the protocol: every log line goes to stderr.
    configure_logging("mcp", stack.log_level, stream=sys.stderr, fmt=stack.log_format)
    # A key file is the deliberate choice for this one command; KINSHASA_KEY may be set for the whole shell.
    if key_file is not None:
        try:
            key = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            typer.secho(f"error: cannot read the key file {key_file}: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from exc
    else:
        key = (key or "").strip()
    if not key:
        typer.secho("error: no key: set KINSHASA_KEY or pass --key-file with an agent's or operator's key "
                    "(a dev stack writes them to <KINSHASA_DATA_DIR>/credentials.json)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    gateway = GatewaySettings()
    target = graphql_url(url or f"http://{gateway.host}:{gateway.port}")
    try:
        anyio.run(serve_stdio, target, key, McpSettings())
    except StartupError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
