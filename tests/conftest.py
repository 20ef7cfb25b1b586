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
from kinshasa.migrations.install import install_kernel_tables
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import catalogue
from tests.databases import create_database, prepared_engine

REPO = Path(__file__).resolve().parent.parent
# The name test modules import it by.
_create_database = create_database
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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend: the storage test leg runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite3'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = f"t_{uuid.uuid4().hex[:12]}"
    return asyncio.run(create_database(cluster, name))


@pytest.fixture
def other_database_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    """A second fresh database on the same backend as `database_url`, for side-by-side comparisons."""
    if database_url.startswith("sqlite"):
        return f"sqlite+aiosqlite:///{tmp_path / 'other.sqlite3'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return asyncio.run(create_database(cluster, f"t_{uuid.uuid4().hex[:12]}"))


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    """A fresh, empty PostgreSQL database, for behaviour only PostgreSQL has (row locks, SKIP LOCKED)."""
    return asyncio.run(create_database(postgres, f"t_{uuid.uuid4().hex[:12]}"))


@pytest.fixture
async def engine(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on `database_url` (so once per backend), disposed after the test.

    It holds the kernel's tables, unless the test or its module names its schema with
    `@pytest.mark.schema(step, ...)` (`pytestmark = pytest.mark.schema(...)` for a module): each step is
    a MetaData, a Table or an async function given the engine, applied in order (`tests.databases`);
    `schema()` with no step leaves the database empty, for a component that installs its own tables.
    """
    marker = request.node.get_closest_marker("schema")
    steps = marker.args if marker is not None else (install_kernel_tables,)
    engine = await prepared_engine(database_url, *steps)
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
