"""Benchmark 2: end-to-end latency, accepted (gateway) to applied (service event) to in the ledger, by hop.

The real processes of the stack, as `kinshasa up` starts them (`StackPlan`): the gateway, the documents
service and the coordinator, each its own process on the embedded SQLite default, with a private Kafka
broker and Temporal dev server on free ports in a temporary directory. For each offered rate (50/s and
200/s by default), an open-loop client offers `createDocument` mutations in a run of their own (quarantine
window 0) and notes three moments of each command:

* accepted: the gateway's mutation response arrived (the command and its outbox row are committed);
* applied: the documents service's `documents.create.applied` event (causation = the command) was read
  from `kinshasa.events.documents` by a consumer tailing it (`fetch.wait.max.ms` 100: a fetch returns at
  the first byte, so the wait only bounds idle polling, which costs the broker CPU the stack shares);
* in the ledger: the coordinator's API (`GET /runs/<id>/steps`, polled every `--poll-ms`) first listed a
  step for the command. The poll interval bounds the error of this figure (half of it on average).

Where the time goes: the same tail reads the command on `kinshasa.commands.documents` too, and each
message carries two more moments, its envelope's `occurred_at` (stamped by the gateway at accept, by the
service in its handler) and its Kafka CreateTime (when the relay handed it to its producer). So each
command's path splits into hops (`HOPS`): gateway accept, gateway relay pickup, broker to service,
service consume -> handled, service commit + relay, broker to tail, coordinator projection, each printed
as p50/p95/p99. All moments are on the machine's wall clock, shared by every process here.

Then the saturation sweep: rising rates (`--sweep`) for `--sweep-seconds` each, until accepted -> in the
ledger p99 passes 1 s or a command goes missing; the saturation rate is the last rate that kept it.

    python -m bench.bench_latency [--small] [--rates 50,200] [--seconds 20] [--sweep 100,200,...]

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
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_latency.py`
    sys.path.insert(0, str(REPO))

from bench.keepalive import Pool  # noqa: E402
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
    """One offered mutation and the moments the client saw (wall-clock seconds, as Kafka and the envelopes
    stamp theirs)."""

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


def _stamp(value: str | None) -> float | None:
    """An envelope's ISO timestamp as wall-clock seconds."""
    return datetime.fromisoformat(value).timestamp() if value else None


@dataclass
class Seen:
    """One message of a run as the tail read it: when it was stamped (envelope `occurred_at`), produced
    (the Kafka record's CreateTime, set when the relay hands it to its producer) and read here."""

    occurred: float | None
    produced: float | None
    read: float


class StageTail:
    """Tails a service's commands and events topics in a thread, noting each command of a run and its
    `.applied` event (keyed by command id) with the three moments of `Seen`."""

    def __init__(self, bootstrap: str, service: str) -> None:
        from kinshasa.topics.catalogue import commands_topic, events_topic

        self.bootstrap = bootstrap
        self.commands_topic, self.events_topic = commands_topic(service), events_topic(service)
        self.run_id: str | None = None
        self.commands: dict[str, Seen] = {}
        self.applied: dict[str, Seen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stage-tail", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"bench-latency-{os.getpid()}",
                             "enable.auto.commit": False, "fetch.min.bytes": 1,
                             "fetch.wait.max.ms": 100})
        try:
            assignment = []
            for topic in (self.commands_topic, self.events_topic):
                partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
                assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
            consumer.assign(assignment)
            while not self._stop.is_set():
                # poll returns at the first message; consume(n, t) would wait out t for n of them.
                first = consumer.poll(0.05)
                if first is None:
                    continue
                now = time.time()
                for msg in [first, *consumer.consume(num_messages=500, timeout=0)]:
                    if msg.error() or msg.value() is None:
                        continue
                    envelope = json.loads(msg.value() or b"{}")
                    if envelope.get("run_id") != self.run_id:
                        continue
                    kind, stamp_ms = msg.timestamp()
                    seen = Seen(occurred=_stamp(envelope.get("occurred_at")),
                                produced=stamp_ms / 1000 if kind == TIMESTAMP_CREATE_TIME else None, read=now)
                    if msg.topic() == self.commands_topic:
                        self.commands.setdefault(envelope["message_id"], seen)
                    elif envelope["type"].endswith(".applied"):
                        self.applied.setdefault(envelope["causation_id"], seen)
        finally:
            consumer.close()


