"""`kinshasa new-service NAME`: write a ready service package to start from."""

from __future__ import annotations

from pathlib import Path

import typer

from kinshasa.scaffold import ScaffoldError, write_service

app = typer.Typer(add_completion=False, help="Start a service of your own.")


@app.command("new-service")
def new_service(
    name: str = typer.Argument(..., help="The service's name, also its Python package: lowercase "
                                         "snake_case, e.g. support_desk."),
    directory: Path = typer.Option(Path("."), "--dir", metavar="PATH",
                                   help="Where to write the package directory NAME/ (default: here)."),
) -> None:
    """Write NAME/: a package with a service (one entity, one create operation beside its inverse, a read
    model), tests that run it on a real broker through the conformance kit, and a README. Exits 2,
    writing nothing, for a name that cannot be used or a NAME/ that exists."""
    try:
        target = write_service(name, directory)
    except ScaffoldError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"wrote {target}/; next:\n"
               f"  pip install -e '{target}[test]'\n"
               f"  cd {target} && pytest\n"
               f"  kinshasa up --service {name}.service:{name}")
