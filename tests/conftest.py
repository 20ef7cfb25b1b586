"""Session fixtures starting real Kafka, Temporal and PostgreSQL with the code behind `kinshasa infra`."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.postgres import PostgresCluster
from kinshasa.infra.process import free_port
from kinshasa.infra.temporal import TemporalServer
from kinshasa.kernel.database import create_engine
from kinshasa.migrations.install import install_kernel_tables
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import catalogue

REPO = Path(__file__).resolve().parent.parent
# The jar cache is shared with `make run`, so the suite downloads Kafka at most once per checkout.
CACHE = REPO / ".kinshasa" / "cache"


# The broker fixture service authors use (kinshasa.testing), on the checkout's jar cache.
os.environ.setdefault("KINSHASA_CACHE_DIR", str(CACHE))
pytest_plugins = ["kinshasa.testing"]


@pytest.fixture(scope="session")
def kafka(kinshasa_kafka: KafkaBroker) -> KafkaBroker:
    """The session's broker, holding the default catalogue's topics as `kinshasa topics ensure` creates
    them: components only check their topics, so a gateway or a coordinator on the shared names starts.
    Topics with a test's own suffix are created by the harness that starts the component."""
    ensure_topics(kinshasa_kafka.bootstrap, catalogue())
    return kinshasa_kafka


@pytest.fixture(scope="session")
def temporal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalServer]:
    server = TemporalServer(root=tmp_path_factory.mktemp("temporal"), port=free_port())
    server.start(attached=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    # Not under pytest's tmp dir: that is private to root, and the server runs unprivileged.
    root = Path(tempfile.mkdtemp(prefix="kinshasa-pg-"))
    cluster = PostgresCluster(root=root, port=free_port())
    cluster.start(attached=True)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _create_database(cluster: PostgresCluster, name: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="kinshasa",
                                 database="postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql+asyncpg://kinshasa@127.0.0.1:{cluster.port}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend: the storage test leg runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite3'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = f"t_{uuid.uuid4().hex[:12]}"
    return asyncio.run(_create_database(cluster, name))


@pytest.fixture
def other_database_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    """A second fresh database on the same backend as `database_url`, for side-by-side comparisons."""
    if database_url.startswith("sqlite"):
        return f"sqlite+aiosqlite:///{tmp_path / 'other.sqlite3'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return asyncio.run(_create_database(cluster, f"t_{uuid.uuid4().hex[:12]}"))


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    """A fresh, empty PostgreSQL database, for behaviour only PostgreSQL has (row locks, SKIP LOCKED)."""
    return asyncio.run(_create_database(postgres, f"t_{uuid.uuid4().hex[:12]}"))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on `database_url` with the kernel's tables; a module needing other tables overrides it."""
    engine = create_engine(database_url)
    await install_kernel_tables(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic names, task queues and group ids within one session."""
    return uuid.uuid4().hex[:10]




EXAMPLES_CATALOGUE = "kinshasa.catalogue.examples"


@pytest.fixture(scope="session")
def examples_catalogue(kafka: KafkaBroker) -> str:
    """A catalogue topic holding the example services' declarations, as they publish them at start.

    Gateways under test follow this topic instead of `kinshasa.catalogue`, so what other tests publish
    there (services of their own, incompatible versions) never changes their schema.
    """
    from kinshasa.services.registry import publish_example_declarations

    publish_example_declarations(kafka.bootstrap, EXAMPLES_CATALOGUE)
    return EXAMPLES_CATALOGUE
