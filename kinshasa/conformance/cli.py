"""`kinshasa conformance --service NAME`: check a running service against the service contract."""

from __future__ import annotations

import asyncio

import typer

from kinshasa.conformance.errors import SetupError
from kinshasa.conformance.suite import run_conformance
from kinshasa.settings import StackSettings
from kinshasa.topics.catalogue import CATALOGUE

app = typer.Typer(add_completion=False, help="Check a running service against the service contract.")


@app.command("conformance")
def conformance(
    service: str = typer.Option(..., "--service", help="The service to check, as it names itself on the "
                                "catalogue (e.g. tickets)."),
    bootstrap: str | None = typer.Option(None, "--bootstrap", metavar="HOST:PORT",
                                         help="Kafka to use; default KINSHASA_KAFKA_BOOTSTRAP or "
                                              "127.0.0.1:9092."),
    timeout: float = typer.Option(30.0, "--timeout", metavar="S",
                                  help="Seconds to wait for each answer of the service."),
    catalogue_topic: str | None = typer.Option(None, "--catalogue-topic", metavar="T",
                                               help=f"Where services publish their declarations (default "
                                                    f"{CATALOGUE}, with the suffix if one is given)."),
    topic_suffix: str | None = typer.Option(None, "--topic-suffix", metavar="SUFFIX",
                                            help="Check an isolated copy started with --topic-suffix."),
) -> None:
    """Drive SERVICE over Kafka on a run id of its own and print one row per check of
    docs/service-contract.md section 10; exit 0 only if every check passed (1 if one failed, 2 if the
    service could not be checked at all)."""
    address = bootstrap or StackSettings().kafka_bootstrap
    try:
        report = asyncio.run(run_conformance(service, address, timeout_s=timeout,
                                             catalogue_topic=catalogue_topic,
                                             topic_suffix=topic_suffix))
    except SetupError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"{service}: run id {report.run_id} (every command of this check carries it)")
    typer.echo(report.render())
    raise typer.Exit(code=0 if report.ok else 1)
