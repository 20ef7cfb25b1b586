"""SIGKILL at random points: every applied command's event still reaches Kafka, and no command applies twice.

The documents service runs as a real process (`python -m kinshasa.services documents`, settings from
the environment). 1,000 commands (creates, then renames of the same documents, so order matters)
stream into its topic while the process is killed with SIGKILL at random moments and restarted. Before
each restart the test counts outbox rows that were committed but not yet published: the kill landed
between commit and publish. At the end every command is in the inbox once, every domain write exists
once, every outbox row is on Kafka, each document carries its last title, the receipt chain verifies,
and a final SIGTERM exits cleanly with nothing left to publish.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.kernel.inbox import inbox
from kinshasa.kernel.outbox import SqlOutboxStore, outbox
from kinshasa.kernel.receipts import ReceiptChain
from kinshasa.schemas.envelope import Envelope
from kinshasa.services import documents
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.producer import AsyncProducer, envelope_message
from tests.integration.services.helpers import command, group_caught_up, new_entity_id, read_topic, wait_for

REPO = Path(__file__).resolve().parents[3]
COMMANDS = 1000
DOCS = 250  # each: one create, then three renames
KILLS = 5
SEND_SECONDS = 10.0


def workload(rng: random.Random) -> tuple[list[Envelope], dict[str, str]]:
    """Commands in a random interleaving that keeps each document's own order; and each one's last title."""
    per_doc: list[list[Envelope]] = []
    final: dict[str, str] = {}
    for i in range(DOCS):
        doc = new_entity_id()
        cmds = [command("documents", "create", {"title": f"d{i} v0"}, doc, run_id="run-crash")]
        for v in range(1, 4):
            cmds.append(
                command(
                    "documents",
                    "rename",
                    {"document_id": doc, "title": f"d{i} v{v}"},
                    doc,
                    run_id="run-crash",
                )
            )
        final[doc] = f"d{i} v3"
        per_doc.append(cmds)
    out: list[Envelope] = []
    while per_doc:
        queue = rng.choice(per_doc)
        out.append(queue.pop(0))
        if not queue:
            per_doc.remove(queue)
    assert len(out) == COMMANDS
    return out, final


class ServiceProcess:
    """The documents service as a child process, configured only through its environment."""

    def __init__(self, env: dict[str, str], suffix: str, log_path: Path) -> None:
        self.env = env
        self.suffix = suffix
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "kinshasa.services",
            "documents",
            "--topic-suffix",
            self.suffix,
            # Static membership: the restarted process takes its partitions back without a rebalance wait.
            "--instance-id",
            f"crash-test-{self.suffix}",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# An empty database: the service under test installs its own tables.
pytestmark = pytest.mark.schema()


@pytest.fixture
def service_env(kafka: KafkaBroker, database_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINSHASA_")}
    env |= {
        "KINSHASA_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "KINSHASA_DATA_DIR": str(tmp_path / "data"),
        "KINSHASA_LOG_LEVEL": "WARNING",
        "KINSHASA_SVC_DOCUMENTS_DATABASE_URL": database_url,
        "KINSHASA_SVC_DOCUMENTS_ADMIN_PORT": str(free_port()),
    }
    yield env


async def _wait_healthy(url: str, service: ServiceProcess) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            assert service.alive(), service.log_path.read_text()[-3000:]
            try:
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the service did not become healthy: {service.log_path.read_text()[-3000:]}")


async def _scalar(engine: AsyncEngine, query: object) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())  # type: ignore[call-overload]


async def _pending(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return (await SqlOutboxStore().backlog(conn)).pending


async def _until_unpublished(engine: AsyncEngine, *, within: float) -> None:
    """Return as soon as the service's outbox holds committed, unpublished events (or after `within`)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await _pending(engine) > 0:
            return
        await asyncio.sleep(0.002)


def _send_steadily(
    bootstrap: str, topic: str, commands: list[Envelope], failures: list[BaseException]
) -> None:
    """Publish the commands over SEND_SECONDS, so the kills land while commands keep arriving."""

    async def run() -> None:
        async with AsyncProducer(bootstrap, client_id="crash-test-feeder") as producer:
            chunk = 50
            pause = SEND_SECONDS / (len(commands) / chunk)
            for start in range(0, len(commands), chunk):
                await producer.send_batch(
                    [envelope_message(topic, c) for c in commands[start : start + chunk]]
                )
                await asyncio.sleep(pause)

    try:
        asyncio.run(run())
    except BaseException as exc:  # surfaced by the test
        failures.append(exc)


