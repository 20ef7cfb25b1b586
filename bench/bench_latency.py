"""Benchmark 2: end-to-end latency from accepted (gateway) to applied (service event) to in the ledger.

The real processes of the stack, as `kinshasa up` starts them (`StackPlan`): the gateway, the documents
service and the coordinator, each its own process on the embedded SQLite default, with a private Kafka
broker and Temporal dev server on free ports in a temporary directory. An open-loop client offers
`createDocument` mutations at a steady rate (quarantine window 0) and timestamps three moments of each
command on one clock (this process's `perf_counter`):

* accepted: the gateway's mutation response arrived (the command and its outbox row are committed);
* applied: the documents service's `documents.create.applied` event (causation = the command) was read
  from `kinshasa.events.documents` by a consumer tailing it (`fetch.wait.max.ms` 5);
* in the ledger: the coordinator's API (`GET /runs/<id>/steps`, polled every `--poll-ms`) first listed a
  step for the command. The poll interval bounds the error of this figure (half of it on average).

    python -m bench.bench_latency [--small] [--rate 50] [--seconds 20]

Writes bench/results/latency.json.
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_latency.py`
    sys.path.insert(0, str(REPO))

from bench.machine import write_result  # noqa: E402

NAME = "latency"
CACHE = REPO / ".kinshasa" / "cache"
AGENT_KEY = "bench-agent-" + "a" * 40
OPERATOR_KEY = "bench-operator-" + "o" * 40
PROCESSES = ("documents", "coordinator", "gateway")
CREATE = ('mutation($r: ID!, $t: String!) { createDocument(runId: $r, input: {title: $t, body: "latency"}) '
          "{ commandId status } }")


@dataclass
class Command:
    """One offered mutation and the moments it passed each stage (perf_counter seconds)."""

    sent: float
    accepted: float | None = None
    command_id: str | None = None
    error: str | None = None


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max by nearest rank, in milliseconds, rounded to 0.1."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(-(-p * len(ordered) // 100)) - 1))]

    return {k: round(v * 1000, 1) for k, v in
            (("p50", rank(50)), ("p95", rank(95)), ("p99", rank(99)), ("max", ordered[-1]))}


class AppliedTail:
    """Tails a service's events topic in a thread, noting when each `.applied` event of a run is read."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.run_id: str | None = None
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="applied-tail", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"bench-latency-{os.getpid()}",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        try:
            partitions = consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            while not self._stop.is_set():
                # poll returns at the first message; consume(n, t) would wait out t for n of them.
                first = consumer.poll(0.05)
                if first is None:
                    continue
                now = time.perf_counter()
                for msg in [first, *consumer.consume(num_messages=500, timeout=0)]:
                    if msg.error() or msg.value() is None:
                        continue
                    event = json.loads(msg.value() or b"{}")
                    if event.get("run_id") == self.run_id and event["type"].endswith(".applied"):
                        self.seen.setdefault(event["causation_id"], now)
        finally:
            consumer.close()


async def poll_ledger(http: httpx.AsyncClient, url: str, run_id: str, seen: dict[str, float],
                      interval_s: float, stop: asyncio.Event) -> None:
    """Note when the coordinator's ledger first lists a step for each command (newest-first pages)."""
    while not stop.is_set():
        started = time.perf_counter()
        before: int | None = None
        while True:
            # A short page: at the offered rates a poll finds a step or two, and each poll costs the
            # coordinator CPU that the measured path shares.
            params: dict[str, Any] = {"limit": 10} | ({"before": before} if before else {})
            try:
                response = await http.get(f"{url}/runs/{run_id}/steps", params=params)
            except httpx.TransportError:
                break  # a busy coordinator: the next poll notes the step, a little late
            if response.status_code == 404:  # the run's first event is not projected yet
                break
            response.raise_for_status()
            page = response.json()
            now = time.perf_counter()
            fresh = [s["command_id"] for s in page["steps"] if s["command_id"] not in seen]
            for command_id in fresh:
                seen[command_id] = now
            # A page of only new steps may hide more behind it: read on until a known step.
            if len(fresh) < len(page["steps"]) or page["next_before"] is None:
                break
            before = page["next_before"]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (time.perf_counter() - started)))


