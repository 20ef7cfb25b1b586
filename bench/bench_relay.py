"""Benchmark 6: outbox relay events/s against a bare AsyncProducer sending the same messages, as a ratio.

A private Kafka broker and PostgreSQL cluster on free ports in a temporary directory; SQLite in a file
beside them. For each database the same `--messages` envelopes (`documents.create.applied`, keyed by
entity over `--keys` keys, so each key carries an ordered stream) are sent twice to one topic shaped like
an events topic:

* bare: one `AsyncProducer.send_batch` of every message (idempotent, acks=all, as the relay's producer),
  timed from the first produce to the last acknowledgement: what the broker and client can do;
* relay: the messages are first appended to the outbox (untimed; that is the writers' cost), then an
  `OutboxRelay` with its defaults runs until every row is published and marked: claim, publish with
  per-key order, record. Timed from the relay's start to the last row marked.

Each side gets its own producer, warmed up by one message (connection and metadata) before the clock
starts. `ratio` is relay/bare events per second; the rounds alternate sides and report medians. On SQLite
each round also runs the relay with `synchronous=NORMAL` (a power loss may undo its last commits) to
state what the stores' `synchronous=FULL` costs (`synchronous_full_cost`); it is never part of the ratio.

    python -m bench.bench_relay [--small] [--messages 20000] [--keys 1000] [--rounds 3]

Writes bench/results/relay.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_relay.py`
    sys.path.insert(0, str(REPO))

from bench.machine import write_result  # noqa: E402

NAME = "relay"
CACHE = REPO / ".kinshasa" / "cache"
APPEND_BATCH = 500


def start_infra(root: Path, cleanup: contextlib.ExitStack) -> tuple[str, int]:
    """Kafka and PostgreSQL; returns the bootstrap and PostgreSQL's port."""
    from kinshasa.infra.kafka import KafkaBroker, kafka_libs
    from kinshasa.infra.postgres import PostgresCluster
    from kinshasa.infra.process import free_port
    from kinshasa.settings import InfraSettings

    infra = InfraSettings()
    kafka = KafkaBroker(root=root / "kafka", libs=kafka_libs(CACHE, infra.kafka_version, infra.kafka_home),
                        port=free_port(), controller_port=free_port())
    cleanup.callback(kafka.stop)
    kafka.start(attached=True)
    # Its own temp dir, which it hands to the unprivileged server account when we are root.
    postgres = PostgresCluster(root=Path(tempfile.mkdtemp(prefix="kinshasa-bench-pg-")), port=free_port())
    cleanup.callback(shutil.rmtree, postgres.root, ignore_errors=True)
    cleanup.callback(postgres.stop)
    postgres.start(attached=True)
    return kafka.bootstrap, postgres.port


def messages(topic: str, count: int, keys: int) -> list[Any]:
    """`count` events as the relay and the producer both see them: topic, key, envelope bytes, headers."""
    from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
    from kinshasa.topics.producer import envelope_message

    run_id = str(uuid.uuid4())
    actor = Actor(kind="service", id="documents")
    out = []
    for i in range(count):
        envelope = Envelope(
            message_id=uuid.uuid4(), type="documents.create.applied", run_id=run_id, actor=actor,
            causation_id=uuid.uuid4(), correlation_id=run_id,
            entity=EntityRef(service="documents", type="document", id=f"doc-{i % keys:05d}"),
            occurred_at=utcnow(), payload={"title": f"document {i}", "body": "lorem ipsum " * 16},
        )
        out.append(envelope_message(topic, envelope))
    return out


async def warm(producer: Any, topic: str) -> None:
    await producer.send(topic, b"warm-up", b"{}")


async def bare_round(bootstrap: str, items: list[Any]) -> float:
    """Seconds for one producer to have every item acknowledged."""
    from kinshasa.topics.producer import AsyncProducer

    producer = AsyncProducer(bootstrap, client_id=f"bench-bare-{uuid.uuid4().hex[:6]}")
    try:
        await warm(producer, items[0].topic)
        started = time.perf_counter()
        await producer.send_batch(items)
        return time.perf_counter() - started
    finally:
        await producer.close()


