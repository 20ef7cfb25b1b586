"""`kinshasa receipts`: operator commands over a component's receipt chain (verify it, name every break)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import make_url

from kinshasa.kernel.database import DatabaseUrlError, create_engine, normalise_url
from kinshasa.kernel.receipts import ReceiptChain, VerifyReport
from kinshasa.settings import (
    SERVICE_NAMES,
    ComponentSettings,
    CoordinatorSettings,
    GatewaySettings,
    ServiceSettings,
    StackSettings,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.callback()
def receipts() -> None:
    """Hash-chained receipts of each component's cross-component emissions."""
    # A callback keeps `verify` a subcommand even when this app runs on its own (tests, scripts):
    # typer would otherwise collapse a one-command app into that command.


COMPONENTS = ("gateway", "coordinator", *SERVICE_NAMES)


class ReceiptsCliError(Exception):
    """A problem finding or opening the component's store (not a problem in the chain)."""


def component_settings(component: str) -> ComponentSettings:
    """The settings class each component process builds, so the CLI finds the same database."""
    if component == "gateway":
        return GatewaySettings()
    if component == "coordinator":
        return CoordinatorSettings()
    if component in SERVICE_NAMES:
        return ServiceSettings.for_service(component)
    raise ReceiptsCliError(f"unknown component {component!r}: use one of {', '.join(COMPONENTS)}")


def resolve_database_url(component: str, database_url: str | None) -> str:
    settings = component_settings(component)  # also refuses a misspelt component name
    if database_url:
        return database_url
    return settings.resolved_database_url(StackSettings(), component)


def check_database_url(component: str, database_url: str) -> str:
    """The normalised URL, refusing a SQLite path that does not exist yet."""
    try:
        url = normalise_url(database_url)
    except DatabaseUrlError as exc:
        raise ReceiptsCliError(str(exc)) from exc
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # Opening a missing SQLite file would create an empty store and report a clean chain.
        if not Path(str(parsed.database)).exists():
            raise ReceiptsCliError(
                f"no database for {component} at {parsed.database}: start the component once, set "
                "KINSHASA_DATA_DIR to the stack's data directory, or pass --database-url")
    return url


async def verify_component(component: str, url: str) -> VerifyReport:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            has_table = await conn.run_sync(lambda sync: sa_inspect(sync).has_table("receipts"))
            if not has_table:
                raise ReceiptsCliError(
                    f"the database for {component} has no receipts table: it is not a Kinshasa "
                    "component store, or the component has never started; check --database-url")
            return await ReceiptChain(component).verify(conn)
    finally:
        await engine.dispose()


@app.command("verify")
def verify(
    component: str = typer.Option(..., "--component", "-c",
                                  help=f"Whose chain to check: {', '.join(COMPONENTS)}."),
    database_url: str | None = typer.Option(
        None, "--database-url",
        help="The component's database; default: from its settings (env) or the data dir's SQLite file."),
) -> None:
    """Walk the component's receipt chain; exit 1 naming each gap, broken link or altered receipt."""
    try:
        url = check_database_url(component, resolve_database_url(component, database_url))
        report = asyncio.run(verify_component(component, url))
    except ReceiptsCliError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    if report.ok:
        typer.echo(f"OK: {component} receipt chain intact, {report.checked} receipts verified "
                   f"(head seq {report.head_seq}, hash {report.head_hash[:16]}...)")
        return
    for line in report.problems():
        typer.echo(line)
    typer.secho(f"FAILED: {component} receipt chain has {len(report.problems())} problem(s) in "
                f"{report.checked} receipts; restore the named receipts from a backup and "
                "investigate who wrote to the receipts table", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)
