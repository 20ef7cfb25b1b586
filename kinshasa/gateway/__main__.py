"""`python -m kinshasa.gateway`: the gateway process, as `kinshasa gateway` runs it."""

from kinshasa.gateway.cli import app

app()
