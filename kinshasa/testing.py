"""Testing your own service on real Kafka: a pytest plugin with a broker fixture and an in-process runner.

Turn it on in your package's `tests/conftest.py`::

    pytest_plugins = ["kinshasa.testing"]

and test the service as it will run, over Kafka, with its read API on a free port::

    from kinshasa.conformance import run_conformance
    from kinshasa.testing import running_service
    from tickets.service import tickets


    async def test_tickets_keeps_the_service_contract(kinshasa_kafka, tmp_path):
        async with running_service(tickets, kinshasa_kafka.bootstrap, tmp_path):
            report = await run_conformance("tickets", kinshasa_kafka.bootstrap)
        assert report.ok, report.render()

What you get:

* `kinshasa_kafka`, a session fixture: one single-node Kafka broker on loopback for the whole test
  session, started by the same code as `kinshasa infra up`, yielding an object whose `.bootstrap` is
  its `host:port`. It needs Java 17 or newer on PATH. The broker jars are downloaded from Maven
  Central on first use and kept in `$KINSHASA_CACHE_DIR` (default `~/.cache/kinshasa`), so later runs
  are offline; set `KAFKA_HOME` to an unpacked Apache Kafka tarball to use its jars instead.
* Kafka clients a test leaves open are closed when the session's broker stops, with a
  `KafkaClientLeftOpen` warning naming how many: an open client would otherwise log a "Connection
  refused" line for every reconnect attempt until the process ends.
* `running_service(service, bootstrap, tmp_path, suffix=None)`, an async context manager: your
  `Service` run in-process by the same `ServiceRuntime` as `kinshasa service`, on a SQLite database
  under `tmp_path`, its HTTP read API on a free port, yielding the runtime once it is ready (its
  declaration published, its consumer started). It creates the service's topics first, as
  `kinshasa topics ensure --service <name>` does before a deployment starts it (a service only checks
  its topics: it never creates them). Leaving the block stops it cleanly. With `suffix`,
  its topics, consumer group and catalogue get that suffix (`kinshasa.commands.<name>.<suffix>`,
  `kinshasa.catalogue.<suffix>`), so several tests can share one broker without seeing each other.

Async tests need pytest-asyncio; set `asyncio_mode = "auto"` in your pytest configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kinshasa.infra.kafka import KafkaBroker, kafka_libs
from kinshasa.infra.process import free_port
from kinshasa.services.kit import Service
from kinshasa.services.kit.runtime import ServiceRuntime, ServiceTopics
from kinshasa.settings import InfraSettings, ServiceSettings, StackSettings, service_env_prefix
from kinshasa.topics.admin import ensure_topics

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


class PluginSettings(BaseSettings):
    """Where the plugin keeps the broker jars across sessions (`KINSHASA_CACHE_DIR`)."""

    model_config = SettingsConfigDict(env_prefix="KINSHASA_", extra="ignore")

    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "kinshasa")


@pytest.fixture(scope="session")
def kinshasa_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A single-node Kafka broker for the whole session; use its `.bootstrap`."""
    infra = InfraSettings()
    broker = KafkaBroker(root=tmp_path_factory.mktemp("kafka"),
                         libs=kafka_libs(PluginSettings().cache_dir, infra.kafka_version, infra.kafka_home),
                         port=free_port(), controller_port=free_port())
    broker.start(attached=True)
    try:
        yield broker
    finally:
        try:
            left_open = close_open_clients()
            if left_open:
                warnings.warn(KafkaClientLeftOpen(
                    f"{left_open} Kafka client(s) were still open when the session ended; they are closed "
                    "now. Close each producer and consumer a test opens (AsyncProducer.close, "
                    "AsyncConsumer.close, Consumer.close), in a finally block or `async with`."),
                    stacklevel=1)
        finally:
            broker.stop()


class KafkaClientLeftOpen(UserWarning):
    """A test left a Kafka producer or consumer open until the end of the session."""


def close_open_clients() -> int:
    """Close every confluent-kafka Producer and Consumer of this process still open; returns how many.

    Only for the end of a test session, when nothing uses them any more: closing a client another
    thread is still using would break that thread.
    """
    gc.collect()  # clients only garbage holds on to are destroyed now, and so are not counted
    closed = 0
    for client in [obj for obj in gc.get_objects() if isinstance(obj, Producer | Consumer)]:
        try:
            if isinstance(client, Producer):
                client.poll(0)  # raises if it is closed
                client.purge()  # nothing waits for what it still holds: close without flushing it
            else:
                client.assignment()  # raises if it is closed
        except RuntimeError:
            continue
        client.close()
        closed += 1
    return closed


@contextlib.asynccontextmanager
async def running_service(service: Service, bootstrap: str, tmp_path: Path,
                          suffix: str | None = None) -> AsyncIterator[ServiceRuntime]:
    """Run `service` in-process on the broker at `bootstrap` and on SQLite under `tmp_path`, for the block.

    Yields the runtime once it is ready: `runtime.admin_url` is its read API, `runtime.topics` its topics.
    Raises what stopped the service if it fails to start, and TimeoutError if it is not ready within
    READY_TIMEOUT_S. Running the same service twice on one `tmp_path` reuses its database, as a restart
    would.
    """
    data_dir = tmp_path / "kinshasa"
    stack = StackSettings(kafka_bootstrap=bootstrap, data_dir=data_dir)
    # Given explicitly, so a developer's KINSHASA_SVC_<NAME>_... variables cannot point the test elsewhere.
    settings = ServiceSettings(_env_prefix=service_env_prefix(service.name),
                               database_url=f"sqlite+aiosqlite:///{tmp_path / f'{service.name}.sqlite3'}",
                               admin_host="127.0.0.1", admin_port=0, advertised_url=None)
    topics = ServiceTopics.for_service(service.name, suffix)
    # What `kinshasa topics ensure --service <name>` does before a deployment starts the service.
    await asyncio.to_thread(ensure_topics, bootstrap, topics.specs(service.name))
    runtime = ServiceRuntime(service, stack=stack, settings=settings, topics=topics)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop), name=f"kinshasa-testing-{service.name}")
    try:
        await _ready(runtime, task)
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, STOP_TIMEOUT_S)


async def _ready(runtime: ServiceRuntime, task: asyncio.Task[None]) -> None:
    """Wait for `runtime.ready`, or for the run to end first (then raise what ended it)."""
    ready = asyncio.create_task(runtime.ready.wait())
    try:
        await asyncio.wait([ready, task], timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if task.done():
        task.result()
        raise RuntimeError(f"service {runtime.service.name} stopped before it was ready, without an error")
    if not runtime.ready.is_set():
        raise TimeoutError(
            f"service {runtime.service.name} was not ready within {READY_TIMEOUT_S:g}s: is Kafka answering "
            f"at {runtime.stack.kafka_bootstrap}?")