async def poll_ledger(coordinator: Pool, run_id: str, seen: dict[str, float],
                      interval_s: float, stop: asyncio.Event) -> None:
    """Note when the coordinator's ledger first lists a step for each command (newest-first pages)."""
    while not stop.is_set():
        started = time.perf_counter()
        before: int | None = None
        while True:
            # A short page: at the offered rates a poll finds a step or two, and each poll costs the
            # coordinator CPU that the measured path shares.
            query = "limit=10" + (f"&before={before}" if before else "")
            try:
                status, page = await coordinator.get(f"/runs/{run_id}/steps?{query}")
            except (OSError, asyncio.IncompleteReadError):
                break  # a busy coordinator: the next poll notes the step, a little late
            if status == 404:  # the run's first event is not projected yet
                break
            if status != 200:
                raise RuntimeError(f"the coordinator answered {status} to a ledger poll: {page}")
            now = time.time()
            fresh = [s["command_id"] for s in page["steps"] if s["command_id"] not in seen]
            for command_id in fresh:
                seen[command_id] = now
            # A page of only new steps may hide more behind it: read on until a known step.
            if len(fresh) < len(page["steps"]) or page["next_before"] is None:
                break
            before = page["next_before"]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (time.perf_counter() - started)))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def gql(gateway: Pool, key: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    status, body = await gateway.post({"query": query, "variables": variables or {}}, key)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"gateway answered {status}: {body!r}"[:500])
    if body.get("errors"):
        raise RuntimeError(f"gateway refused {query.split('{')[1].split('(')[0].strip()}: {body['errors']}")
    return dict(body["data"])


async def offer_load(gateway: Pool, run_id: str, rate: float, seconds: float) -> list[Command]:
    """Open loop: command i is sent at t0 + i/rate whatever the earlier ones are doing."""
    commands: list[Command] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(command: Command, index: int) -> None:
        try:
            data = await gql(gateway, AGENT_KEY, CREATE, {"r": run_id, "t": f"doc {index}"})
            command.accepted = time.time()
            command.command_id = data["createDocument"]["commandId"]
        except Exception as exc:  # a refused or failed write is counted, not fatal
            command.error = repr(exc)

    start = time.perf_counter()
    for index in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
        command = Command(sent=time.time())
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


# The hops of one command, each a span between two moments of `moments` (wall-clock seconds).
HOPS = (
    ("gateway accept", "sent", "accepted"),  # the agent's mutation round trip: commit and group commit
    ("gateway relay pickup", "stamped", "produced"),  # envelope stamped at accept -> handed to the producer
    ("broker to service", "produced", "command_read"),  # producer linger, broker append, consumer fetch
    ("service consume -> handled", "command_read", "event_stamped"),  # dispatcher batch, handler
    ("service commit + relay", "event_stamped", "event_produced"),  # the service's commit and outbox relay
    ("broker to tail", "event_produced", "applied"),  # the event's way to a consumer (the coordinator's too)
    ("coordinator projection", "applied", "ledger"),  # its fetch, projection, commit; API poll error
)


def moments(command: Command, tail: StageTail, in_ledger: dict[str, float]) -> dict[str, float | None]:
    cid = command.command_id or ""
    sent_command, applied = tail.commands.get(cid), tail.applied.get(cid)
    return {
        "sent": command.sent, "accepted": command.accepted,
        "stamped": sent_command.occurred if sent_command else None,
        "produced": sent_command.produced if sent_command else None,
        "command_read": sent_command.read if sent_command else None,
        "event_stamped": applied.occurred if applied else None,
        "event_produced": applied.produced if applied else None,
        "applied": applied.read if applied else None,
        "ledger": in_ledger.get(cid),
    }


