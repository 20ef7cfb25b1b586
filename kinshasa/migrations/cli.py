"""`kinshasa db`: migrate a component's database (`upgrade`) or say where it stands (`current`)."""

from __future__ import annotations

import asyncio

import typer

from kinshasa.kernel.database import create_engine
from kinshasa.kernel.receipts_cli import ReceiptsCliError, check_database_url, resolve_database_url
from kinshasa.migrations import BranchState, MigrationError, current, upgrade_component

app = typer.Typer(no_args_is_help=True, add_completion=False)

COMPONENT_HELP = ("Whose database: gateway, coordinator or a service's name (a service of your own needs "
                  "--database-url; only its kernel tables migrate here).")
URL_HELP = "The component's database; default: from its settings (env) or the data dir's SQLite file."


@app.callback()
def db() -> None:
    """Schema migrations of a component's database (components also migrate on every start)."""


def _url(component: str, database_url: str | None) -> str:
    if database_url is None:
        database_url = resolve_database_url(component, None)
    return check_database_url(component, database_url)


def _line(state: BranchState) -> str:
    where = state.current or "no version (empty, or made before migrations)"
    return f"{state.branch}: {where}" + ("" if state.up_to_date else f" (newest: {state.head})")


async def _upgrade(component: str, url: str) -> tuple[list[str], list[BranchState]]:
    engine = create_engine(url)
    try:
        moved = await upgrade_component(engine, component)
        return moved, await current(engine, component)
    finally:
        await engine.dispose()


async def _current(component: str, url: str) -> list[BranchState]:
    engine = create_engine(url)
    try:
        return await current(engine, component)
    finally:
        await engine.dispose()


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2) from error


@app.command("upgrade")
def upgrade(
    component: str = typer.Option(..., "--component", "-c", help=COMPONENT_HELP),
    database_url: str | None = typer.Option(None, "--database-url", help=URL_HELP),
) -> None:
    """Bring the database to this build's schema: what a component's start does, without starting it."""
    try:
        moved, states = asyncio.run(_upgrade(component, _url(component, database_url)))
    except (ReceiptsCliError, MigrationError) as error:
        _fail(error)
        return
    typer.echo(f"{component}: " + (f"upgraded {', '.join(moved)}" if moved else "already up to date"))
    for state in states:
        typer.echo(_line(state))


@app.command("current")
def show_current(
    component: str = typer.Option(..., "--component", "-c", help=COMPONENT_HELP),
    database_url: str | None = typer.Option(None, "--database-url", help=URL_HELP),
) -> None:
    """Each branch's revision in the database and whether it is the newest; exit 1 when one is behind."""
    try:
        states = asyncio.run(_current(component, _url(component, database_url)))
    except (ReceiptsCliError, MigrationError) as error:
        _fail(error)
        return
    for state in states:
        typer.echo(_line(state))
    if not all(state.up_to_date for state in states):
        raise typer.Exit(code=1)
