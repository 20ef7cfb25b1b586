"""`kinshasa service <name>`: run one domain service as its own process (and `smtp-sink`, the dev mail sink).

Settings come from the environment, read once here: the stack's (`KINSHASA_KAFKA_BOOTSTRAP`,
`KINSHASA_DATA_DIR`, `KINSHASA_LOG_LEVEL`) and the service's own (`KINSHASA_SVC_<NAME>_DATABASE_URL`,
`..._ADMIN_HOST`, `..._ADMIN_PORT`, and for the notifier `..._SMTP_HOST`, `..._SMTP_PORT`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import typer

from kinshasa.kernel.component import run_component
from kinshasa.kernel.logs import configure_logging
from kinshasa.services.kit.declarations import Service
from kinshasa.services.kit.errors import ServiceDeclarationError
from kinshasa.services.kit.runtime import RuntimeOptions, ServiceRuntime, ServiceTopics, serve_forever
from kinshasa.services.registry import UnknownServiceError, load_module_service, load_service, service_names
from kinshasa.settings import ServiceSettings, StackSettings

app = typer.Typer(help="Run a Kinshasa domain service (one process per service): an example by name, or "
                       "your own with --module package.module:attribute.", add_completion=False,
                  invoke_without_command=True)
log = logging.getLogger(__name__)


def run_service(name: str, *, topic_suffix: str | None = None, instance_id: str | None = None,
                module: str | None = None) -> None:
    """Bootstrap: settings, logging, the verified service declaration, then the runtime until a signal."""
    stack = StackSettings()
    try:
        service: Service = load_module_service(module) if module else load_service(name)
    except (ServiceDeclarationError, UnknownServiceError) as exc:
        typer.secho(f"error: service {module or name} refuses to start: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    name = service.name
    settings = ServiceSettings.for_service(name)
    configure_logging(name, stack.log_level, fmt=stack.log_format)
    try:
        runtime = ServiceRuntime(service, stack=stack, settings=settings,
                                 topics=ServiceTopics.for_service(name, topic_suffix),
                                 options=RuntimeOptions(instance_id=instance_id))
    except ServiceDeclarationError as exc:
        typer.secho(f"error: service {name} refuses to start: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    try:
        run_component(serve_forever(runtime))
    except Exception as exc:
        log.exception("service %s failed", name)
        typer.secho(f"error: service {name} stopped: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from exc


_SUFFIX_HELP = ("Run an isolated copy: topics get this suffix and the consumer group a role of this name "
                "(tests, a second stack on one broker). Lowercase letters, digits, '_'.")
_INSTANCE_HELP = ("Static consumer-group membership id; a restart with the same id takes its partitions back "
                  "at once. Give each replica its own.")


def _command(name: str) -> Callable[..., None]:
    def command(
        topic_suffix: str | None = typer.Option(None, "--topic-suffix", help=_SUFFIX_HELP),
        instance_id: str | None = typer.Option(None, "--instance-id", help=_INSTANCE_HELP),
    ) -> None:
        run_service(name, topic_suffix=topic_suffix, instance_id=instance_id)

    command.__doc__ = f"Run the {name} service until SIGTERM or Ctrl-C."
    return command


@app.callback()
def main(
    ctx: typer.Context,
    module: str | None = typer.Option(
        None, "--module", metavar="PACKAGE.MODULE:ATTRIBUTE",
        help="Run the service declared at this attribute (a kinshasa.services.kit.Service), e.g. "
             "tickets.service:tickets. Settings use its name: KINSHASA_SVC_<NAME>_..."),
    topic_suffix: str | None = typer.Option(None, "--topic-suffix", help=_SUFFIX_HELP),
    instance_id: str | None = typer.Option(None, "--instance-id", help=_INSTANCE_HELP),
) -> None:
    """Run a service until SIGTERM or Ctrl-C."""
    if module is not None:
        if ctx.invoked_subcommand is not None:
            raise typer.BadParameter("give either --module or a service name, not both",
                                     param_hint="--module")
        run_service("", topic_suffix=topic_suffix, instance_id=instance_id, module=module)
    elif ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(code=2)


for _name in service_names():
    app.command(_name)(_command(_name))


@app.command("smtp-sink")
def smtp_sink(
    directory: Path = typer.Option(Path(".kinshasa/mail"), "--dir", help="Where received emails are stored."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(2525, "--port"),
) -> None:
    """Run the local SMTP sink the notifier delivers to in development and tests."""
    from kinshasa.services.smtp_sink import serve

    serve(directory, host, port)
