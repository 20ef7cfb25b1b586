"""`python -m kinshasa.services <name>`: the same as `kinshasa service <name>`."""

from kinshasa.services.cli import app

if __name__ == "__main__":
    app(prog_name="kinshasa service")