async def test_sigkill_between_commit_and_publish_loses_and_duplicates_nothing(
    kafka: KafkaBroker, engine: AsyncEngine, service_env: dict[str, str], tmp_path: Path, unique: str
) -> None:
    rng = random.Random(unique)
    topics = ServiceTopics.for_service("documents", f"t{unique}")
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, topics.specs("documents"))
    commands, final_titles = workload(rng)
    service = ServiceProcess(service_env, f"t{unique}", tmp_path / "service.log")
    health = f"http://127.0.0.1:{service_env['KINSHASA_SVC_DOCUMENTS_ADMIN_PORT']}/healthz"
    feeder_failures: list[BaseException] = []
    feeder = threading.Thread(
        target=_send_steadily, args=(kafka.bootstrap, topics.commands, commands, feeder_failures)
    )
    unpublished_at_kill: list[int] = []
    try:
        service.start()
        await _wait_healthy(health, service)
        feeder.start()
        for kill in range(KILLS):
            await _wait_healthy(health, service)
            if kill % 2:
                # A random moment while commands stream in: mid-transaction, between commit and
                # publish, or while the relay publishes.
                await asyncio.sleep(rng.uniform(0.2, 1.5))
            else:
                # The moment this test is about, which a fast relay makes short: committed events not
                # yet published (watched for up to 3 s, then killed wherever it is).
                await _until_unpublished(engine, within=3.0)
            service.kill()
            unpublished_at_kill.append(await _pending(engine))
            service.start()
        feeder.join(60)
        assert not feeder_failures, feeder_failures

        async def all_handled() -> bool:
            return await _scalar(engine, select(func.count()).select_from(inbox)) == COMMANDS

        await wait_for(all_handled, 90, f"all {COMMANDS} commands handled")
        await wait_for(
            lambda: asyncio.to_thread(group_caught_up, kafka.bootstrap, topics.group, topics.commands),
            30,
            "offsets committed",
        )
        # The last restart may still be starting when everything was already handled before the kill.
        await _wait_healthy(health, service)
        assert service.kill(signal.SIGTERM) == 0, service.log_path.read_text()[-3000:]
    finally:
        if service.alive():
            service.kill()
        feeder.join(60)

    # The scenario happened: some kill left committed events unpublished, and they went out after restart.
    assert sum(unpublished_at_kill) > 0, unpublished_at_kill
    assert await _pending(engine) == 0  # the graceful stop drained the outbox

    # No command applied twice, none lost.
    versions = documents.document_versions
    assert await _scalar(engine, select(func.count()).select_from(versions)) == COMMANDS
    twice = select(func.count()).select_from(
        select(versions.c.command_id).group_by(versions.c.command_id).having(func.count() > 1).subquery()
    )
    assert await _scalar(engine, twice) == 0
    assert await _scalar(engine, select(func.count()).select_from(outbox)) == COMMANDS
    async with engine.connect() as conn:
        state = await documents.domain_state(conn)
        outbox_ids = {str(r) for r in (await conn.execute(select(outbox.c.message_id))).scalars()}
        chain = await ReceiptChain("documents").verify(conn)
    assert {doc: s["title"] for doc, s in state.items()} == final_titles
    assert chain.ok and chain.checked == COMMANDS, chain.problems()

    # Every applied command's event is on Kafka (a relay killed after publishing may have sent one twice).
    events = await asyncio.to_thread(read_topic, kafka.bootstrap, topics.events, 60)
    on_kafka = {h["message_id"].decode() for _, _, h in events}
    assert on_kafka == outbox_ids
    assert {h["type"].decode() for _, _, h in events} == {
        "documents.create.applied",
        "documents.rename.applied",
    }
    print(
        f"kills left {unpublished_at_kill} committed-but-unpublished events; {len(events)} events on Kafka "
        f"for {COMMANDS} commands"
    )
