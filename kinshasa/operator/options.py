"""What every operator command shares: the --gateway and --key options, the client they make, how a
refusal is shown, and a paged listing printed as it arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NoReturn

import typer

from kinshasa.operator.gateway_client import GatewayClient, operator_key
from kinshasa.settings import GatewaySettings, StackSettings

GATEWAY_OPT = typer.Option(None, "--gateway", help="GraphQL URL of the gateway (default from "
                           "KINSHASA_GATEWAY_HOST/PORT).")
KEY_OPT = typer.Option(None, "--key", envvar="KINSHASA_OPERATOR_KEY", help="Operator key (default: the dev "
                       "stack's credentials file).")


def connect(gateway: str | None, key: str | None) -> GatewayClient:
    """A client for the gateway named, else the configured one, with the key given, else the dev key."""
    if gateway is None:
        settings = GatewaySettings()
        gateway = f"http://{settings.host}:{settings.port}/graphql"
    return GatewayClient(url=gateway, key=operator_key(key, StackSettings().data_dir))


def fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def echo_pages(client: GatewayClient, query: str, variables: dict[str, Any], field: str, limit: int,
               line: Callable[[dict[str, Any]], str]) -> None:
    """Print up to `limit` nodes of a paged connection, one line each, a page at a time as it arrives."""

    async def follow() -> None:
        async for nodes in client.pages(query, variables, field, limit):
            for node in nodes:
                typer.echo(line(node))

    asyncio.run(follow())
