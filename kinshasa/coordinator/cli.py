"""`kinshasa coordinator` (the process) and the operator's `revert`, `runs` and `run` (via the gateway).

`app` runs the coordinator; `operator_app` holds the operator commands, which talk only to the gateway's
GraphQL with an operator key (the gateway rings the bell, the coordinator does the work).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import typer

from kinshasa.coordinator.models import RevertPolicy
from kinshasa.coordinator.runtime import ROLES, CoordinatorOptions, CoordinatorRuntime, serve_forever
from kinshasa.kernel.logs import configure_logging
from kinshasa.operator.gateway_client import (
    RUNS_HEADER,
    GatewayClient,
    GatewayError,
    Progress,
    operator_key,
    run_line,
    selector,
    timeline,
    watch,
)
from kinshasa.settings import CoordinatorSettings, GatewaySettings, StackSettings

log = logging.getLogger(__name__)

app = typer.Typer(help="The coordinator: ledger projection and Temporal revert workflows.",
                  add_completion=False, invoke_without_command=True)
operator_app = typer.Typer(help="Operator commands: revert runs, list runs, read a run's ledger timeline.",
                           no_args_is_help=True, add_completion=False)


@app.callback()
def coordinator(
    ctx: typer.Context,
    role: list[str] = typer.Option(list(ROLES), "--role", help=f"Run only these parts ({', '.join(ROLES)}); "
                                   "repeat the option. Default: all of them."),
    topic_suffix: str | None = typer.Option(None, "--topic-suffix", help="Use an isolated copy of every "
                                            "topic (`<topic>.<suffix>`), as `kinshasa service` does."),
    policy_json: str | None = typer.Option(None, "--policy-json", help="Revert policy as JSON (attempts, "
                                           "backoff_s, straggler_timeout_s, entity_depth, ...)."),
    sweep_interval: float = typer.Option(2.0, "--sweep-interval", help="Seconds between retries of revert "
                                         "starts that failed (Temporal unreachable); a trigger that keeps "
                                         "failing backs off to 30 s or this, whichever is longer."),
) -> None:
    """Run the coordinator until SIGTERM or Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    stack = StackSettings()
    settings = CoordinatorSettings()
    configure_logging("coordinator", stack.log_level, fmt=stack.log_format)
    try:
        policy = RevertPolicy.model_validate_json(policy_json) if policy_json else RevertPolicy()
        options = CoordinatorOptions(roles=tuple(dict.fromkeys(role)), topic_suffix=topic_suffix,
                                     policy=policy, sweep_interval_s=sweep_interval,
                                     sweep_max_backoff_s=max(30.0, sweep_interval))
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    try:
        asyncio.run(serve_forever(CoordinatorRuntime(stack=stack, settings=settings, options=options)))
    except Exception as exc:
        log.exception("coordinator failed")
        typer.secho(f"error: coordinator stopped: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from exc


# operator commands


def _gateway_url() -> str:
    gateway = GatewaySettings()
    return f"http://{gateway.host}:{gateway.port}/graphql"


def _client(gateway: str | None, key: str | None) -> GatewayClient:
    return GatewayClient(url=gateway or _gateway_url(), key=operator_key(key, StackSettings().data_dir))


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


GATEWAY_OPT = typer.Option(None, "--gateway", help="GraphQL URL of the gateway (default from "
                           "KINSHASA_GATEWAY_HOST/PORT).")
KEY_OPT = typer.Option(None, "--key", envvar="KINSHASA_OPERATOR_KEY", help="Operator key (default: the dev "
                       "stack's credentials file).")


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


@operator_app.command("revert")
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
        client = _client(gateway, key)
        if len(run) == 1 and not (agent or entry_point or since or until):
            reverted = asyncio.run(client.revert_run(run[0], reason))
            requested, unchanged = [reverted], []
        else:
            result = asyncio.run(client.revert_runs(
                selector(run, agent, entry_point, _utc(since), _utc(until)), reason))
            requested, unchanged = result["requested"], result["unchanged"]
    except GatewayError as exc:
        _fail(exc)
        return
    typer.echo(f"revert requested for {len(requested)} run(s)"
               + (f"; {len(unchanged)} already reverting or reverted (left alone)" if unchanged else ""))
    ids = [r["id"] for r in requested] + [r["id"] for r in unchanged if r["status"] == "REVERTING"]
    if not wait or not ids:
        for r in requested + unchanged:
            typer.echo(run_line(r))
        return
    bar = _Bar()
    try:
        final = asyncio.run(watch(client, ids, bar, timeout_s=timeout))
    except GatewayError as exc:
        bar.close()
        _fail(exc)
        return
    bar.close()
    for run_id in ids:
        typer.echo(run_line(final[run_id]))
    failed = [r for r in ids if final[r]["status"] == "REVERT_FAILED"]
    pending = [r for r in ids if final[r]["status"] not in ("REVERTED", "REVERT_FAILED")]
    if failed:
        typer.secho(f"{len(failed)} run(s) ended REVERT_FAILED: `kinshasa run <id>` shows the refused steps; "
                    "resolve them and revert again.", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=3)
    if pending:
        typer.secho(f"{len(pending)} run(s) still reverting after {timeout:.0f}s; follow with `kinshasa runs "
                    "--status REVERTING`.", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=4)


@operator_app.command("runs")
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
        filter["startedAfter"] = _utc(since).isoformat()  # type: ignore[union-attr]
    if until:
        filter["startedBefore"] = _utc(until).isoformat()  # type: ignore[union-attr]
    try:
        client = _client(gateway, key)
        shown, after = 0, None
        typer.echo(RUNS_HEADER)
        while shown < limit:
            page = asyncio.run(client.runs(filter, min(100, limit - shown), after))
            for node in page["nodes"]:
                typer.echo(run_line(node))
            shown += len(page["nodes"])
            if not page["pageInfo"]["hasNextPage"] or not page["nodes"]:
                break
            after = page["pageInfo"]["endCursor"]
    except GatewayError as exc:
        _fail(exc)


@operator_app.command("run")
def run_detail(
    run_id: str = typer.Argument(..., help="The run id."),
    steps: int = typer.Option(50, "--steps", min=1, max=1000, help="How many of the newest steps to show."),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """A run's ledger timeline: status, breaker, counts and its steps newest first."""
    try:
        client = _client(gateway, key)
        detail = asyncio.run(client.run(run_id, steps))
    except GatewayError as exc:
        _fail(exc)
        return
    for line in timeline(detail):
        typer.echo(line)
    for warning in client.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
