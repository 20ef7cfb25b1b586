"""`kinshasa receipts`: operator commands over the components' receipt chains (verify, name every break)."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path

import typer
from sqlalchemy.engine import make_url

from kinshasa.kernel.database import READ_ONLY, DatabaseUrlError, create_engine, normalise_url
from kinshasa.kernel.receipts import ChainReport, NoChainError, SourceCheck, verify_chain
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


# Each component's check that its receipts' sources still exist, imported only when that component is
# verified (the kernel does not depend on the gateway or the coordinator). Services have none yet: their
# receipts are checked against their outbox.
SOURCE_CHECKS = {
    "gateway": "kinshasa.gateway.receipts_view:gateway_sources",
    "coordinator": "kinshasa.coordinator.receipt_sources:ledger_sources",
}


def source_check(component: str) -> SourceCheck | None:
    where = SOURCE_CHECKS.get(component)
    if where is None:
        return None
    module, _, name = where.partition(":")
    check: SourceCheck = getattr(importlib.import_module(module), name)
    return check


async def verify_component(component: str, url: str) -> ChainReport:
    """The component's chain walked and linked; ReceiptsCliError when its database keeps no chain."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execution_options(**{READ_ONLY: True})  # a read: no write lock on SQLite
            return await verify_chain(conn, component, source_check(component))
    except NoChainError as exc:
        raise ReceiptsCliError(str(exc)) from exc
    finally:
        await engine.dispose()


def _verify_one(component: str, database_url: str | None) -> int:
    """Check one component and print what was found; returns 0 (intact), 1 (problems) or 2 (refused)."""
    try:
        url = check_database_url(component, resolve_database_url(component, database_url))
        report = asyncio.run(verify_component(component, url))
    except ReceiptsCliError as exc:
        typer.secho(f"REFUSED: {component}: {exc}", fg=typer.colors.RED, err=True)
        return 2
    if report.verified:
        typer.echo(f"OK: {component} receipt chain intact, {report.length} receipts verified "
                   f"(head seq {report.head_seq}, hash {report.head_hash[:16]}...)")
        return 0
    for line in report.problems:
        typer.echo(f"{component}: {line}")
    typer.secho(f"FAILED: {component} receipt chain has {len(report.problems)} problem(s) in "
                f"{report.length} receipts; restore the named receipts from a backup and "
                "investigate who wrote to the receipts table or the outbox", fg=typer.colors.RED, err=True)
    return 1


@app.command("verify")
def verify(
    component: str | None = typer.Option(
        None, "--component", "-c",
        help=f"Whose chain to check: {', '.join(COMPONENTS)}; default: every one of them (a component "
             "this stack does not run is REFUSED: name the ones it runs with -c)."),
    database_url: str | None = typer.Option(
        None, "--database-url",
        help="The component's database (with --component); default: from its settings (env) or the "
             "data dir's SQLite file."),
) -> None:
    """Walk each component's receipt chain and its links to the outbox and to the emissions' sources.

    Exit 0 when every chain is intact; 1 naming each gap, broken link, altered receipt, emission
    without a receipt or receipt without a source; 2 when a component could not be checked (no
    database, or it keeps no receipt chain: never reported as a valid empty chain).
    """
    if component is None and database_url is not None:
        typer.secho("error: --database-url names one component's database: pass --component too",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    if component is not None and component not in COMPONENTS:
        typer.secho(f"error: unknown component {component!r}: use one of {', '.join(COMPONENTS)}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    codes = [_verify_one(name, database_url) for name in ([component] if component else COMPONENTS)]
    # A broken chain outranks one that could not be read: it is the finding an operator must act on.
    code = 1 if 1 in codes else max(codes)
    if code:
        raise typer.Exit(code=code)