async def measure(gateway: Pool, coordinator: Pool, bootstrap: str, rate: float, seconds: float,
                  warmup_s: float, poll_s: float, drain_s: float) -> dict[str, Any]:
    """Offers `rate` writes per second for `seconds` in a run of its own and times each command's hops."""
    started = await gql(gateway, AGENT_KEY,
                        f'mutation {{ startRun(entryPoint: "bench-latency-{rate:g}") {{ id }} }}')
    run_id = started["startRun"]["id"]
    tail = StageTail(bootstrap, "documents")
    tail.run_id = run_id
    tail.start()
    in_ledger: dict[str, float] = {}
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_ledger(coordinator, run_id, in_ledger, poll_s, stop))
    try:
        # The warm-up takes the same path (connections, caches, consumer groups) but is not counted.
        await offer_load(gateway, run_id, rate, warmup_s)
        commands = await offer_load(gateway, run_id, rate, seconds)
        accepted = [c for c in commands if c.command_id is not None]
        deadline = time.monotonic() + drain_s
        # Polling: the stages are noted by a thread and a task, there is no event to wait on.
        while time.monotonic() < deadline and not all(  # noqa: ASYNC110
                c.command_id in tail.applied and c.command_id in in_ledger for c in accepted):
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await poller
        tail.stop()
    seen = [moments(c, tail, in_ledger) for c in accepted]

    def spans(start: str, end: str) -> list[float]:
        return [m[end] - m[start] for m in seen if m[start] is not None and m[end] is not None]  # type: ignore[operator]

    errors = sorted({c.error for c in commands if c.error})
    return {
        "offered_per_s": rate,
        "seconds": seconds,
        "commands": len(commands),
        "accepted": len(accepted),
        "applied": sum(1 for c in accepted if c.command_id in tail.applied),
        "in_ledger": sum(1 for c in accepted if c.command_id in in_ledger),
        "mutation_ms": percentiles(spans("sent", "accepted")),
        "accepted_to_applied_ms": percentiles(spans("accepted", "applied")),
        "accepted_to_ledger_ms": percentiles(spans("accepted", "ledger")),
        "applied_to_ledger_ms": percentiles(spans("applied", "ledger")),
        "hops_ms": {label: percentiles(spans(start, end)) for label, start, end in HOPS},
        "errors": errors[:5],
    }


async def measure_all(urls: dict[str, str], rates: list[float], seconds: float, warmup_s: float,
                      poll_s: float, sweep: list[float], sweep_seconds: float) -> dict[str, Any]:
    """The stated rates, then the saturation sweep: rising rates until accepted -> in the ledger p99 > 1 s
    (or a command is lost or refused); the saturation rate is the last rate that kept it."""
    from kinshasa.kernel.component import freeze_startup_heap

    # The load generator shares the two cores with the stack: its client is the cheapest there is. Its
    # startup heap is frozen as the stack's processes freeze theirs: a full collection of it stopped this
    # process (its tail and ledger poll, whose reads are the moments measured) for 50 to 80 ms.
    freeze_startup_heap()
    gateway, coordinator = Pool(port_of(urls["gateway"])), Pool(port_of(urls["coordinator"]))
    try:
        await gql(gateway, OPERATOR_KEY,
                  'mutation { setPolicy(scope: DEFAULT, reason: "latency bench", settings: {maxWrites: '
                  "10000000, maxVelocity: 10000000, velocityWindowS: 1, quarantineWindowS: 0}) { version } }")
        by_rate = [await measure(gateway, coordinator, urls["bootstrap"], rate, seconds, warmup_s, poll_s,
                                 drain_s=60) for rate in rates]
        saturation: float | None = None
        steps = []
        for rate in sweep:
            step = await measure(gateway, coordinator, urls["bootstrap"], rate, sweep_seconds, warmup_s,
                                 poll_s, drain_s=30)
            p99 = step["accepted_to_ledger_ms"]["p99"]
            kept = (step["in_ledger"] == step["commands"] and p99 is not None and p99 <= 1000)
            steps.append({"offered_per_s": rate, "accepted_to_ledger_p99_ms": p99, "kept": kept,
                          "lost_or_refused": step["commands"] - step["in_ledger"]})
            if not kept:
                break
            saturation = rate
    finally:
        gateway.close()
        coordinator.close()
    return {"database": "sqlite", "warmup_s": warmup_s, "ledger_poll_ms": round(poll_s * 1000),
            "rates": by_rate, "saturation": {"rate_per_s": saturation, "steps": steps,
                                             "seconds_per_step": sweep_seconds}}


