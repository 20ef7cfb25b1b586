"""The `kinshasa` command: infrastructure, the stack, components and operator tools hang off this app."""

from __future__ import annotations

import signal
import sys
import time

import typer

from kinshasa.infra.process import InfraError
from kinshasa.infra.stack import LocalInfra
from kinshasa.settings import InfraSettings, StackSettings

app = typer.Typer(help="Kinshasa: the deterministic ring AI agents write through.",
                  no_args_is_help=True, add_completion=False)
infra_app = typer.Typer(help="Local Kafka, Temporal and PostgreSQL, started by the project itself.",
                        no_args_is_help=True)
app.add_typer(infra_app, name="infra")


def _local_infra() -> LocalInfra:
    return LocalInfra.from_settings(StackSettings(), InfraSettings())


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@infra_app.command("up")
def infra_up(postgres: bool = typer.Option(False, "--postgres", help="Also start PostgreSQL.")) -> None:
    """Start the infrastructure in the background; `kinshasa infra down` stops it."""
    try:
        _local_infra().up(with_postgres=postgres, attached=False, report=typer.echo)
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
def up(postgres: bool = typer.Option(False, "--postgres", help="Also start PostgreSQL.")) -> None:
    """Start the stack in the foreground; Ctrl-C stops all of it."""
    infra = _local_infra()
    # Turn SIGTERM into the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        infra.up(with_postgres=postgres, attached=True, report=typer.echo)
        for row in infra.status():
            typer.echo(row.line())
        typer.echo("Infrastructure is up. Ctrl-C stops it.")
        while True:
            time.sleep(1)
    except InfraError as exc:
        infra.down(report=typer.echo)
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("stopping...")
        infra.down(report=typer.echo)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
