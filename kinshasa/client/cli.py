"""`kinshasa client-stubs`: write typed run methods for the catalogue of a running gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from kinshasa.client.client import Kinshasa, graphql_url
from kinshasa.client.errors import KinshasaError
from kinshasa.client.stubs import render

app = typer.Typer(add_completion=False)


@app.command("client-stubs")
def client_stubs(
    url: str = typer.Option("http://127.0.0.1:8000/graphql", "--url", envvar="KINSHASA_URL",
                            help="The gateway's GraphQL URL (or its base URL)."),
    key_file: Path = typer.Option(..., "--key-file", help="A file holding an agent's key."),
    out: Path = typer.Option(..., "--out", help="The Python module to write, e.g. agent_ops.py."),
) -> None:
    """Write TypedRun/TypedSyncRun Protocols: one typed method per operation the gateway offers now."""
    try:
        key = key_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        typer.secho(f"error: cannot read the key file {key_file}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc

    async def read() -> str:
        async with Kinshasa(graphql_url(url), key) as client:
            return render(await client.operations(), source=graphql_url(url))

    try:
        text = asyncio.run(read())
    except KinshasaError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from exc
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {out}: {text.count('async def ') - 1} operations")
