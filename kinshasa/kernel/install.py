"""Creates every kernel table (outbox, inbox, dead letters, receipts) in a component's database at start."""

from __future__ import annotations

import importlib
import importlib.util

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel import inbox, outbox  # noqa: F401  (importing declares their tables)
from kinshasa.kernel.tables import kernel_metadata

# Kernel modules that declare tables but may not exist in every build of the package yet.
OPTIONAL_TABLE_MODULES = ("kinshasa.kernel.dlq", "kinshasa.kernel.receipts")
_INSTALL_LOCK = 0x4B4E0004


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
    """Create the kernel tables that do not exist yet; safe to call on every start."""
    load_table_modules()
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # create_all checks then creates; two processes starting together must not both create.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INSTALL_LOCK})
        await conn.run_sync(kernel_metadata.create_all)