async def gql(http: httpx.AsyncClient, url: str, key: str, query: str,
              variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await http.post(f"{url}/graphql", json={"query": query, "variables": variables or {}},
                               headers={"Authorization": f"Bearer {key}"})
    body: dict[str, Any] = response.json()
    if body.get("errors"):
        raise RuntimeError(f"gateway refused {query.split('{')[1].split('(')[0].strip()}: {body['errors']}")
    return dict(body["data"])


async def offer_load(http: httpx.AsyncClient, url: str, run_id: str, rate: float,
                     seconds: float) -> list[Command]:
    """Open loop: command i is sent at t0 + i/rate whatever the earlier ones are doing."""
    commands: list[Command] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(command: Command, index: int) -> None:
        try:
            data = await gql(http, url, AGENT_KEY, CREATE, {"r": run_id, "t": f"doc {index}"})
            command.accepted = time.perf_counter()
            command.command_id = data["createDocument"]["commandId"]
        except Exception as exc:  # a refused or failed write is counted, not fatal
            command.error = repr(exc)

    start = time.perf_counter()
    for index in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
        command = Command(sent=time.perf_counter())
        commands.append(command)
        tasks.append(asyncio.create_task(one(command, index)))
    await asyncio.gather(*tasks)
    return commands


def start_stack(root: Path, cleanup: contextlib.ExitStack, log_level: str = "WARNING",
                principals: list[dict[str, Any]] | None = None,
                gateway_env: dict[str, str] | None = None) -> dict[str, str]:
    """Kafka, Temporal and the gateway, documents and coordinator processes; returns their URLs.

    `principals` replaces the bench agent and operator in the credentials; `gateway_env` is added to the
    gateway's environment."""
    from kinshasa.infra.kafka import KafkaBroker, kafka_libs
    from kinshasa.infra.process import ManagedProcess, free_port, wait_until
    from kinshasa.infra.temporal import TemporalServer
    from kinshasa.kernel.admin_api import load_or_create_internal_token
    from kinshasa.launcher import StackPlan, StackPorts
    from kinshasa.settings import SERVICE_NAMES, InfraSettings, StackSettings
    from kinshasa.topics.admin import ensure_topics
    from kinshasa.topics.catalogue import catalogue

    infra = InfraSettings()
    kafka = KafkaBroker(root=root / "kafka", libs=kafka_libs(CACHE, infra.kafka_version, infra.kafka_home),
                        port=free_port(), controller_port=free_port())
    cleanup.callback(kafka.stop)
    print(f"kafka up in {kafka.start(attached=True):.1f} s", flush=True)
    temporal = TemporalServer(root=root / "temporal", port=free_port())
    cleanup.callback(temporal.stop)
    print(f"temporal up in {temporal.start(attached=True):.1f} s", flush=True)
    ensure_topics(kafka.bootstrap, catalogue())

    data_dir = root / "data"
    data_dir.mkdir()
    load_or_create_internal_token(data_dir)
    (data_dir / "credentials.json").write_text(json.dumps({"principals": principals or [
        {"id": "bench-agent", "kind": "agent", "scopes": ["*"], "key": AGENT_KEY},
        {"id": "bench-operator", "kind": "operator", "scopes": ["*"], "key": OPERATOR_KEY}]}))
    stack = StackSettings(data_dir=data_dir, kafka_bootstrap=kafka.bootstrap,
                          temporal_address=temporal.address, log_level=log_level)
    ports = StackPorts(gateway=free_port(), coordinator=free_port(), smtp=free_port(),
                       services={name: free_port() for name in SERVICE_NAMES})
    health = {"gateway": ports.gateway, "coordinator": ports.coordinator,
              "documents": ports.services["documents"]}
    started = []
    for name, argv, env in StackPlan(stack, ports, dev_mode=False).processes():
        if name in PROCESSES:
            # JSON logs carry timestamps, which is what a post-mortem of a slow run needs.
            env = os.environ | env | {"KINSHASA_LOG_FORMAT": "json"}
            if name == "gateway":
                env |= gateway_env or {}
            process = ManagedProcess(name=name, argv=argv, env=env, cwd=REPO,
                                     log_path=root / "logs" / f"{name}.log", pid_path=root / f"{name}.pid")
            cleanup.callback(process.stop)
            process.start(attached=True)
            started.append(process)
    for process in started:  # started together, so their imports and installs overlap

        def healthy(port: int = health[process.name]) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, process, 120, process.name)
    print("gateway, documents and coordinator are up", flush=True)
    return {"gateway": f"http://127.0.0.1:{ports.gateway}",
            "coordinator": f"http://127.0.0.1:{ports.coordinator}", "bootstrap": kafka.bootstrap}


