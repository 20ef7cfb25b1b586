"""`kinshasa topics`: create the catalogue's topics on a broker and show what the broker holds."""

from __future__ import annotations

from typing import NoReturn

import typer

from kinshasa.settings import SERVICE_NAMES, StackSettings
from kinshasa.topics.admin import TopicAdminError, describe_topics, ensure_topics, list_topics
from kinshasa.topics.catalogue import GATEWAY, PREFIX, catalogue, dlq_topic, group_id, with_suffix
from kinshasa.topics.checks import TopicCheckError, TopicMinimums, check_topics

app = typer.Typer(help="The log's topics: create the catalogue, list what the broker holds.",
                  no_args_is_help=True)

BOOTSTRAP = typer.Option(None, "--bootstrap",
                         help="Kafka bootstrap servers; default KINSHASA_KAFKA_BOOTSTRAP.")
TIMEOUT = typer.Option(30.0, "--timeout", help="Seconds to wait for each admin request.")
SERVICES = typer.Option(None, "--service",
                        help="Include this service's topics (repeatable); default: every built-in service.")


def _bootstrap(value: str | None) -> str:
    return value or StackSettings().kafka_bootstrap


def _fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command("ensure")
def ensure(
    bootstrap: str | None = BOOTSTRAP,
    replication_factor: int | None = typer.Option(
        None, "--replication-factor", min=1,
        help="Replicas per partition for topics created now; default KINSHASA_MIN_REPLICATION (1)."),
    min_insync_replicas: int | None = typer.Option(
        None, "--min-insync-replicas", min=1,
        help="min.insync.replicas of topics created now; default KINSHASA_MIN_INSYNC_REPLICAS, else one "
             "less than the replication factor (at least 1)."),
    timeout: float = TIMEOUT,
    service: list[str] | None = SERVICES,
    topic_suffix: str | None = typer.Option(
        None, "--topic-suffix", metavar="SUFFIX",
        help="The topics of an isolated copy, as `kinshasa service` and `kinshasa coordinator` use them "
             "with the same --topic-suffix."),
    strict: bool = typer.Option(
        False, "--strict",
        help="Also exit 1 on differences the components run with (more partitions, another retention)."),
) -> None:
    """Create missing catalogue topics, then check every topic as the components will at start.

    The only command that creates topics: components check theirs at start and refuse to run on a topic
    that is missing or below KINSHASA_MIN_REPLICATION / KINSHASA_MIN_INSYNC_REPLICAS. Exit 1 when an
    existing topic would be refused (fewer partitions, below the minimums, another cleanup policy);
    differences the components accept (more partitions, another retention) are reported and exit 0,
    unless --strict, so a deployment that waits on this command still starts after a topic was grown.
    """
    address = _bootstrap(bootstrap)
    try:
        minimums = TopicMinimums.from_settings(StackSettings(), replication_factor, min_insync_replicas)
        specs = catalogue(service or SERVICE_NAMES)
        if topic_suffix is not None:
            # The gateway runs no suffixed copy: its DLQ has none.
            specs = [with_suffix(spec, topic_suffix) for spec in specs
                     if spec.name != dlq_topic(group_id(GATEWAY))]
        report = ensure_topics(address, specs, replication_factor=minimums.replication, timeout=timeout,
                               min_insync_replicas=minimums.insync_replicas)
        refusal: TopicCheckError | None = None
        try:
            check_topics(address, specs, minimums, component="kinshasa topics ensure", timeout=timeout)
        except TopicCheckError as exc:
            refusal = exc
    except (TopicAdminError, ValueError) as exc:
        _fail(exc)
    for name in report.created:
        typer.echo(f"created   {name}")
    for name in report.existing:
        typer.echo(f"existing  {name}")
    for mismatch in report.mismatches:
        typer.secho(f"MISMATCH  {mismatch.line()}", fg=typer.colors.YELLOW)
    typer.echo(f"{len(report.created)} created, {len(report.existing)} existing, "
               f"{len(report.mismatches)} mismatches on {address}")
    if refusal is not None:
        typer.secho("Components would refuse these topics:", fg=typer.colors.RED, err=True)
        for problem in refusal.problems:
            typer.secho(f"  - {problem.line()}", fg=typer.colors.RED, err=True)
    if refusal is not None or (strict and report.mismatches):
        typer.secho("Existing topics are never altered: fix them by hand (kafka-configs / kafka-topics) "
                    "or recreate them, then run `kinshasa topics ensure` again.", err=True)
        raise typer.Exit(code=1)


@app.command("list")
def list_(
    bootstrap: str | None = BOOTSTRAP, timeout: float = TIMEOUT, service: list[str] | None = SERVICES
) -> None:
    """Show each catalogue topic with its partitions on the broker, then other kinshasa.* topics there."""
    address = _bootstrap(bootstrap)
    try:
        specs = catalogue(service or SERVICE_NAMES)
        present = list_topics(address, timeout=timeout)
        states = describe_topics(address, [s.name for s in specs if s.name in present], timeout=timeout)
    except (TopicAdminError, ValueError) as exc:
        _fail(exc)
    width = max(len(s.name) for s in specs)
    for spec in specs:
        state = states.get(spec.name)
        found = "missing" if state is None else f"{state.partitions} partitions"
        typer.echo(f"{spec.name:<{width}}  {found:<14} (catalogue {spec.partitions}, keyed by "
                   f"{spec.keyed_by})  {spec.description}")
    known = {s.name for s in specs}
    for name in sorted(n for n in present if n.startswith(f"{PREFIX}.") and n not in known):
        typer.echo(f"{name:<{width}}  {present[name]} partitions (not in the catalogue)")
