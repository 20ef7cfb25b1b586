"""A session ends quietly: closed Kafka clients stop reconnecting; the plugin closes any left open."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from confluent_kafka import Producer

from kinshasa.topics.producer import AsyncProducer

# librdkafka's own log lines on stderr: `%<level>|<unix time>|<facility>|<client.id>#<kind>-<n>| ...`.
LIBRDKAFKA_LINE = re.compile(r"%\d\|(?P<time>[0-9.]+)\|[A-Z_]+\|(?P<client>[^#|]+)#")
# Reconnect attempts every few tens of milliseconds, so an open client logs many lines in a short wait.
FAST_RECONNECT = {"reconnect.backoff.ms": 20, "reconnect.backoff.max.ms": 50}


class Listener:
    """A port that accepts every connection and closes it at once, noting when: a client pointed at it
    reconnects after its backoff, again and again, for as long as it is alive."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.05)  # so the thread sees `close`
        self.bootstrap = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.accepted: list[float] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.accepted.append(time.monotonic())
            connection.close()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.socket.close()


async def test_a_closed_producer_stops_trying_to_reach_its_broker() -> None:
    # Its librdkafka lines go to Python's logging, served only while it polls, so the broker's side of
    # the connection is what tells whether a closed producer is still trying.
    closed_side, witness_side = Listener(), Listener()
    try:
        closed = AsyncProducer(closed_side.bootstrap, client_id="closed", extra_config=FAST_RECONNECT)
        deadline = time.monotonic() + 30
        while not closed_side.accepted:
            assert time.monotonic() < deadline, "the producer never connected"
            await asyncio.sleep(0.02)
        await closed.close()
        # Kept referenced, as a component keeps its producer after stopping: closing alone must end it.
        assert closed is not None
        # The witness is left open: its reconnects are the clock that says "long enough".
        witness = Producer({"bootstrap.servers": witness_side.bootstrap, "client.id": "open",
                            "log_level": 0, **FAST_RECONNECT})
        try:
            while len(witness_side.accepted) < 3:
                assert time.monotonic() < deadline, "the open producer did not keep reconnecting"
                await asyncio.sleep(0.02)
        finally:
            witness.close()
        watched_from = witness_side.accepted[0]
        assert [t for t in closed_side.accepted if t > watched_from] == []
    finally:
        closed_side.close()
        witness_side.close()


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