def print_table(f: dict[str, Any]) -> None:
    print(f"{'(ms)':<30}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")

    def row(label: str, figures: dict[str, float | None]) -> None:
        print(f"{label:<30}" + "".join(f"{figures[p] if figures[p] is not None else '-':>9}"
                                       for p in ("p50", "p95", "p99", "max")))

    for r in f["rates"]:
        print(f"latency, {f['database']}, {r['offered_per_s']:g}/s offered for {r['seconds']:g} s: "
              f"{r['accepted']}/{r['commands']} accepted, {r['applied']} applied, "
              f"{r['in_ledger']} in the ledger")
        for label, key in (("mutation round trip", "mutation_ms"),
                           ("accepted -> applied", "accepted_to_applied_ms"),
                           ("accepted -> in ledger", "accepted_to_ledger_ms"),
                           ("applied -> in ledger", "applied_to_ledger_ms")):
            row(label, r[key])
        print("  per hop:")
        for label, hop in r["hops_ms"].items():
            row(f"  {label}", hop)
    print(f"(in ledger: the coordinator API polled every {f['ledger_poll_ms']} ms; hops from envelope "
          "stamps, Kafka CreateTime and this process's reads, all on the machine's wall clock)")
    sat = f["saturation"]
    steps = ", ".join(f"{s['offered_per_s']:g}/s: {s['accepted_to_ledger_p99_ms']} ms"
                      + ("" if s["kept"] else f" (over, {s['lost_or_refused']} not in the ledger)")
                      for s in sat["steps"])
    print(f"saturation (highest offered rate with accepted -> in ledger p99 <= 1 s): "
          f"{sat['rate_per_s'] if sat['rate_per_s'] is not None else '-'}/s [{steps}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run: 20/s for 3 s, a two-step sweep")
    parser.add_argument("--rates", default="50,200", help="offered mutations per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measured load per rate")
    parser.add_argument("--sweep", default="100,200,300,400,600,800,1000",
                        help="rates tried for the saturation rate, rising; empty to skip")
    parser.add_argument("--sweep-seconds", type=float, default=10.0, help="length of each sweep step")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="how often the ledger API is polled")
    args = parser.parse_args(argv)
    if args.small:
        rates, seconds, warmup, sweep, sweep_seconds = [20.0], 3.0, 1.0, [20.0, 40.0], 2.0
    else:
        rates = [float(r) for r in args.rates.split(",") if r]
        sweep = [float(r) for r in args.sweep.split(",") if r]
        seconds, warmup, sweep_seconds = args.seconds, 3.0, args.sweep_seconds
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-latency-"))
    try:
        with contextlib.ExitStack() as cleanup:
            # What is measured is the stack's latency, not one agent's fairness budget (about 100 writes/s).
            limits = {"bench-agent": {"rate_per_s": 1e9, "rate_burst": 1e9, "max_in_flight": 10_000}}
            urls = start_stack(root, cleanup,
                               gateway_env={"KINSHASA_GATEWAY_PRINCIPAL_LIMITS": json.dumps(limits)})
            figures = asyncio.run(measure_all(urls, rates, seconds, warmup, args.poll_ms / 1000,
                                              sweep, sweep_seconds))
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
    complete = all(r["accepted"] == r["applied"] == r["in_ledger"] == r["commands"] for r in figures["rates"])
    if not complete:
        print("not every offered command was accepted, applied and projected: see 'errors' in the result",
              file=sys.stderr)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
