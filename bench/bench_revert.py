"""Benchmark 3: revert a 10,000-step run across three services with `RevertRun`, against the naive saga.

One stack, private Kafka broker and Temporal dev server on free ports in a temporary directory:
documents, ledger and links as their own processes (`ServiceRuntime`, one record per poll), the
coordinator as its own process (`python -m kinshasa.coordinator`: projector, worker, relay, API) on
SQLite. A run of `--steps` commands (creates, renames, edits, archives, postings, links, unlinks) is
published as the gateway would publish it; once the ledger holds every result, `run.revert_requested`
rings the bell and the clock runs until `RevertRun` returns REVERTED. Every touched entity is then
compared with its state before the run.

The naive saga (`bench.naive_saga`: one Temporal activity per compensation, each sending the
compensate command and waiting for its ack, strictly in sequence) reverts a second run of the same shape
on the same stack. Being sequential, its time is linear in the steps; by default it reverts a sample of
`--naive-steps` and the 10,000-step figure is that rate times 10,000 (`--naive-full` reverts the whole
run instead, which takes long). The ratio is naive time / RevertRun time.

The services bound both: the report gives their own forward apply rate on this machine, measured on
the same run, so the revert's rate can be read against it.

    python -m bench.bench_revert [--small] [--steps 10000] [--naive-steps 500] [--naive-full]

Writes bench/results/revert.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_revert.py`
    sys.path.insert(0, str(REPO))

from bench.machine import write_result  # noqa: E402
from bench.naive_saga import NaiveActivities, NaiveInput, NaiveResult, NaiveRevert  # noqa: E402
from kinshasa.coordinator.models import RevertOutcome, RevertPolicy  # noqa: E402
from kinshasa.coordinator.run_ledger import Ledger  # noqa: E402
from kinshasa.coordinator.topic_names import CoordinatorTopics  # noqa: E402
from kinshasa.coordinator.worker import connect  # noqa: E402
from kinshasa.coordinator.workflows import revert_workflow_id  # noqa: E402
from kinshasa.infra.kafka import KafkaBroker, kafka_libs  # noqa: E402
from kinshasa.infra.process import free_port  # noqa: E402
from kinshasa.infra.temporal import TemporalServer  # noqa: E402
from kinshasa.kernel.database import create_engine  # noqa: E402
from kinshasa.schemas.envelope import Envelope, RunEventKind, utcnow  # noqa: E402
from kinshasa.settings import InfraSettings  # noqa: E402
from kinshasa.topics.producer import AsyncProducer, envelope_message  # noqa: E402
from tests.integration.coordinator.harness import (  # noqa: E402
    ServiceFleet,
    Workload,
    agent,
    compare,
    run_fact,
    service_fleet,
)

NAME = "revert"
CACHE = REPO / ".kinshasa" / "cache"
TASK_QUEUE = "kinshasa-revert-bench"
NAIVE_QUEUE = "kinshasa-naive-bench"
POLICY = RevertPolicy()


class Bench:
    """The stack under measurement and the bench's own clients."""

    def __init__(self, fleet: ServiceFleet, temporal: TemporalServer, root: Path) -> None:
        self.fleet = fleet
        self.temporal = temporal
        self.root = root
        self.topics = CoordinatorTopics(suffix=fleet.suffix)
        self.db_url = f"sqlite+aiosqlite:///{root / 'coordinator.sqlite3'}"
        self.coordinator: subprocess.Popen[bytes] | None = None

    def start_coordinator(self) -> None:
        env = {**os.environ, "KINSHASA_KAFKA_BOOTSTRAP": self.fleet.kafka_bootstrap,
               "KINSHASA_TEMPORAL_ADDRESS": self.temporal.address, "KINSHASA_DATA_DIR": str(self.root),
               "KINSHASA_LOG_LEVEL": "WARNING", "KINSHASA_COORDINATOR_DATABASE_URL": self.db_url,
               "KINSHASA_COORDINATOR_TASK_QUEUE": TASK_QUEUE, "KINSHASA_COORDINATOR_ADMIN_PORT": "0"}
        log = (self.root / "coordinator.log").open("ab")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "kinshasa.coordinator", "--topic-suffix", self.fleet.suffix,
             "--policy-json", POLICY.model_dump_json()],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        address = self.root / "run" / "coordinator.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited; see {self.root / 'coordinator.log'}")
            if address.exists():
                try:
                    url = json.loads(address.read_text())["url"]
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        return
                except (ValueError, KeyError, httpx.HTTPError):
                    pass
            time.sleep(0.2)
        raise TimeoutError("the coordinator did not become healthy in 90s")

    def stop_coordinator(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.terminate()
            try:
                self.coordinator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()
                self.coordinator.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(bench: Bench) -> dict[str, float]:
    pids = {name: proc.pid for name, proc in bench.fleet.procs.items()}
    if bench.coordinator is not None:
        pids["coordinator"] = bench.coordinator.pid
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def publish(producer: AsyncProducer, topics: CoordinatorTopics, envelopes: list[Envelope]) -> None:
    items = [envelope_message(topics.runs if e.entity is None else topics.commands(e.entity.service), e)
             for e in envelopes]
    for start in range(0, len(items), 2000):
        await producer.send_batch(items[start:start + 2000])


async def wait_results(ledger: Ledger, run_id: str, count: int, within: float) -> float:
    started = time.monotonic()
    while (await ledger.counts(run_id)).results < count:
        if time.monotonic() - started > within:
            raise TimeoutError(f"run {run_id}: fewer than {count} results after {within}s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def prepare_run(bench: Bench, producer: AsyncProducer, ledger: Ledger, seed: int, steps: int,
                      label: str) -> tuple[str, float, dict[str, Any]]:
    """A world, its snapshot, then a run of `steps` commands; returns (run id, apply seconds, snapshot)."""
    work = Workload(random.Random(seed))
    setup = f"setup-{label}-{uuid.uuid4().hex[:6]}"
    world_size = max(20, steps // 15)
    world = work.world(setup, "bench-setup", docs=world_size, accounts=max(5, world_size // 4),
                       links=max(5, world_size // 4))
    await publish(producer, bench.topics, world)
    await wait_results(ledger, setup, len(world), 600)
    before = await bench.fleet.snapshot()
    run_id = f"bench-{label}-{uuid.uuid4()}"
    await publish(producer, bench.topics, [run_fact(run_id, RunEventKind.STARTED, {
        "agent_id": "bench-agent", "entry_point": "bench", "purpose": label,
        "started_at": utcnow().isoformat()}, agent("bench-agent"))])
    commands = work.run(run_id, "bench-agent", steps)
    started = time.monotonic()
    await publish(producer, bench.topics, commands)
    await wait_results(ledger, run_id, len(commands), 3600)
    applied_s = time.monotonic() - started
    print(f"  {label}: {steps} forward commands applied and in the ledger in {applied_s:.1f}s "
          f"({steps / applied_s:.0f}/s)", flush=True)
    return run_id, applied_s, before


async def run(args: argparse.Namespace, fleet: ServiceFleet, temporal: TemporalServer,
              root: Path) -> dict[str, Any]:
    from temporalio.worker import Worker

    bench = Bench(fleet, temporal, root)
    bench.start_coordinator()
    engine = create_engine(bench.db_url)
    ledger = Ledger(engine)
    producer = AsyncProducer(fleet.kafka_bootstrap, client_id="bench-gateway")
    client = await connect(temporal.address)
    load_before = os.getloadavg()
    try:
        run_id, forward_s, before = await prepare_run(bench, producer, ledger, 1, args.steps, "kinshasa")
        counts = await ledger.counts(run_id)
        cpu_before = cpu_by_process(bench)
        started = time.monotonic()
        await publish(producer, bench.topics, [run_fact(run_id, RunEventKind.REVERT_REQUESTED, {
            "reason": "benchmark", "requested_by": "bench", "published_count": args.steps})])
        handle = client.get_workflow_handle(revert_workflow_id(run_id), result_type=RevertOutcome)
        while True:
            try:
                outcome = await handle.result()
                break
            except Exception:
                if time.monotonic() - started > 3600:
                    raise
                await asyncio.sleep(0.1)
        revert_s = time.monotonic() - started
        cpu_after = cpu_by_process(bench)
        # Who did the work: the services applying inverses, or the coordinator driving them.
        revert_cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 1) for name in cpu_after}
        history = await handle.fetch_history()
        problems = compare(before, await fleet.snapshot())
        print(f"  RevertRun: {outcome.status}, {outcome.compensated} steps undone in {revert_s:.1f}s "
              f"({outcome.compensated / revert_s:.0f}/s), {len(history.events)} history events, "
              f"{len(problems)} entities differing from before; CPU seconds meanwhile: {revert_cpu}",
              flush=True)

        naive_steps = args.steps if args.naive_full else min(args.naive_steps, args.steps)
        naive_run, _, naive_before = await prepare_run(bench, producer, ledger, 2, naive_steps, "naive")
        activities = NaiveActivities(ledger, producer, bench.topics)
        async with Worker(client, task_queue=NAIVE_QUEUE, workflows=[NaiveRevert],
                          activities=[activities.list_steps, activities.compensate_one]):
            naive_started = time.monotonic()
            naive: NaiveResult = await client.execute_workflow(
                NaiveRevert.run, NaiveInput(run_id=naive_run), id=f"naive:{naive_run}",
                task_queue=NAIVE_QUEUE, execution_timeout=timedelta(hours=6))
            naive_s = time.monotonic() - naive_started
        naive_problems = compare(naive_before, await fleet.snapshot())
        per_step = naive_s / max(1, naive.compensated)
        naive_total = per_step * args.steps
        print(f"  naive saga: {naive.compensated} steps undone in {naive_s:.1f}s "
              f"({per_step * 1000:.0f} ms/step); {args.steps} steps would take {naive_total:.0f}s",
              flush=True)
        ratio = naive_total / revert_s
        return {
            "steps": args.steps, "services": list(fleet.names), "database": "sqlite",
            "run_counts": {"steps": counts.steps, "rejected": counts.rejected},
            "forward_apply_s": round(forward_s, 2), "forward_apply_per_s": round(args.steps / forward_s, 1),
            "revert_s": round(revert_s, 2), "revert_per_s": round(outcome.compensated / revert_s, 1),
            "revert_status": outcome.status, "revert_compensated": outcome.compensated,
            "revert_passes": outcome.passes, "revert_history_events": len(history.events),
            "revert_cpu_s_by_process": revert_cpu,
            "restored_exactly": not problems and outcome.status == "REVERTED",
            "naive_steps_measured": naive.compensated, "naive_measured_s": round(naive_s, 2),
            "naive_ms_per_step": round(per_step * 1000, 1), "naive_full_run": bool(args.naive_full),
            "naive_s_for_all_steps": round(naive_total, 1), "naive_restored_exactly": not naive_problems,
            "ratio_naive_over_revert": round(ratio, 1),
            "target": {"ratio_at_least": 20, "revert_under_s": 30,
                       "ratio_met": ratio >= 20, "time_met": revert_s < 30},
            "policy": {"entity_depth": POLICY.entity_depth, "batch_size": POLICY.batch_size,
                       "poll_interval_s": POLICY.poll_interval_s},
            # Other work on the machine skews every figure: keep the load next to them.
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        await producer.close()
        await ledger.close()
        await engine.dispose()
        bench.stop_coordinator()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--small", action="store_true", help="1,000 steps and a 100-step naive sample")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--naive-steps", type=int, default=None)
    parser.add_argument("--naive-full", action="store_true", help="revert the whole run the naive way too")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1000 if args.small else 10_000)
    args.naive_steps = args.naive_steps or (100 if args.small else 500)
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-revert-"))
    infra = InfraSettings()
    kafka = KafkaBroker(root=root / "kafka", libs=kafka_libs(CACHE, infra.kafka_version, infra.kafka_home),
                        port=free_port(), controller_port=free_port())
    temporal = TemporalServer(root=root / "temporal", port=free_port())
    try:
        kafka.start(attached=True)
        temporal.start(attached=True)
        print(f"revert benchmark: {args.steps} steps across documents, ledger and links", flush=True)
        with service_fleet(kafka.bootstrap, root / "fleet", f"b{uuid.uuid4().hex[:8]}") as fleet:
            figures = asyncio.run(run(args, fleet, temporal, root / "fleet"))
    finally:
        temporal.stop()
        kafka.stop()
        shutil.rmtree(root, ignore_errors=True)
    figures["small"] = bool(args.small)
    path = write_result(NAME, figures)
    target = figures["target"]
    print(f"  ratio naive/RevertRun: {figures['ratio_naive_over_revert']}x "
          f"(target >= 20x: {'met' if target['ratio_met'] else 'NOT met'}); "
          f"RevertRun {figures['revert_s']}s (target < 30s: {'met' if target['time_met'] else 'NOT met'})")
    print(f"  wrote {path}")
    return 0 if figures["restored_exactly"] else 1


if __name__ == "__main__":
    sys.exit(main())
