"""A real stack for coordinator tests: the example services and the coordinator in-process, on a topic suffix.

Nothing is faked. The services are the real `ServiceRuntime`s (consumer, inbox, outbox relay, SQLite),
the coordinator is the real `CoordinatorRuntime` (projector, Temporal worker, relay), Kafka and Temporal
are the session's real servers. The test stands where the gateway stands: it publishes forward commands
and run facts exactly as docs/contracts.md has the gateway publish them. Each test gets its own topic
suffix, databases and task queue, so tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from kinshasa.coordinator.models import RevertOutcome, RevertPolicy
from kinshasa.coordinator.run_ledger import Ledger
from kinshasa.coordinator.runtime import ROLES, CoordinatorOptions, CoordinatorRuntime
from kinshasa.coordinator.topic_names import CoordinatorTopics
from kinshasa.coordinator.worker import connect
from kinshasa.coordinator.workflows import revert_workflow_id
from kinshasa.kernel.database import create_engine
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, RunEventKind, utcnow
from kinshasa.services import documents, ledger, links
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.services.registry import example_catalogue
from kinshasa.settings import CoordinatorSettings, StackSettings
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.producer import AsyncProducer, envelope_message

CATALOGUE = example_catalogue()

REPO = Path(__file__).resolve().parents[3]
GATEWAY = Actor(kind="system", id="gateway")
OPERATOR = "operator-1"
SERVICES = ("documents", "ledger", "links")
DOMAIN_STATE: dict[str, Callable[[AsyncConnection], Awaitable[dict[str, dict[str, Any]]]]] = {
    "documents": documents.domain_state, "ledger": ledger.domain_state, "links": links.domain_state}
REMOVED: dict[str, Callable[[Any], bool]] = {
    "documents": documents.removed, "ledger": ledger.removed, "links": links.removed}
# Tests keep the attempt budget short so a failing revert fails in seconds, not minutes.
FAST_POLICY = RevertPolicy(attempts=3, backoff_s=0.5, max_backoff_s=2.0, straggler_timeout_s=8.0,
                           forward_wait_s=60.0)
# Tests that kill a revert's worker (or Temporal) mid-revert. Short heartbeats: an activity whose
# completion Temporal never heard of is retried within seconds. One compensate in flight per entity:
# what the services still apply after the kill is at most one per entity, so the kill lands
# mid-revert however fast they are (with 16, the whole first pass was in flight).
KILL_POLICY = FAST_POLICY.model_copy(update={"heartbeat_timeout_s": 4.0, "entity_depth": 1})


def agent(agent_id: str) -> Actor:
    return Actor(kind="agent", id=agent_id)


def forward(service: str, operation: str, payload: dict[str, Any], entity_id: str, run_id: str,
            agent_id: str) -> Envelope:
    """A forward command as the gateway publishes it (contracts: message id = command id)."""
    spec = CATALOGUE.by_command_type(f"{service}.{operation}")
    return Envelope(message_id=uuid.uuid4(), type=spec.command_type, run_id=run_id, actor=agent(agent_id),
                    correlation_id=run_id,
                    entity=EntityRef(service=service, type=spec.entity_type, id=entity_id),
                    occurred_at=utcnow(), payload=payload)


def run_fact(run_id: str, kind: RunEventKind, payload: dict[str, Any], actor: Actor = GATEWAY) -> Envelope:
    return Envelope(message_id=uuid.uuid4(), type=kind.type, run_id=run_id, actor=actor,
                    correlation_id=run_id,
                    occurred_at=utcnow(), payload=payload)


@dataclass
class Workload:
    """Valid command sequences over documents, ledger and links, tracking state so nothing is rejected."""

    rng: random.Random
    docs: dict[str, str] = field(default_factory=dict)  # id -> active | archived
    accounts: list[str] = field(default_factory=list)
    links: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # active links
    # Every (from, to, kind) ever linked: reusing one would make a link depend on an unlink of another
    # entity, which the services may apply in either order (different keys, different partitions).
    triples: set[tuple[str, str, str]] = field(default_factory=set)

    def _word(self) -> str:
        return "".join(self.rng.choice("abcdefghij") for _ in range(6))

    def create_doc(self, run_id: str, agent_id: str) -> Envelope:
        doc = str(uuid.uuid4())
        self.docs[doc] = "active"
        return forward("documents", "create", {"title": self._word(), "body": self._word()}, doc, run_id,
                       agent_id)

    def open_account(self, run_id: str, agent_id: str) -> Envelope:
        account = str(uuid.uuid4())
        self.accounts.append(account)
        return forward("ledger", "open_account", {"name": self._word(), "currency": "EUR"}, account, run_id,
                       agent_id)

    def post(self, run_id: str, agent_id: str) -> Envelope:
        account = self.rng.choice(self.accounts)
        amount = self.rng.choice([-1, 1]) * self.rng.randint(1, 50_000)
        return forward("ledger", "post_entry", {"account_id": account, "amount_cents": amount, "memo": "m"},
                       account, run_id, agent_id)

    def link(self, run_id: str, agent_id: str) -> Envelope | None:
        ends = self.rng.sample(sorted(self.docs), 2)
        triple = (ends[0], ends[1], self.rng.choice(["refs", "cites"]))
        if triple in self.triples:
            return None
        link_id = str(uuid.uuid4())
        self.links[link_id] = triple
        self.triples.add(triple)
        payload = {"from_id": triple[0], "to_id": triple[1], "kind": triple[2]}
        return forward("links", "link", payload, link_id,
                       run_id, agent_id)

    def unlink(self, run_id: str, agent_id: str) -> Envelope | None:
        if not self.links:
            return None
        link_id = self.rng.choice(sorted(self.links))
        self.links.pop(link_id)
        return forward("links", "unlink", {"link_id": link_id}, link_id, run_id, agent_id)

    def doc_change(self, run_id: str, agent_id: str) -> Envelope | None:
        doc = self.rng.choice(sorted(self.docs))
        status = self.docs[doc]
        roll = self.rng.random()
        if status == "archived":
            self.docs[doc] = "active"
            return forward("documents", "unarchive", {"document_id": doc}, doc, run_id, agent_id)
        if roll < 0.45:
            return forward("documents", "rename", {"document_id": doc, "title": self._word()}, doc, run_id,
                           agent_id)
        if roll < 0.9:
            return forward("documents", "edit", {"document_id": doc, "body": self._word()}, doc, run_id,
                           agent_id)
        self.docs[doc] = "archived"
        return forward("documents", "archive", {"document_id": doc}, doc, run_id, agent_id)

    def world(self, run_id: str, agent_id: str, docs: int, accounts: int, links: int) -> list[Envelope]:
        """The world before the run under test: entities it will then touch."""
        out = [self.create_doc(run_id, agent_id) for _ in range(docs)]
        out += [self.open_account(run_id, agent_id) for _ in range(accounts)]
        out += [self.post(run_id, agent_id) for _ in range(accounts)]
        while len(out) < docs + 2 * accounts + links:
            cmd = self.link(run_id, agent_id)
            if cmd is not None:
                out.append(cmd)
        return out

    def run(self, run_id: str, agent_id: str, count: int) -> list[Envelope]:
        """`count` commands of one run across the three services, none of which the services refuse."""
        out: list[Envelope] = []
        while len(out) < count:
            roll = self.rng.random()
            cmd: Envelope | None
            if roll < 0.06:
                cmd = self.create_doc(run_id, agent_id)
            elif roll < 0.52:
                cmd = self.doc_change(run_id, agent_id)
            elif roll < 0.54:
                cmd = self.open_account(run_id, agent_id)
            elif roll < 0.82:
                cmd = self.post(run_id, agent_id)
            elif roll < 0.93:
                cmd = self.link(run_id, agent_id)
            else:
                cmd = self.unlink(run_id, agent_id)
            if cmd is not None:
                out.append(cmd)
        return out


class ServiceFleet:
    """The example services as real processes (their `ServiceRuntime`, see `service_process`).

    Processes rather than in-process runtimes: each service then has its own event loop and GIL, as in
    production, and a stall in one (the consumer's periodic lag check blocks its loop) stays in it.
    """

    def __init__(self, kafka_bootstrap: str, root: Path, suffix: str,
                 names: Sequence[str] = SERVICES) -> None:
        self.kafka_bootstrap = kafka_bootstrap
        self.root = root
        self.suffix = suffix
        self.names = tuple(names)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def database_url(self, name: str) -> str:
        return f"sqlite+aiosqlite:///{self.root / f'{name}.sqlite3'}"

    def _env(self, name: str) -> dict[str, str]:
        prefix = f"KINSHASA_SVC_{name.upper()}_"
        return {**os.environ, "KINSHASA_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                "KINSHASA_DATA_DIR": str(self.root),
                "KINSHASA_LOG_LEVEL": "WARNING", f"{prefix}DATABASE_URL": self.database_url(name),
                f"{prefix}ADMIN_PORT": "0"}

    def start(self, name: str) -> None:
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        (self.root / "run" / f"svc-{name}.json").unlink(missing_ok=True)
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.coordinator.service_process", name, self.suffix],
            env=self._env(name), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, name: str, timeout: float = 90.0) -> None:
        address = self.root / "run" / f"svc-{name}.json"
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"service {name} exited: {self.log_tail(name)}")
            if address.exists():
                try:
                    url = json.loads(address.read_text())["url"]
                    if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                        return
                except (ValueError, KeyError, httpx.HTTPError):
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {name} not healthy after {timeout}s: {self.log_tail(name)}")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def start_all(self) -> None:
        # Every topic of this suffix's services and coordinators, as `kinshasa topics ensure` creates them
        # before a deployment starts: each component only checks its own.
        specs = {spec.name: spec for spec in CoordinatorTopics(suffix=self.suffix).specs()}
        for name in self.names:
            # The services share one catalogue topic: each spec once.
            specs |= {spec.name: spec for spec in ServiceTopics.for_service(name, self.suffix).specs(name)}
        ensure_topics(self.kafka_bootstrap, list(specs.values()))
        for name in self.names:
            self.start(name)
        for name in self.names:
            self.wait_ready(name)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every entity's current domain state, per service (the services' own state functions).

        Read through plain deferred transactions, so the snapshot never takes a running service's write lock.
        """
        out = {}
        for name in self.names:
            engine = create_async_engine(self.database_url(name), connect_args={"timeout": 30})
            try:
                async with engine.connect() as conn:
                    out[name] = await DOMAIN_STATE[name](conn)
            finally:
                await engine.dispose()
        return out

    async def count(self, name: str, sql: str, **params: Any) -> int:
        engine = create_async_engine(self.database_url(name), connect_args={"timeout": 30})
        try:
            async with engine.connect() as conn:
                return int((await conn.execute(text(sql), params)).scalar_one())
        finally:
            await engine.dispose()

    async def compensation_writes(self, run_id: str) -> int:
        """Domain rows the coordinator's compensations wrote for a run, across the three services.

        Every applied compensation writes exactly one: a document or link version, a closed account
        version or a reversal entry. A compensation applied twice would show up here as one too many.
        """
        actor = "system:coordinator"
        total = 0
        for service, table in (("documents", "document_versions"), ("links", "link_versions"),
                               ("ledger", "account_versions"), ("ledger", "ledger_entries")):
            sql = f"SELECT count(*) FROM {table} WHERE run_id = :r AND actor = :a"
            total += await self.count(service, sql, r=run_id, a=actor)
        return total

    async def compensation_records(self, run_id: str) -> int:
        """Rows in the services' own record of undone steps for a run."""
        return sum([await self.count(s, f"SELECT count(*) FROM {s}_compensations WHERE run_id = :r", r=run_id)
                    for s in self.names])


@contextlib.contextmanager
def service_fleet(kafka_bootstrap: str, root: Path, suffix: str,
                  names: Sequence[str] = SERVICES) -> Iterator[ServiceFleet]:
    fleet = ServiceFleet(kafka_bootstrap, root, suffix, names)
    try:
        fleet.start_all()
        yield fleet
    finally:
        fleet.stop_all()


@dataclass
class Stack:
    """One test's coordinator (in-process, own database, consumer group and task queue) over a fleet."""

    fleet: ServiceFleet
    temporal_address: str
    root: Path
    task_queue: str
    policy: RevertPolicy
    topics: CoordinatorTopics = field(init=False)
    producer: AsyncProducer = field(init=False)
    client: Client = field(init=False)
    coordinator: tuple[CoordinatorRuntime, asyncio.Event, asyncio.Task[None]] | None = None
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.topics = CoordinatorTopics(suffix=self.fleet.suffix)
        self.coordinator_url = f"sqlite+aiosqlite:///{self.root / 'coordinator.sqlite3'}"
        self.ledger = Ledger(create_engine(self.coordinator_url))

    @property
    def kafka_bootstrap(self) -> str:
        return self.fleet.kafka_bootstrap

    @property
    def stack_settings(self) -> StackSettings:
        return StackSettings(data_dir=self.root, kafka_bootstrap=self.kafka_bootstrap,
                             temporal_address=self.temporal_address)

    @property
    def consumer_group(self) -> str:
        # Its own group: a fresh ledger must read the topics from the start.
        return f"{self.topics.group}.{self.task_queue.replace('-', '_')}"

    def coordinator_runtime(self, roles: Sequence[str] | None = None) -> CoordinatorRuntime:
        options = CoordinatorOptions(roles=tuple(roles) if roles else ROLES, topic_suffix=self.fleet.suffix,
                                     policy=self.policy, consumer_group=self.consumer_group)
        return CoordinatorRuntime(stack=self.stack_settings,
                                  settings=CoordinatorSettings(database_url=self.coordinator_url,
                                                               admin_port=0, task_queue=self.task_queue,
                                                               metrics_cache_s=0.1),
                                  options=options)

    async def start_coordinator(self, roles: Sequence[str] | None = None) -> CoordinatorRuntime:
        runtime = self.coordinator_runtime(roles)
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(stop), name="coordinator")
        await _ready(runtime.ready, task, "coordinator")
        self.coordinator = (runtime, stop, task)
        return runtime

    async def stop_coordinator(self) -> None:
        if self.coordinator is not None:
            _, stop, task = self.coordinator
            self.coordinator = None
            stop.set()
            await task

    async def publish(self, envelopes: Iterable[Envelope]) -> None:
        """Publish forward commands (to their service's command topic) and run facts, in order."""
        items = []
        for env in envelopes:
            if env.type.startswith("run."):
                items.append(envelope_message(self.topics.runs, env))
            else:
                assert env.entity is not None
                items.append(envelope_message(self.topics.commands(env.entity.service), env))
        for start in range(0, len(items), 2000):
            await self.producer.send_batch(items[start:start + 2000])

    async def start_run(self, run_id: str, agent_id: str, entry_point: str = "chat") -> None:
        await self.publish([run_fact(run_id, RunEventKind.STARTED, {
            "agent_id": agent_id, "entry_point": entry_point, "purpose": "test",
            "started_at": utcnow().isoformat()}, agent(agent_id))])

    async def request_revert(self, run_id: str, published_count: int, reason: str = "bad run") -> None:
        await self.publish([run_fact(run_id, RunEventKind.REVERT_REQUESTED, {
            "reason": reason, "requested_by": OPERATOR, "published_count": published_count})])

    async def wait_results(self, run_id: str, count: int, within: float = 120.0) -> None:
        """Wait until the ledger holds a result for `count` commands of the run."""
        await wait_for(lambda: self._results_at_least(run_id, count), within,
                       f"{count} results of run {run_id} in the ledger")

    async def _results_at_least(self, run_id: str, count: int) -> bool:
        return (await self.ledger.counts(run_id)).results >= count

    async def workflow_run_id(self, run_id: str) -> str:
        """The Temporal run id of the newest `revert:<run_id>` workflow run."""
        return str((await self.client.get_workflow_handle(revert_workflow_id(run_id)).describe()).run_id)

    async def revert_result(self, run_id: str, within: float = 180.0,
                            after_run: str | None = None) -> RevertOutcome:
        """The outcome of the newest `revert:<run_id>` workflow run, once it exists and has finished.

        With `after_run`, waits for a workflow run other than that one (a later revert request's).
        """
        deadline = time.monotonic() + within
        while True:
            handle: WorkflowHandle[Any, RevertOutcome] = self.client.get_workflow_handle(
                revert_workflow_id(run_id), result_type=RevertOutcome)
            try:
                if after_run is not None and (await handle.describe()).run_id == after_run:
                    raise LookupError("the later workflow run has not started yet")
                return await asyncio.wait_for(handle.result(), max(0.1, deadline - time.monotonic()))
            except (RPCError, LookupError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        return await self.fleet.snapshot()

    async def stop(self) -> None:
        await self.stop_coordinator()
        await self.producer.close()
        await self.ledger.close()
        await self.ledger.engine.dispose()


async def _ready(ready: asyncio.Event, task: asyncio.Task[None], what: str, within: float = 60.0) -> None:
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait([waiter, task], timeout=within, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task in done:
            task.result()
        raise TimeoutError(f"{what} did not become ready in {within}s")


async def wait_for(check: Callable[[], Awaitable[bool]], within: float, what: str,
                   interval: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def coordinator_stack(fleet: ServiceFleet, temporal_address: str, root: Path, unique: str, *,
                            policy: RevertPolicy = FAST_POLICY, roles: Sequence[str] | None = None,
                            start: bool = True) -> AsyncIterator[Stack]:
    stack = Stack(fleet, temporal_address, root, task_queue=f"revert-{unique}", policy=policy)
    stack.producer = AsyncProducer(fleet.kafka_bootstrap, client_id=f"test-gateway-{unique}")
    stack.client = await connect(temporal_address)
    try:
        if start:
            await stack.start_coordinator(roles)
        yield stack
    finally:
        await stack.stop()


HISTORIES = Path(__file__).resolve().parent / "histories"


async def record_history(stack: Stack, run_id: str, name: str) -> None:
    """With KINSHASA_RECORD_HISTORIES=1, store the newest `revert:<run_id>` history for the replay test."""
    if os.environ.get("KINSHASA_RECORD_HISTORIES") != "1":
        return
    history = await stack.client.get_workflow_handle(revert_workflow_id(run_id)).fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(history.to_json())


def read_topics(bootstrap: str, topics: Sequence[str], run_id: str, *,
                until: Callable[[list[Envelope]], bool], within: float = 30.0) -> list[Envelope]:
    """Envelopes of one run on `topics`, read from the start, until `until(seen)` holds (or the deadline)."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe(list(topics))
    seen: list[Envelope] = []
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None:
                    env = Envelope.from_bytes(msg.value() or b"")
                    if env.run_id == run_id:
                        seen.append(env)
            if until(seen):
                return seen
        raise TimeoutError(f"read {len(seen)} messages of run {run_id} from {list(topics)} without the "
                           f"expected ones in {within}s")
    finally:
        consumer.close()


def compare(before: dict[str, dict[str, dict[str, Any]]], after: dict[str, dict[str, dict[str, Any]]],
            ) -> list[str]:
    """Differences between two snapshots: pre-existing entities must be equal field by field, entities
    created since must be in their service's removed state."""
    problems = []
    for service, entities in after.items():
        for entity_id, state in entities.items():
            old = before[service].get(entity_id)
            if old is None:
                if not REMOVED[service](state):
                    problems.append(f"{service} {entity_id} was created by the run and is still there: "
                                    f"{state}")
            elif old != state:
                diff = {k: (old.get(k), state.get(k)) for k in set(old) | set(state)
                        if old.get(k) != state.get(k)}
                problems.append(f"{service} {entity_id} differs from before the run: {diff}")
        for entity_id in before[service]:
            if entity_id not in entities:
                problems.append(f"{service} {entity_id} existed before the run and is gone")
    return problems


class WorkerProcess:
    """A worker-only coordinator in a child process (`kinshasa coordinator --role worker --role relay`),
    so a test can SIGKILL it mid-revert."""

    def __init__(self, stack: Stack, log_path: Path) -> None:
        self.stack = stack
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ,
               "KINSHASA_LOG_LEVEL": "WARNING",
               "KINSHASA_KAFKA_BOOTSTRAP": self.stack.kafka_bootstrap,
               "KINSHASA_TEMPORAL_ADDRESS": self.stack.temporal_address,
               "KINSHASA_DATA_DIR": str(self.stack.root),
               "KINSHASA_COORDINATOR_DATABASE_URL": self.stack.coordinator_url,
               "KINSHASA_COORDINATOR_TASK_QUEUE": self.stack.task_queue,
               "KINSHASA_COORDINATOR_ADMIN_PORT": "0"}
        policy = self.stack.policy.model_dump_json()
        argv = [sys.executable, "-m", "kinshasa.coordinator", "--role", "worker", "--role", "relay",
                "--topic-suffix", self.stack.fleet.suffix, "--policy-json", policy]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
