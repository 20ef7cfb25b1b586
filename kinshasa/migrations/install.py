"""Brings the kernel tables (outbox, inbox, dead letters, receipts) of a database up to date at start."""

from __future__ import annotations

import importlib
import importlib.util

from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel import inbox, outbox  # noqa: F401  (importing declares their tables)
from kinshasa.migrations import KERNEL, upgrade

# Kernel modules that declare tables but may not exist in every build of the package yet.
OPTIONAL_TABLE_MODULES = ("kinshasa.kernel.dlq", "kinshasa.kernel.receipts")


def load_table_modules() -> list[str]:
    """Import every kernel module that declares tables; returns the optional ones found."""
    found = []
    for name in OPTIONAL_TABLE_MODULES:
        # Only a missing module is skipped: one that exists but fails to import is a bug to surface.
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            found.append(name)
    return found


async def install_kernel_tables(engine: AsyncEngine) -> None:
    """Migrate the kernel tables to this build (kinshasa/migrations' `kernel` branch); safe on every start.

    A component's own start migrates its whole database (`kinshasa.migrations.upgrade_component`); this is
    for code that needs the kernel tables alone (tests, benchmarks, a service with no tables of its own).
    """
    await upgrade(engine, (KERNEL,))
