"""Alembic's entry point for Kinshasa's migrations: runs them on the connection `upgrade` hands over."""

from kinshasa.migrations import run_env

run_env()
