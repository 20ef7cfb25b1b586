"""A session ends quietly: closed Kafka clients stop reconnecting; the plugin closes any left open."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from kinshasa.infra.process import free_port
from kinshasa.topics.producer import AsyncProducer

# librdkafka's own log lines on stderr: `%<level>|<unix time>|<facility>|<client.id>#<kind>-<n>| ...`.
LIBRDKAFKA_LINE = re.compile(r"%\d\|(?P<time>[0-9.]+)\|[A-Z_]+\|(?P<client>[^#|]+)#")
# Reconnect attempts every few tens of milliseconds, so an open client logs many lines in a short wait.
FAST_RECONNECT = {"reconnect.backoff.ms": 20, "reconnect.backoff.max.ms": 50}


def lines_of(stderr: str, client_id: str) -> list[float]:
    """The times of the librdkafka lines `client_id` logged."""
    return [float(m["time"]) for m in LIBRDKAFKA_LINE.finditer(stderr) if m["client"] == client_id]


async def test_a_closed_producer_stops_trying_to_reach_its_broker(capfd: pytest.CaptureFixture[str]) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens: every connection attempt is refused
    suffix = uuid.uuid4().hex[:8]
    closed = AsyncProducer(nobody, client_id=f"closed-{suffix}", extra_config=FAST_RECONNECT)
    await closed.close()
    closed_at = time.time()
    # Kept referenced, as a component keeps its producer after stopping: closing alone must end it.
    assert closed is not None
    # The witness is left open: its refused reconnects are the clock that says "long enough".
    witness = Producer({"bootstrap.servers": nobody, "client.id": f"open-{suffix}", **FAST_RECONNECT})
    stderr = ""
    try:
        deadline = time.monotonic() + 30
        while len(lines_of(stderr, f"open-{suffix}")) < 5:
            assert time.monotonic() < deadline, "the open producer never logged its refused connections"
            await asyncio.sleep(0.05)
            stderr += capfd.readouterr().err
    finally:
        witness.close()
    assert [t for t in lines_of(stderr, f"closed-{suffix}") if t > closed_at] == []


INNER_TESTS = '''
    """Run in a session of its own by test_quiet_teardown.py."""
    from confluent_kafka import Consumer, Producer

    from kinshasa.services.documents import documents
    from kinshasa.testing import running_service
    from kinshasa.topics.consumer import AsyncConsumer
    from kinshasa.topics.producer import AsyncProducer

    LEFT_OPEN = []


    async def test_clients_closed_by_their_owners(kinshasa_kafka, tmp_path):
        bootstrap = kinshasa_kafka.bootstrap
        async with running_service(documents, bootstrap, tmp_path, suffix="quiet") as runtime:
            async with AsyncProducer(bootstrap, client_id="quiet-producer") as producer:
                await producer.send(runtime.topics.declarations, b"probe", b"{}")
            async with AsyncConsumer(bootstrap, "quiet-group", [runtime.topics.events]):
                pass
            reader = Consumer({"bootstrap.servers": bootstrap, "group.id": "quiet-reader"})
            try:
                reader.list_topics(runtime.topics.events, timeout=10)
            finally:
                reader.close()


    async def test_clients_a_test_forgets(kinshasa_kafka):
        bootstrap = kinshasa_kafka.bootstrap
        LEFT_OPEN.append(Producer({"bootstrap.servers": bootstrap, "client.id": "forgotten-producer"}))
        LEFT_OPEN.append(AsyncConsumer(bootstrap, "forgotten-group", ["kinshasa.catalogue"]))
        LEFT_OPEN[0].list_topics(timeout=10)
'''


def test_a_session_ends_without_connection_errors_and_names_the_clients_left_open(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["kinshasa.testing"]\n')
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\ntimeout = 240\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "2 passed" in output, output
    # The forgotten producer and consumer, and nothing the first test's owners closed.
    assert "2 Kafka client(s) were still open when the session ended" in output, output
    assert "Connection refused" not in output, output
    assert not LIBRDKAFKA_LINE.search(output), output
