"""Fixtures of the fault suite: a broker the test may kill or pause, and an outbox for a relay to drain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.kernel.database import create_engine
from kinshasa.migrations.install import install_kernel_tables
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import catalogue
from tests.faults.brokers import own_broker


@pytest.fixture
def broker_overrides() -> dict[str, str]:
    """server.properties settings the `broker` fixture's broker takes on top of its own; a module that
    needs some overrides this fixture."""
    return {}


@pytest.fixture
def broker(tmp_path: Path, broker_overrides: dict[str, str]) -> Iterator[KafkaBroker]:
    """A broker of this test's own: it is killed or paused, so it cannot be the session's. It holds the
    default catalogue's topics, as `kinshasa topics ensure` leaves them, so components on it start."""
    with own_broker(tmp_path / "kafka", broker_overrides) as own:
        ensure_topics(own.bootstrap, catalogue())
        yield own


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A SQLite database with the kernel's tables: the outbox a relay publishes from."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'outbox.sqlite3'}")
    await install_kernel_tables(engine)
    try:
        yield engine
    finally:
        await engine.dispose()
