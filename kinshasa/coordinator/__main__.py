"""`python -m kinshasa.coordinator`: the coordinator process, as `kinshasa coordinator` runs it."""

from kinshasa.coordinator.cli import app

if __name__ == "__main__":
    app(prog_name="kinshasa coordinator")