async def measure(urls: dict[str, str], rate: float, seconds: float, warmup_s: float, poll_s: float,
                  drain_s: float) -> dict[str, Any]:
    from kinshasa.topics.catalogue import events_topic

    gateway = urls["gateway"]
    # uvicorn drops connections idle 5 s; keeping them as long races it (a request lost as ReadError).
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await gql(http, gateway, OPERATOR_KEY,
                  'mutation { setPolicy(scope: DEFAULT, reason: "latency bench", settings: {maxWrites: '
                  "10000000, maxVelocity: 10000000, velocityWindowS: 1, quarantineWindowS: 0}) { version } }")
        run_id = (await gql(http, gateway, AGENT_KEY,
                            'mutation { startRun(entryPoint: "bench-latency") { id } }'))["startRun"]["id"]
        tail = AppliedTail(urls["bootstrap"], events_topic("documents"))
        tail.run_id = run_id
        tail.start()
        in_ledger: dict[str, float] = {}
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_ledger(http, urls["coordinator"], run_id, in_ledger, poll_s, stop))
        try:
            # The warm-up takes the same path (connections, caches, consumer groups) but is not counted.
            await offer_load(http, gateway, run_id, rate, warmup_s)
            commands = await offer_load(http, gateway, run_id, rate, seconds)
            accepted = [c for c in commands if c.command_id is not None]
            deadline = time.monotonic() + drain_s
            # Polling: the stages are noted by a thread and a task, there is no event to wait on.
            while time.monotonic() < deadline and not all(  # noqa: ASYNC110
                    c.command_id in tail.seen and c.command_id in in_ledger for c in accepted):
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await poller
            tail.stop()

    def spans(start: str, end: str) -> list[float]:
        moments = {"sent": lambda c: c.sent, "accepted": lambda c: c.accepted,
                   "applied": lambda c: tail.seen.get(c.command_id),
                   "ledger": lambda c: in_ledger.get(c.command_id)}
        pairs = [(moments[start](c), moments[end](c)) for c in accepted]
        return [b - a for a, b in pairs if a is not None and b is not None]

    errors = sorted({c.error for c in commands if c.error})
    return {
        "database": "sqlite",
        "offered_per_s": rate,
        "seconds": seconds,
        "warmup_s": warmup_s,
        "ledger_poll_ms": round(poll_s * 1000),
        "commands": len(commands),
        "accepted": len(accepted),
        "applied": sum(1 for c in accepted if c.command_id in tail.seen),
        "in_ledger": sum(1 for c in accepted if c.command_id in in_ledger),
        "mutation_ms": percentiles(spans("sent", "accepted")),
        "accepted_to_applied_ms": percentiles(spans("accepted", "applied")),
        "accepted_to_ledger_ms": percentiles(spans("accepted", "ledger")),
        "applied_to_ledger_ms": percentiles(spans("applied", "ledger")),
        "errors": errors[:5],
    }


def print_table(f: dict[str, Any]) -> None:
    print(f"end-to-end latency, {f['database']}, {f['offered_per_s']:g}/s offered for {f['seconds']:g} s: "
          f"{f['accepted']}/{f['commands']} accepted, {f['applied']} applied, {f['in_ledger']} in the ledger")
    print(f"{'(ms)':<24}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for label, key in (("mutation round trip", "mutation_ms"),
                       ("accepted -> applied", "accepted_to_applied_ms"),
                       ("accepted -> in ledger", "accepted_to_ledger_ms"),
                       ("applied -> in ledger", "applied_to_ledger_ms")):
        row = f[key]
        print(f"{label:<24}" + "".join(f"{row[p] if row[p] is not None else '-':>9}"
                                       for p in ("p50", "p95", "p99", "max")))
    print(f"(in ledger: the coordinator API polled every {f['ledger_poll_ms']} ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run: 20/s for 3 s")
    parser.add_argument("--rate", type=float, default=50.0, help="offered mutations per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measured load")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="how often the ledger API is polled")
    args = parser.parse_args(argv)
    rate, seconds, warmup = (20.0, 3.0, 1.0) if args.small else (args.rate, args.seconds, 3.0)
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-latency-"))
    try:
        with contextlib.ExitStack() as cleanup:
            urls = start_stack(root, cleanup)
            figures = asyncio.run(measure(urls, rate, seconds, warmup, args.poll_ms / 1000, drain_s=60))
    except Exception as exc:
        # Everything is stopped by now; the logs stay for the post-mortem.
        print(f"latency benchmark failed: {exc!r}\nprocess logs are under {root / 'logs'}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    figures["mode"] = "small" if args.small else "full"
    # Other work on the machine moves every figure; record how busy it was (1, 5, 15 min).
    figures["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    print_table(figures)
    print(f"machine: {os.cpu_count()} cores, load average {figures['load_avg']} (1/5/15 min)")
    path = write_result(NAME, figures)
    print(f"wrote {path}")
    complete = figures["accepted"] == figures["applied"] == figures["in_ledger"] == figures["commands"]
    if not complete:
        print("not every offered command was accepted, applied and projected: see 'errors' in the result",
              file=sys.stderr)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
