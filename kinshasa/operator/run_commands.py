"""`kinshasa revert`, `kinshasa runs` and `kinshasa run`: revert runs, list them, read one's ledger timeline.

They talk only to the gateway's GraphQL with an operator key (the gateway rings the bell, the coordinator
does the work). Every revert goes through `revertRuns`, one run included, so the CLI selects runs by the
same rule whatever the options.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import typer

from kinshasa.operator.gateway_client import (
    RUNS,
    RUNS_HEADER,
    GatewayError,
    Progress,
    run_line,
    selection,
    timeline,
    watch,
)
from kinshasa.operator.options import GATEWAY_OPT, KEY_OPT, connect, echo_pages, fail
from kinshasa.schemas.clock import as_utc
from kinshasa.schemas.run_status import REVERT_SETTLED, RunStatus

app = typer.Typer(help="Operator commands: revert runs, list runs, read a run's ledger timeline.",
                  no_args_is_help=True, add_completion=False)


class _Bar:
    """A one-line progress display that rewrites itself on a terminal and logs a line otherwise."""

    def __init__(self) -> None:
        self.tty = typer.get_text_stream("stdout").isatty()
        self.last = ""

    def __call__(self, p: Progress) -> None:
        width = 30
        done = int(width * p.settled / p.runs) if p.runs else width
        line = (f"[{'#' * done}{'.' * (width - done)}] runs {p.settled}/{p.runs} settled"
                f"{f' ({p.failed} failed)' if p.failed else ''}; steps undone {p.compensated}/{p.applied}")
        if line == self.last:
            return
        self.last = line
        typer.echo(f"\r{line}", nl=not self.tty)

    def close(self) -> None:
        if self.tty:
            typer.echo("")


@app.command("revert")
def revert(
    run: list[str] = typer.Option([], "--run", help="Run id to revert; repeat for several."),
    agent: str | None = typer.Option(None, "--agent", help="Every run of this agent."),
    entry_point: str | None = typer.Option(None, "--entry-point", help="Every run of this entry point."),
    since: datetime | None = typer.Option(None, "--since", help="Runs started at or after (UTC if no zone)."),
    until: datetime | None = typer.Option(None, "--until", help="Runs started before (UTC if no zone)."),
    reason: str = typer.Option(..., "--reason", help="Why: recorded with the revert and in the alert trail."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the reverts until they settle."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to follow before giving up watching."),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """Revert one run, several, or every run of an agent / entry point / time range."""
    try:
        chosen = selection(run, agent, entry_point, since, until)
        client = connect(gateway, key)
        result = asyncio.run(client.revert_runs(chosen.to_graphql(), reason))
    except GatewayError as exc:
        fail(exc)
    requested, unchanged = result["requested"], result["unchanged"]
    typer.echo(f"revert requested for {len(requested)} run(s)"
               + (f"; {len(unchanged)} already reverting or reverted (left alone)" if unchanged else ""))
    ids = [r["id"] for r in requested] + [r["id"] for r in unchanged if r["status"] == RunStatus.REVERTING]
    if not wait or not ids:
        for r in requested + unchanged:
            typer.echo(run_line(r))
        return
    bar = _Bar()
    try:
        final = asyncio.run(watch(client, ids, bar, timeout_s=timeout))
    except GatewayError as exc:
        bar.close()
        fail(exc)
    bar.close()
    for run_id in ids:
        typer.echo(run_line(final[run_id]))
    failed = [r for r in ids if final[r]["status"] == RunStatus.REVERT_FAILED]
    pending = [r for r in ids if final[r]["status"] not in REVERT_SETTLED]
    if failed:
        typer.secho(f"{len(failed)} run(s) ended REVERT_FAILED: `kinshasa run <id>` shows the refused steps; "
                    "resolve them and revert again.", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=3)
    if pending:
        typer.secho(f"{len(pending)} run(s) still reverting after {timeout:.0f}s; follow with `kinshasa runs "
                    "--status REVERTING`.", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=4)


@app.command("runs")
def runs(
    agent: str | None = typer.Option(None, "--agent"),
    entry_point: str | None = typer.Option(None, "--entry-point"),
    status: str | None = typer.Option(None, "--status", help="RUNNING, FINISHED, TRIPPED, REVERTING, "
                                      "REVERTED or REVERT_FAILED"),
    since: datetime | None = typer.Option(None, "--since"),
    until: datetime | None = typer.Option(None, "--until"),
    limit: int = typer.Option(50, "--limit", min=1, max=1000),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """List runs, newest first, with their status and counts."""
    filter: dict[str, str] = {}
    if agent:
        filter["agentId"] = agent
    if entry_point:
        filter["entryPoint"] = entry_point
    if status:
        filter["status"] = status.upper()
    if since:
        filter["startedAfter"] = as_utc(since).isoformat()
    if until:
        filter["startedBefore"] = as_utc(until).isoformat()
    try:
        client = connect(gateway, key)
        typer.echo(RUNS_HEADER)
        echo_pages(client, RUNS, {"filter": filter}, "runs", limit, run_line)
    except GatewayError as exc:
        fail(exc)


@app.command("run")
def run_detail(
    run_id: str = typer.Argument(..., help="The run id."),
    steps: int = typer.Option(50, "--steps", min=1, max=1000, help="How many of the newest steps to show."),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """A run's ledger timeline: status, breaker, counts and its steps newest first."""
    try:
        client = connect(gateway, key)
        detail = asyncio.run(client.run(run_id, steps))
    except GatewayError as exc:
        fail(exc)
    for line in timeline(detail):
        typer.echo(line)
    for warning in client.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