class FreshDatabases:
    """A new, empty database for every relay round, so no round inherits another's outbox history."""

    def __init__(self, root: Path, postgres_port: int) -> None:
        self.root, self.postgres_port = root, postgres_port
        self.made = 0

    async def url(self, backend: str) -> str:
        self.made += 1
        name = f"bench_relay_{self.made}"
        if backend == "sqlite":
            return f"sqlite+aiosqlite:///{self.root / name}.sqlite3"
        import asyncpg

        from kinshasa.infra.postgres import USER

        conn = await asyncpg.connect(host="127.0.0.1", port=self.postgres_port, user=USER,
                                     database="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.postgres_port}/{name}"


async def relay_round(bootstrap: str, database_url: str, items: list[Any]) -> float:
    """Seconds for an OutboxRelay to publish and mark every item, appended to its empty outbox beforehand."""
    from kinshasa.kernel.database import create_engine
    from kinshasa.kernel.outbox import SqlOutboxStore, outbox_message
    from kinshasa.kernel.relay import OutboxRelay
    from kinshasa.migrations.install import install_kernel_tables
    from kinshasa.topics.producer import AsyncProducer

    engine = create_engine(database_url)
    producer = AsyncProducer(bootstrap, client_id=f"bench-relay-{uuid.uuid4().hex[:6]}")
    try:
        await install_kernel_tables(engine)
        store = SqlOutboxStore()
        for start in range(0, len(items), APPEND_BATCH):
            async with engine.begin() as conn:
                await store.append_many(conn, [
                    outbox_message(m.topic, m.key, m.value, uuid.uuid4(), m.headers)
                    for m in items[start:start + APPEND_BATCH]])
        await warm(producer, items[0].topic)
        relay = OutboxRelay(engine, producer)
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(relay.run(stop, idle_sleep_s=0.01))
        try:
            # relay.totals counts rows published *and* recorded, so this is the end of the whole cycle.
            while relay.totals.published + relay.totals.dead < len(items):
                if task.done():
                    task.result()
                    raise RuntimeError("the relay stopped before publishing everything")
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            await task
        if relay.totals.dead:
            raise RuntimeError(f"{relay.totals.dead} rows went dead: the broker refused them")
        return elapsed
    finally:
        await producer.close()
        await engine.dispose()


async def relay_round_synchronous_normal(bootstrap: str, database_url: str, items: list[Any]) -> float:
    """`relay_round` with SQLite's synchronous=NORMAL, to state what the stores' FULL costs; never used
    for the ratio."""
    from kinshasa.kernel import database

    database.SQLITE_SYNCHRONOUS = "NORMAL"
    try:
        return await relay_round(bootstrap, database_url, items)
    finally:
        database.SQLITE_SYNCHRONOUS = "FULL"


async def measure(bootstrap: str, databases: FreshDatabases, count: int, keys: int,
                  rounds: int) -> dict[str, Any]:
    from kinshasa.topics.admin import ensure_topics
    from kinshasa.topics.catalogue import EVENT_PARTITIONS, TopicSpec

    topic = "bench.relay.events"
    await asyncio.to_thread(ensure_topics, bootstrap, [TopicSpec(topic, EVENT_PARTITIONS)])
    items = messages(topic, count, keys)
    # Untimed: the topic's first writes (segments, leader epochs, the producer id) are nobody's cost.
    await bare_round(bootstrap, items)
    results: dict[str, Any] = {}
    for name in ("sqlite", "postgresql"):
        bare_s: list[float] = []
        relay_s: list[float] = []
        normal_s: list[float] = []
        for _ in range(rounds):
            bare_s.append(await bare_round(bootstrap, items))
            relay_s.append(await relay_round(bootstrap, await databases.url(name), items))
            if name == "sqlite":
                normal_s.append(await relay_round_synchronous_normal(bootstrap, await databases.url(name),
                                                                     items))
        bare = count / statistics.median(bare_s)
        relay = count / statistics.median(relay_s)
        results[name] = {
            "bare_per_s": round(bare), "relay_per_s": round(relay), "ratio": round(relay / bare, 3),
            "bare_rounds_s": [round(s, 3) for s in bare_s], "relay_rounds_s": [round(s, 3) for s in relay_s],
            # Each round's pair ran back to back under the same machine load: the spread shows the noise.
            "round_ratios": [round(b / r, 3) for b, r in zip(bare_s, relay_s, strict=True)],
        }
        if normal_s:
            normal = count / statistics.median(normal_s)
            # What durability costs: the same relay with synchronous=NORMAL, which a power loss can undo.
            results[name]["synchronous_normal_per_s"] = round(normal)
            results[name]["synchronous_full_cost"] = round(1 - relay / normal, 3)
    return {
        "messages": count, "keys": keys, "rounds": rounds, "partitions": EVENT_PARTITIONS,
        "message_bytes": round(statistics.mean(len(m.value) for m in items)),
        "sqlite": results["sqlite"], "postgresql": results["postgresql"],
    }


def print_table(f: dict[str, Any]) -> None:
    print(f"outbox relay vs bare producer: {f['messages']} messages of ~{f['message_bytes']} B over "
          f"{f['keys']} keys, {f['partitions']} partitions, median of {f['rounds']} rounds")
    print(f"{'database':<12}{'bare /s':>10}{'relay /s':>10}{'ratio':>8}")
    for name in ("sqlite", "postgresql"):
        r = f[name]
        print(f"{name:<12}{r['bare_per_s']:>10}{r['relay_per_s']:>10}{r['ratio']:>8}")
    sqlite = f["sqlite"]
    print(f"durability: the SQLite relay with synchronous=FULL (what the stores run) "
          f"{sqlite['relay_per_s']}/s vs NORMAL {sqlite['synchronous_normal_per_s']}/s: FULL costs "
          f"{sqlite['synchronous_full_cost']:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="a quick run: 1,000 messages over 100 keys, 1 round")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/relay rounds (median taken)")
    args = parser.parse_args(argv)
    count, keys, rounds = (1_000, 100, 1) if args.small else (args.messages, args.keys, args.rounds)
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-relay-"))
    try:
        with contextlib.ExitStack() as cleanup:
            bootstrap, postgres_port = start_infra(root, cleanup)
            databases = FreshDatabases(root, postgres_port)
            figures = asyncio.run(measure(bootstrap, databases, count, keys, rounds))
            # Closed producers keep librdkafka handles until collected; collect them before the broker
            # stops, or they log its disappearance.
            gc.collect()
    except Exception as exc:
        print(f"relay benchmark failed: {exc!r}\n(infrastructure logs are under {root})", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    figures["mode"] = "small" if args.small else "full"
    # Other work on the machine moves every figure; record how busy it was (1, 5, 15 min).
    figures["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    print_table(figures)
    print(f"machine: {os.cpu_count()} cores, load average {figures['load_avg']} (1/5/15 min)")
    print(f"wrote {write_result(NAME, figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
