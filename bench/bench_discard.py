"""Benchmark 5: discard of 10,000 held commands: wall time of `discardRun`, what reached Kafka (must be 0).

A gateway process (`python -m kinshasa.gateway serve`, embedded SQLite) with a private Kafka broker on
free ports in a temporary directory. One run submits `--commands` writes alternating `createDocument`
and `openAccount` (two services) under a one-hour quarantine window, so every receipt says HELD; then
an operator's `discardRun` is timed from request to response. Afterwards every commands and events topic
is read to its end: no command or event of the run may be there. The run's `run.discarded` fact on
`kinshasa.runs` must be there, which proves the gateway's relay was publishing all along (an empty
commands topic would otherwise prove nothing).

    python -m bench.bench_discard [--small] [--commands 10000] [--database-url URL]

Writes bench/results/discard.json. Exits 1 if anything of the run reached a commands or events topic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_discard.py`
    sys.path.insert(0, str(REPO))

from bench import gateway_process  # noqa: E402
from bench.machine import write_result  # noqa: E402

NAME = "discard"
AGENT_KEY = "bench-agent-" + "a" * 40
OPERATOR_KEY = "bench-operator-" + "o" * 40
WRITES = (
    ("createDocument", 'mutation($r: ID!, $t: String!) { createDocument(runId: $r, input: {title: $t, '
                       'body: "held"}) { commandId status } }'),
    ("openAccount", 'mutation($r: ID!, $t: String!) { openAccount(runId: $r, input: {name: $t, '
                    'currency: "EUR"}) { commandId status } }'),
)
QUARANTINE_S = 3600


def start_gateway(root: Path, cleanup: contextlib.ExitStack, database_url: str | None) -> tuple[str, str]:
    """Kafka and one gateway process; returns the gateway's base URL and the Kafka bootstrap."""
    principals = [{"id": "bench-agent", "kind": "agent", "scopes": ["*"], "key": AGENT_KEY},
                  {"id": "bench-operator", "kind": "operator", "scopes": ["*"], "key": OPERATOR_KEY}]
    # One agent submitting as fast as it can is what this measures: not the gateway's fairness limits.
    env = {"KINSHASA_GATEWAY_PRINCIPAL_LIMITS": json.dumps(
        {"bench-agent": {"rate_per_s": 1e9, "rate_burst": 1e9, "max_in_flight": 10_000}})}
    if database_url:
        env["KINSHASA_GATEWAY_DATABASE_URL"] = database_url
    return gateway_process.start_gateway(root, cleanup, principals, env)


