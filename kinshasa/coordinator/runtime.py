"""The coordinator process: ledger projector, Temporal worker, HTTP API and outbox relay, started and stopped.

`CoordinatorRuntime(stack=..., settings=..., options=...).run(stop)` is the whole process. It checks its
topics (it refuses to start on one that is missing or below the stack's minimums: `kinshasa topics
ensure` creates them), installs its tables, then runs side by side (each role can be switched off, e.g. a
worker-only process):

* the projector: a consumer of every `kinshasa.events.*` topic and `kinshasa.runs` (DLQ-guarded) that
  folds events into the ledger and starts or joins `RevertRun` on `revert_requested` (the gateway's
  doorbell is the only way a revert starts);
* the revert sweeper, beside the projector: retries every recorded `revert_requested` whose start failed
  (Temporal unreachable) until it succeeds, so the projector never waits on Temporal;
* the Temporal worker running `RevertRun` and its activities;
* uvicorn serving the ledger API and the kernel admin endpoints (/healthz, /admin/dlq, /metrics);
* the outbox relay publishing compensate commands, run outcomes and alerts, woken by every commit.

Each runs as a role of the kernel's `Supervisor`: one that dies is restarted with capped backoff and
`/healthz` answers 503 naming it until it runs again; the API server is never restarted, and a role that
keeps dying makes the supervisor give up: the process then stops and `run` raises (exit non-zero).

Setting `stop` ends the consumer after its in-flight record, lets the worker finish or hand back its
activities (Temporal retries them elsewhere: their state is in the ledger), drains the outbox, then
closes the producer and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from kinshasa.coordinator.activities import RevertActivities
from kinshasa.coordinator.api import install_error_handlers, ledger_router
from kinshasa.coordinator.handlers import LedgerHandler
from kinshasa.coordinator.models import RevertPolicy, RevertRequest
from kinshasa.coordinator.projector import RevertTrigger
from kinshasa.coordinator.receipt_sources import ledger_sources
from kinshasa.coordinator.revert_metrics import CoordinatorMetrics
from kinshasa.coordinator.run_ledger import Ledger
from kinshasa.coordinator.starter import start_revert
from kinshasa.coordinator.store import install_ledger
from kinshasa.coordinator.sweeper import RevertSweeper
from kinshasa.coordinator.topic_names import CoordinatorTopics
from kinshasa.coordinator.worker import build_worker, connect
from kinshasa.kernel import tracing
from kinshasa.kernel.admin_api import admin_app, load_or_create_internal_token
from kinshasa.kernel.component import (
    QuietServer,
    database_check,
    drain_outbox,
    http_server,
    serve_until_signalled,
    verify_topics,
    wait_started,
    wire_dead_letters,
    write_address_file,
)
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.dlq import DeadLetterPolicy, DeadLetterQueue
from kinshasa.kernel.housekeeping import Housekeeper, housekeeping_policy
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import OutboxStatus
from kinshasa.kernel.receipts import ChainVerifier, open_chain
from kinshasa.kernel.relay import OutboxRelay
from kinshasa.kernel.supervisor import NEVER_RESTART, RestartPolicy, Supervisor
from kinshasa.migrations.install import install_kernel_tables
from kinshasa.settings import CoordinatorSettings, StackSettings
from kinshasa.topics.consumer import SESSION_TIMEOUT_MS, AsyncConsumer
from kinshasa.topics.producer import AsyncProducer

log = logging.getLogger(__name__)

COMPONENT = "coordinator"
ROLES = ("projector", "worker", "api", "relay")
# How long a stop waits for the projector to finish the batch in hand before cancelling it.
PROJECTOR_STOP_S = 60.0


@dataclass(frozen=True)
class CoordinatorOptions:
    """Knobs of the process that are not per-deployment settings."""

    roles: tuple[str, ...] = ROLES
    topic_suffix: str | None = None
    policy: RevertPolicy = field(default_factory=RevertPolicy)
    dlq_policy: DeadLetterPolicy = field(default_factory=DeadLetterPolicy)
    max_concurrent_activities: int = 100
    consumer_batch_size: int = 500
    # Rows per relay claim; None: the relay's default for the database (`kinshasa.kernel.relay.RELAY_BATCH`).
    relay_batch_size: int | None = None
    # Consumer group of the projector; None is the catalogue's (a test gives each ledger its own).
    consumer_group: str | None = None
    # Seconds the worker waits for running activities on shutdown before cancelling them.
    worker_shutdown_s: float = 10.0
    # How a role that died is restarted (the API server never is).
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # How often the sweeper retries revert triggers whose start failed, and its longest per-trigger backoff.
    sweep_interval_s: float = 2.0
    sweep_max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        unknown = set(self.roles) - set(ROLES)
        if unknown or not self.roles:
            raise ValueError(f"unknown coordinator role(s) {sorted(unknown)}: choose from {', '.join(ROLES)}")
        if self.sweep_interval_s <= 0 or self.sweep_max_backoff_s < self.sweep_interval_s:
            raise ValueError(f"sweep interval {self.sweep_interval_s}s: give a positive number of seconds, "
                             f"no more than the max backoff ({self.sweep_max_backoff_s}s)")


class CoordinatorRuntime:
    """Everything the coordinator process runs; `run(stop)` returns once it has shut down cleanly."""

    def __init__(self, *, stack: StackSettings, settings: CoordinatorSettings,
                 options: CoordinatorOptions | None = None, token: str | None = None) -> None:
        self.stack = stack
        self.settings = settings
        self.options = options or CoordinatorOptions()
        self.topics = CoordinatorTopics(suffix=self.options.topic_suffix)
        self.token = token
        self.metrics = ComponentMetrics(COMPONENT)
        # Reverts by status and compensations by outcome, read from the ledger.
        self.domain_metrics = CoordinatorMetrics(self.metrics, ttl_s=settings.metrics_cache_s)
        self.api_url: str | None = None
        self.ready = asyncio.Event()
        self.relay: OutboxRelay | None = None
        self.sweeper: RevertSweeper | None = None
        # Runs the process's roles; built by each `run`.
        self.supervisor = Supervisor(COMPONENT)

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url(self.stack, COMPONENT)

    def has(self, role: str) -> bool:
        return role in self.options.roles

    async def run(self, stop: asyncio.Event) -> None:
        engine = create_engine(self.database_url)
        try:
            await verify_topics(COMPONENT, self.stack, self.topics.specs())
            await install_kernel_tables(engine)
            await open_chain(engine, COMPONENT)
            await install_ledger(engine)
            await self._run_with(engine, stop)
        finally:
            await engine.dispose()

    async def _run_with(self, engine: AsyncEngine, stop: asyncio.Event) -> None:
        opts, topics = self.options, self.topics
        producer = AsyncProducer(self.stack.kafka_bootstrap, client_id="kinshasa-coordinator")
        relay = OutboxRelay(engine, producer, batch_size=opts.relay_batch_size,
                            on_publish_failure=self.metrics.publish_failed)
        self.relay = relay
        client: Client | None = None
        if self.has("worker") or self.has("projector") or self.has("api"):
            client = await connect(self.stack.temporal_address, self.stack.temporal_namespace)
        queue = self.settings.task_queue
        ledger = Ledger(engine)
        activities = RevertActivities(engine, ledger=ledger, topics=topics, on_emit=relay.wake)

        async def start(trigger: RevertTrigger) -> None:
            assert client is not None
            # The workflow (through the client's tracing interceptor) joins the revert request's trace.
            with tracing.span("start revert", parent=trigger.traceparent,
                              attributes={"kinshasa.run_id": trigger.run_id}):
                await start_revert(client, queue, RevertRequest(
                    run_id=trigger.run_id, reason=trigger.reason, requested_by=trigger.requested_by,
                    published_count=trigger.published_count, request_id=trigger.message_id), opts.policy)

        sweeper = RevertSweeper(engine, start, interval_s=opts.sweep_interval_s,
                                max_backoff_s=opts.sweep_max_backoff_s) \
            if client is not None and self.has("projector") else None
        self.sweeper = sweeper
        handler = LedgerHandler(engine, sweeper)
        dead_letters = wire_dead_letters(COMPONENT, engine, handler, producer=producer, group=topics.group,
                                         policy=opts.dlq_policy, metrics=self.metrics)
        dlq, guarded = dead_letters.queue, dead_letters.guarded
        supervisor = self.supervisor = Supervisor(COMPONENT)
        self.metrics.watch_roles(lambda: self.supervisor.health())
        self.domain_metrics.read_from(engine)
        roles = [role for role in ("api", "relay", "worker", "projector") if self.has(role)]
        if self.has("relay"):
            roles.append("housekeeping")
        if sweeper is not None:
            roles.append("sweeper")
        checks = {"database": database_check(engine), **supervisor.health_checks(roles)}
        token = load_or_create_internal_token(self.stack.data_dir, self.token,
                                              self.stack.internal_token_file)
        server: QuietServer | None = None
        if self.has("api"):
            app = self._app(ledger, client, token, dlq, checks, OutboxStatus(engine))
            server = http_server(app, self.settings.admin_host, self.settings.admin_port)
        group = opts.consumer_group or topics.group
        policy = opts.restart_policy

        async def serve_api(role_stop: asyncio.Event) -> None:
            assert server is not None
            serving = asyncio.create_task(server.serve(), name="coordinator-uvicorn")
            stopping = asyncio.create_task(role_stop.wait())
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            server.should_exit = True
            await serving

        async def run_worker(role_stop: asyncio.Event) -> None:
            # A worker runs once: each (re)start polls with a new one. On stop it finishes or hands back
            # its activities (Temporal retries them elsewhere: their state is in the ledger).
            assert client is not None
            worker = build_worker(client, queue, activities,
                                  max_concurrent_activities=opts.max_concurrent_activities,
                                  graceful_shutdown_timeout=timedelta(seconds=opts.worker_shutdown_s))
            running = asyncio.create_task(worker.run(), name="coordinator-temporal-worker")
            stopping = asyncio.create_task(role_stop.wait())
            await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not running.done():
                with contextlib.suppress(Exception):
                    await worker.shutdown()
            await running

        async def project(role_stop: asyncio.Event) -> None:
            # Whole fetched batches in one ledger transaction; a batch that fails goes record by record
            # through the DLQ guard, so one poison event is dead-lettered instead of blocking the ledger.
            # A consumer runs once: each (re)start joins the group with a new one.
            consumer = AsyncConsumer(self.stack.kafka_bootstrap, group, topics.consumed(),
                                     extra_config={"session.timeout.ms": SESSION_TIMEOUT_MS,
                                                   # the events pattern finds a new service's topic this soon
                                                   "topic.metadata.refresh.interval.ms": 2_000},
                                     batch_size=opts.consumer_batch_size)
            await consumer.run(guarded, role_stop, handler.handle_batch)

        async def run_relay(role_stop: asyncio.Event) -> None:
            await relay.run(role_stop)

        failure: BaseException | None = None
        try:
            if server is not None:
                # Not restarted: a server that stopped serving is a process to replace.
                supervisor.add("api", serve_api, NEVER_RESTART)
                first = supervisor.attempt("api")
                assert first is not None
                await self._wait_started(server, first)
            if self.has("relay"):
                supervisor.add("relay", run_relay, policy)
                # The relay's process owns the outbox, so it also prunes what was published long ago.
                supervisor.add("housekeeping", Housekeeper(engine, housekeeping_policy(self.settings)).run,
                               policy)
            if self.has("worker") and client is not None:
                supervisor.add("worker", run_worker, policy)
            if self.has("projector"):
                supervisor.add("projector", project, policy)
            if sweeper is not None:
                supervisor.add("sweeper", sweeper.run, policy)
            log.info("coordinator ready: roles %s, task queue %s, consuming %s as %s, API on %s",
                     ",".join(opts.roles), queue, ", ".join(topics.consumed()), group, self.api_url)
            self.ready.set()
            # Whichever comes first: a stop request, or a role the supervisor gave up on.
            failure = await supervisor.wait(stop)
            if failure is not None:
                log.error("%s; shutting the coordinator down", failure)
        finally:
            stop.set()
            # In this order: the projector finishes its record and the sweeper its sweep, the worker
            # finishes or hands back its activities, the relay publishes what they committed, then the
            # API ends.
            await supervisor.stop(["projector", "sweeper"], timeout_s=PROJECTOR_STOP_S)
            await supervisor.stop(["worker"], timeout_s=opts.worker_shutdown_s + 5)
            await supervisor.stop(["housekeeping", "relay"])
            if "relay" in supervisor.names:
                await drain_outbox(relay)
            await supervisor.stop()
            await producer.close()
            await ledger.close()
            log.info("coordinator stopped")
        if failure is not None:
            raise RuntimeError(f"coordinator stopped after a failure: {failure!r}") from failure

    def _app(self, ledger: Ledger, client: Client | None, token: str, dlq: DeadLetterQueue,
             checks: dict[str, Any], outbox: OutboxStatus) -> FastAPI:
        app = FastAPI(title="kinshasa coordinator", docs_url=None, redoc_url=None, openapi_url=None)
        install_error_handlers(app)
        app.include_router(ledger_router(ledger, client=client))
        # The kernel's admin endpoints (/healthz, /admin/dlq, /metrics) answer what the ledger API does not.
        app.mount("/", admin_app(COMPONENT, token=token, dlq_api=dlq, metrics=self.metrics,
                                 health_checks=checks, outbox=outbox,
                                 receipts=ChainVerifier(outbox.engine, COMPONENT, ledger_sources)))
        return app

    async def _wait_started(self, server: QuietServer, task: asyncio.Task[Any]) -> None:
        settings = self.settings
        host, port = await wait_started(server, task, (
            f"the coordinator's HTTP server did not start on {settings.admin_host}:{settings.admin_port}: is "
            "the port taken? set KINSHASA_COORDINATOR_ADMIN_PORT to a free port (0 picks one)"))
        self.api_url = f"http://{host}:{port}"
        write_address_file(self.stack.data_dir, "coordinator",
                           {"component": COMPONENT, "url": self.api_url, "port": port})


async def serve_forever(runtime: CoordinatorRuntime) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    tracing.setup(COMPONENT)
    await serve_until_signalled(runtime.run, runtime.ready)
