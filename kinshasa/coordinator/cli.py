"""`kinshasa coordinator`: run the coordinator process (the operator's commands live in kinshasa.operator)."""

from __future__ import annotations

import logging

import typer

from kinshasa.coordinator.models import RevertPolicy
from kinshasa.coordinator.runtime import ROLES, CoordinatorOptions, CoordinatorRuntime, serve_forever
from kinshasa.kernel.component import run_component
from kinshasa.kernel.logs import configure_logging
from kinshasa.settings import CoordinatorSettings, StackSettings

log = logging.getLogger(__name__)

app = typer.Typer(help="The coordinator: ledger projection and Temporal revert workflows.",
                  add_completion=False, invoke_without_command=True)


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
        run_component(serve_forever(CoordinatorRuntime(stack=stack, settings=settings, options=options)))
    except Exception as exc:
        log.exception("coordinator failed")
        typer.secho(f"error: coordinator stopped: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from exc