def run_messages(bootstrap: str, topics: list[str], run_id: str) -> list[tuple[str, str]]:
    """(topic, type) of every message of the run on these topics, each read from its start to its end."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-discard-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(timeout=10)
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            for partition in metadata.topics[topic].partitions:
                high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
                if high > 0:
                    ends[(topic, partition)] = high
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
        found: list[tuple[str, str]] = []
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                if msg.error():
                    continue
                envelope = json.loads(msg.value())
                if envelope.get("run_id") == run_id:
                    found.append((msg.topic(), envelope["type"]))
                if msg.offset() + 1 >= ends.get((msg.topic(), msg.partition()), 0):
                    ends.pop((msg.topic(), msg.partition()), None)
        if ends:
            raise RuntimeError(f"could not read to the end of {sorted(ends)} within 60 s")
        return found
    finally:
        consumer.close()


async def gql(http: httpx.AsyncClient, url: str, key: str, query: str,
              variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await http.post(f"{url}/graphql", json={"query": query, "variables": variables or {}},
                               headers={"Authorization": f"Bearer {key}"})
    body: dict[str, Any] = response.json()
    if body.get("errors"):
        raise RuntimeError(f"gateway refused a call: {body['errors']}")
    return dict(body["data"])


async def submit(http: httpx.AsyncClient, url: str, run_id: str, total: int,
                 concurrency: int) -> Counter[str]:
    """`total` writes over `concurrency` connections; receipts counted by status."""
    statuses: Counter[str] = Counter()
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < total:
            index = issued
            issued += 1
            name, mutation = WRITES[index % len(WRITES)]
            data = await gql(http, url, AGENT_KEY, mutation, {"r": run_id, "t": f"held {index}"})
            statuses[data[name]["status"]] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def measure(url: str, bootstrap: str, total: int, concurrency: int, database: str) -> dict[str, Any]:
    from kinshasa.settings import SERVICE_NAMES
    from kinshasa.topics.catalogue import RUNS, commands_topic, events_topic

    # uvicorn drops connections idle 5 s; keeping them as long races it (a request lost as ReadError).
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await gql(http, url, OPERATOR_KEY,
                  'mutation { setPolicy(scope: DEFAULT, reason: "discard bench", settings: {maxWrites: '
                  f"10000000, maxVelocity: 10000000, velocityWindowS: 1, maxServices: 10, "
                  f"quarantineWindowS: {QUARANTINE_S}}}) {{ version }} }}")
        run_id = (await gql(http, url, AGENT_KEY,
                            'mutation { startRun(entryPoint: "bench-discard") { id } }'))["startRun"]["id"]
        started = time.perf_counter()
        statuses = await submit(http, url, run_id, total, concurrency)
        submit_s = time.perf_counter() - started
        # A fresh connection for the timed call, so it measures the discard and not a pool's state.
        async with httpx.AsyncClient(timeout=600) as operator:
            started = time.perf_counter()
            discarded = (await gql(operator, url, OPERATOR_KEY,
                                   f'mutation {{ discardRun(runId: "{run_id}") {{ count }} }}'))["discardRun"]
            discard_s = time.perf_counter() - started
        counts = (await gql(http, url, OPERATOR_KEY,
                            f'{{ run(id: "{run_id}") {{ counts {{ held published discarded }} }} }}'))["run"]
    commands_topics = [commands_topic(s) for s in SERVICE_NAMES]
    events_topics = [events_topic(s) for s in SERVICE_NAMES]
    # The discard's own fact proves the relay is live; waiting for it also gives a leak time to show.
    facts: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(t == "run.discarded" for _, t in facts):
        await asyncio.sleep(1.0)
        facts = await asyncio.to_thread(run_messages, bootstrap, [RUNS], run_id)
    leaked = await asyncio.to_thread(run_messages, bootstrap, commands_topics + events_topics, run_id)
    return {
        "database": database,
        "commands": total,
        "concurrency": concurrency,
        "quarantine_window_s": QUARANTINE_S,
        "receipts": dict(statuses),
        "submit_s": round(submit_s, 2),
        "submit_per_s": round(total / submit_s, 1),
        "discarded": discarded["count"],
        "discard_s": round(discard_s, 3),
        "discarded_per_s": round(discarded["count"] / discard_s, 1),
        "run_counts_after": counts["counts"],
        "commands_on_kafka": sum(1 for topic, _ in leaked if topic in commands_topics),
        "events_on_kafka": sum(1 for topic, _ in leaked if topic in events_topics),
        "run_facts_on_kafka": sorted(t for _, t in facts),
    }


def print_table(f: dict[str, Any]) -> None:
    print(f"discard of held commands ({f['database']} gateway, "
          f"quarantine window {f['quarantine_window_s']} s)")
    rows = [
        ("held commands submitted", f"{f['commands']} in {f['submit_s']} s ({f['submit_per_s']}/s), "
                                    f"receipts {f['receipts']}"),
        ("discardRun", f"{f['discarded']} discarded in {f['discard_s']} s ({f['discarded_per_s']}/s)"),
        ("commands on Kafka", f"{f['commands_on_kafka']} (must be 0)"),
        ("events on Kafka", f"{f['events_on_kafka']} (must be 0)"),
        ("run facts on Kafka", ", ".join(f["run_facts_on_kafka"]) or "-"),
    ]
    for label, value in rows:
        print(f"{label:<26}{value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run: 500 held commands")
    parser.add_argument("--commands", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32, help="connections submitting the writes")
    parser.add_argument("--database-url", default=None,
                        help="gateway database (default: SQLite in a temp dir)")
    args = parser.parse_args(argv)
    total = 500 if args.small else args.commands
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-discard-"))
    try:
        with contextlib.ExitStack() as cleanup:
            url, bootstrap = start_gateway(root, cleanup, args.database_url)
            database = "postgresql" if (args.database_url or "").startswith("postgresql") else "sqlite"
            figures = asyncio.run(measure(url, bootstrap, total, args.concurrency, database))
    except Exception as exc:
        print(f"discard benchmark failed: {exc!r}\nprocess logs are under {root / 'logs'}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    figures["mode"] = "small" if args.small else "full"
    # Other work on the machine moves every figure; record how busy it was (1, 5, 15 min).
    figures["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    print_table(figures)
    print(f"machine: {os.cpu_count()} cores, load average {figures['load_avg']} (1/5/15 min)")
    print(f"wrote {write_result(NAME, figures)}")
    ok = (figures["commands_on_kafka"] == figures["events_on_kafka"] == 0
          and figures["discarded"] == figures["receipts"].get("HELD", 0) == total
          and "run.discarded" in figures["run_facts_on_kafka"])
    if not ok:
        print("DISCARD LEAKED or was incomplete: see the figures above", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
