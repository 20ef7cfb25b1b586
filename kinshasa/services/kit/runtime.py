"""One service process: consumer, inbox, DLQ guard, outbox relay and HTTP read/admin API, started and stopped.

`ServiceRuntime(service, stack=..., settings=...).run(stop)` is the whole process. It checks the service's
topics (it refuses to start on one that is missing or below the stack's minimums: `kinshasa topics
ensure` creates them), installs the tables and triggers, then runs side by side:

* the consumer of `kinshasa.commands.<service>` (group `kinshasa.svc.<service>`), each record going
  through the DLQ guard into `CommandDispatcher.handle` (one transaction: inbox, domain, outbox);
* the outbox relay publishing `kinshasa.events.<service>`, woken by every commit;
* uvicorn serving the read API and the kernel admin endpoints (/healthz, /admin/dlq, /metrics);
* the housekeeper pruning published outbox rows once they are old enough.

Each runs as a role of the kernel's `Supervisor`: one that dies is restarted with capped backoff and
`/healthz` answers 503 naming it until it runs again; the HTTP server is never restarted, and a role that
keeps dying makes the supervisor give up: the process then stops and `run` raises (exit non-zero).

Setting `stop` (SIGTERM/SIGINT in `serve_forever`) lets the in-flight message finish and commit, stops
consuming, drains the outbox to Kafka, then closes the producer and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

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
from kinshasa.kernel.dlq import DeadLetterPolicy
from kinshasa.kernel.housekeeping import Housekeeper, housekeeping_policy
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import OutboxStatus
from kinshasa.kernel.relay import OutboxRelay
from kinshasa.kernel.supervisor import NEVER_RESTART, RestartPolicy, Supervisor
from kinshasa.services.kit.declarations import Service
from kinshasa.services.kit.dispatcher import CommandDispatcher
from kinshasa.services.kit.install import install_service
from kinshasa.services.kit.readapi import mount_reads
from kinshasa.settings import ServiceSettings, StackSettings
from kinshasa.topics.catalogue import (
    CATALOGUE,
    TopicSpec,
    catalogue,
    commands_topic,
    dlq_topic,
    events_topic,
    group_id,
)
from kinshasa.topics.consumer import SESSION_TIMEOUT_MS, AsyncConsumer, BatchHandler, Handler, Record
from kinshasa.topics.declaration_feed import publish_declaration
from kinshasa.topics.producer import AsyncProducer

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
# The process's roles, each a check of /healthz; the supervisor restarts all but the HTTP server.
ROLES = ("http", "relay", "consumer", "lag", "housekeeping")
# How long a stop waits for the consumer to finish the batch in hand before cancelling it.
CONSUMER_STOP_S = 60.0


@dataclass(frozen=True)
class ServiceTopics:
    """The topics and consumer group one service process uses."""

    commands: str
    events: str
    group: str
    declarations: str = CATALOGUE

    @classmethod
    def for_service(cls, name: str, suffix: str | None = None) -> ServiceTopics:
        """The catalogue's names; `suffix` gives an isolated copy (`kinshasa.commands.documents.<suffix>`,
        group `kinshasa.svc.documents.<suffix>`) for tests or a side-by-side stack on one broker."""
        if not suffix:
            return cls(commands_topic(name), events_topic(name), group_id(name))
        return cls(f"{commands_topic(name)}.{suffix}", f"{events_topic(name)}.{suffix}",
                   group_id(name, suffix), f"{CATALOGUE}.{suffix}")

    @property
    def dlq(self) -> str:
        return dlq_topic(self.group)

    def specs(self, service: str) -> list[TopicSpec]:
        """The catalogue's specs for this service's topics, renamed when a suffix is in use."""
        canonical = ServiceTopics.for_service(service)
        renames = {canonical.commands: self.commands, canonical.events: self.events, canonical.dlq: self.dlq,
                   CATALOGUE: self.declarations}
        return [replace(spec, name=renames[spec.name])
                for spec in catalogue([service], groups=[canonical.group]) if spec.name in renames]


@dataclass(frozen=True)
class RuntimeOptions:
    """Knobs of the process that are not per-deployment settings."""

    # Publish the service's declaration on kinshasa.catalogue at start (tests of isolated copies may not).
    publish_declaration: bool = True
    # Static group membership: a restarted process with the same instance id gets its partitions back
    # at once instead of waiting for the old member's session to expire. One id per running replica.
    instance_id: str | None = None
    dlq_policy: DeadLetterPolicy = field(default_factory=DeadLetterPolicy)
    # Rows per relay claim; None: the relay's default for the database (`kinshasa.kernel.relay.RELAY_BATCH`).
    relay_batch_size: int | None = None
    relay_max_attempts: int = 10
    # Records per fetch; each fetched batch is one transaction (see batch_record_handler).
    consumer_batch_size: int = 100
    # How a role that died is restarted (the HTTP server never is).
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)


def record_handler(dispatcher: CommandDispatcher) -> Handler:
    """The consumer's handler: parse the record, then dispatch it in a transaction of its own.

    Every log line written while the command is handled carries its run id, actor and message id
    (the dispatcher sets that context).
    """

    async def on_record(record: Record) -> None:
        # InvalidMessage: the DLQ guard dead-letters it at once.
        await dispatcher.handle(record.envelope())

    return on_record


def batch_record_handler(dispatcher: CommandDispatcher, metrics: ComponentMetrics) -> BatchHandler:
    """The consumer's batch handler: every record of a fetched batch in one transaction.

    Any record that does not parse, any poison command or infrastructure error raises before the
    commit, so nothing of the batch is kept and the consumer hands the records one by one to the
    guarded per-record handler, which dead-letters only the bad one.
    """

    async def on_batch(records: list[Record]) -> None:
        envelopes = [record.envelope() for record in records]
        started = time.perf_counter()
        outcomes = await dispatcher.handle_batch(envelopes)
        share = (time.perf_counter() - started) / len(records)
        for envelope, _outcome in zip(envelopes, outcomes, strict=True):
            metrics.observe_handler(envelope.type, share, "ok")

    return on_batch


class ServiceRuntime:
    """Everything one service process runs; `run(stop)` returns once the process has shut down cleanly."""

    def __init__(self, service: Service, *, stack: StackSettings, settings: ServiceSettings,
                 topics: ServiceTopics | None = None, options: RuntimeOptions | None = None,
                 token: str | None = None) -> None:
        service.verify()  # a service with an undeclared or irreversible operation never starts
        self.service = service
        self.stack = stack
        self.settings = settings
        self.topics = topics or ServiceTopics.for_service(service.name)
        self.options = options or RuntimeOptions()
        self.token = token
        self.metrics = ComponentMetrics(service.name)
        self.admin_url: str | None = None
        self.ready = asyncio.Event()
        # Runs the process's roles (ROLES); built by each `run`.
        self.supervisor = Supervisor(service.name)
        self._consumer: AsyncConsumer | None = None

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url(self.stack, self.service.name)

    async def run(self, stop: asyncio.Event) -> None:
        engine = create_engine(self.database_url)
        try:
            await verify_topics(self.service.name, self.stack, self.topics.specs(self.service.name))
            await install_service(engine, self.service)
            await self._run_with(engine, stop)
        finally:
            await engine.dispose()

    async def _run_with(self, engine: AsyncEngine, stop: asyncio.Event) -> None:
        name, topics, opts = self.service.name, self.topics, self.options
        producer = AsyncProducer(self.stack.kafka_bootstrap, client_id=f"kinshasa-svc-{name}")
        relay = OutboxRelay(engine, producer, batch_size=opts.relay_batch_size,
                            max_attempts=opts.relay_max_attempts,
                            on_publish_failure=self.metrics.publish_failed)
        dispatcher = CommandDispatcher(self.service, engine, group=topics.group, events_topic=topics.events,
                                       settings=self.settings, on_commit=relay.wake)
        dead_letters = wire_dead_letters(name, engine, record_handler(dispatcher), producer=producer,
                                         group=topics.group, policy=opts.dlq_policy, metrics=self.metrics)

        extra: dict[str, Any] = {"session.timeout.ms": SESSION_TIMEOUT_MS}
        if opts.instance_id:
            extra["group.instance.id"] = opts.instance_id
        batch = batch_record_handler(dispatcher, self.metrics)
        housekeeper = Housekeeper(engine, housekeeping_policy(self.settings))
        supervisor = self.supervisor = Supervisor(name)
        self.metrics.watch_roles(lambda: self.supervisor.health())
        token = load_or_create_internal_token(self.stack.data_dir, self.token,
                                              self.stack.internal_token_file)
        app = admin_app(name, token=token, dlq_api=dead_letters.queue, metrics=self.metrics,
                        outbox=OutboxStatus(engine),
                        health_checks={"database": database_check(engine),
                                       **supervisor.health_checks(ROLES)})
        mount_reads(app, self.service, engine)
        server = http_server(app, self.settings.admin_host, self.settings.admin_port)

        async def serve_http(role_stop: asyncio.Event) -> None:
            serving = asyncio.create_task(server.serve(), name=f"{name}-uvicorn")
            stopping = asyncio.create_task(role_stop.wait())
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            server.should_exit = True
            await serving

        async def consume(role_stop: asyncio.Event) -> None:
            # A consumer runs once: each (re)start joins the group with a new one; the message in hand
            # finishes and its offset is committed before the consumer leaves (its handler is never
            # cancelled by a stop request).
            consumer = self._consumer = AsyncConsumer(self.stack.kafka_bootstrap, topics.group,
                                                      [topics.commands], extra_config=extra,
                                                      batch_size=opts.consumer_batch_size)
            await consumer.run(dead_letters.guarded, role_stop, batch)

        async def run_relay(role_stop: asyncio.Event) -> None:
            await relay.run(role_stop)

        policy = opts.restart_policy
        failure: BaseException | None = None
        try:
            # The server is not restarted: a server that stopped serving is a process to replace.
            supervisor.add("http", serve_http, NEVER_RESTART)
            first = supervisor.attempt("http")
            assert first is not None
            await self._wait_started(server, first)
            if opts.publish_declaration:
                # Before the first command is consumed: the gateway and the conformance kit learn the
                # service from this, and it must name the read API that just started.
                url = self.settings.advertised_url or self.admin_url
                await publish_declaration(producer, self.service.declaration(read_url=url, admin_url=url),
                                          topics.declarations)
            supervisor.add("relay", run_relay, policy)
            supervisor.add("consumer", consume, policy)
            supervisor.add("lag", self._watch_lag, policy)
            supervisor.add("housekeeping", housekeeper.run, policy)
            log.info("service %s ready: consuming %s as %s, publishing %s, HTTP on %s", name, topics.commands,
                     topics.group, topics.events, self.admin_url)
            self.ready.set()
            # Whichever comes first: a stop request, or a role the supervisor gave up on (then the
            # process must stop too, and exit non-zero).
            failure = await supervisor.wait(stop)
            if failure is not None:
                log.error("%s; shutting the service down", failure)
        finally:
            stop.set()
            # In this order: the consumer finishes the message in hand and commits, the relay publishes
            # what that committed, then the chores and the server end.
            await supervisor.stop(["consumer"], timeout_s=CONSUMER_STOP_S)
            await supervisor.stop(["relay"])
            if "relay" in supervisor.names:
                await drain_outbox(relay)
            await supervisor.stop()
            await producer.close()
            log.info("service %s stopped", name)
        if failure is not None:
            raise RuntimeError(f"service {name} stopped after a failure: {failure!r}") from failure

    async def _wait_started(self, server: QuietServer, task: asyncio.Task[Any]) -> None:
        name, settings = self.service.name, self.settings
        host, port = await wait_started(server, task, (
            f"the HTTP server of {name} did not start on {settings.admin_host}:{settings.admin_port}: is "
            f"the port taken? set KINSHASA_SVC_{name.upper()}_ADMIN_PORT to a free port (0 picks one)"))
        self.admin_url = f"http://{host}:{port}"
        write_address_file(self.stack.data_dir, f"svc-{name}",
                           {"service": name, "url": self.admin_url, "port": port})

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LAG_INTERVAL_S)
            if stop.is_set():
                return
            consumer = self._consumer  # the one the consumer role runs now
            if consumer is None:
                continue
            try:
                lags = await consumer.lag()
            except Exception as exc:  # lag is a metric: never let it take the process down
                log.debug("could not read consumer lag: %s", exc)
                continue
            for (topic, partition), lag in lags.items():
                self.metrics.set_consumer_lag(self.topics.group, topic, partition, lag)


async def serve_forever(runtime: ServiceRuntime) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (the in-flight message finishes first)."""
    tracing.setup(runtime.service.name)
    await serve_until_signalled(runtime.run, runtime.ready)
