"""The gateway process: bootstrap wires database, schema, background tasks; `create_app` serves /graphql."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cross_web import HTTPException
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types.unset import UNSET, UnsetType

from kinshasa.gateway import idempotency
from kinshasa.gateway.alerts import WebhookSender
from kinshasa.gateway.commands import CommandWriter
from kinshasa.gateway.context import GatewayContext, Services
from kinshasa.gateway.domain_metrics import GatewayMetrics
from kinshasa.gateway.durability import gateway_watcher
from kinshasa.gateway.fairness import fairness_from
from kinshasa.gateway.graphql import build_schema, operator_mutation_names
from kinshasa.gateway.hardening import RequestGuard, document_cache, schema_extensions
from kinshasa.gateway.listener import GROUP, Listener, listened_topics
from kinshasa.gateway.live import AlertFeed
from kinshasa.gateway.loaders import DatabaseReads, Pacer
from kinshasa.gateway.policy import PolicyBook
from kinshasa.gateway.principals import Principal, PrincipalRegistry, load_registry
from kinshasa.gateway.readers import ReaderDoor, ReadPool, serve_graphql, trusted_principal
from kinshasa.gateway.reads import Backends
from kinshasa.gateway.receipts_view import gateway_sources
from kinshasa.gateway.releaser import Releaser
from kinshasa.gateway.service_book import ServiceBook
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.gateway.store import install_gateway_tables
from kinshasa.kernel import tracing
from kinshasa.kernel.admin_api import admin_app, load_or_create_internal_token
from kinshasa.kernel.component import database_check, drain_outbox, freeze_startup_heap, verify_topics
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.dlq import DeadLetterQueue, OutboxDeadLetters, SqlDeadLetterStore, guarded_handler
from kinshasa.kernel.housekeeping import Housekeeper, housekeeping_policy
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import OutboxStatus
from kinshasa.kernel.receipts import ChainVerifier, open_chain
from kinshasa.kernel.relay import OutboxRelay
from kinshasa.kernel.supervisor import GaveUp, RestartPolicy, Supervisor
from kinshasa.mcp.http import McpEndpoint, McpRoute, bearer_key
from kinshasa.mcp.settings import McpSettings
from kinshasa.schemas.operations import OperationCatalogue
from kinshasa.settings import StackSettings
from kinshasa.topics.catalogue import ALERTS, RUNS, TopicSpec, catalogue_topic_spec, dlq_topic
from kinshasa.topics.catalogue import catalogue as topic_catalogue
from kinshasa.topics.consumer import SESSION_TIMEOUT_MS, AsyncConsumer
from kinshasa.topics.declaration_feed import DeclarationFollower
from kinshasa.topics.producer import AsyncProducer

log = logging.getLogger(__name__)
COMPONENT = "gateway"
CONSOLE_DIR = Path(__file__).with_name("console")
# Subscriptions (and operations) one graphql-transport-ws connection may have running at once; past it the
# gateway answers the new one with an error and keeps the others.
MAX_SUBSCRIPTIONS_PER_CONNECTION = 64
# How soon the listener's pattern subscription notices a new service's events topic.
METADATA_REFRESH_MS = 2_000


class Gateway:
    """One gateway process: its wiring (`services`), its HTTP app, and its background tasks."""

    def __init__(
        self,
        settings: GatewayConfig,
        stack: StackSettings,
        registry: PrincipalRegistry | None = None,
        restart_policy: RestartPolicy | None = None,
        reader_secret: str | None = None,
    ) -> None:
        """`reader_secret`: this process is a reader, running costly reads for the gateway that started it
        and gave it that secret (kinshasa/gateway/readers.py), not a gateway agents call."""
        # A reader never has readers of its own.
        self.settings = settings if reader_secret is None else settings.model_copy(update={"readers": 0})
        self.reader_secret = reader_secret
        # How every background task is restarted when it dies (the kernel's default unless a test
        # wants a supervisor that gives up sooner).
        self.restart_policy = restart_policy or RestartPolicy()
        self.stack = stack
        self.engine = create_engine(settings.resolved_database_url(stack, COMPONENT))
        self.registry = (
            registry
            if registry is not None
            else load_registry(settings.credentials_file, stack.data_dir, settings.dev_mode)
        )
        self.internal_token = load_or_create_internal_token(
            stack.data_dir, settings.internal_token, stack.internal_token_file
        )
        self.metrics = ComponentMetrics(COMPONENT)
        # Trips, incidents, held and awaiting-approval commands (read from the database), budget refusals.
        self.domain_metrics = GatewayMetrics(self.metrics, self.engine, ttl_s=settings.metrics_cache_s)
        self.policies = PolicyBook()
        self.webhook = WebhookSender(
            self.engine,
            settings.alert_webhook_url,
            settings.webhook_attempts,
            settings.webhook_backoff_s,
            settings.http_timeout_s,
        )
        self.relay: OutboxRelay | None = None
        self.producer: AsyncProducer | None = None
        self.listener = Listener(self.engine, self.policies, self.webhook, self._wake)
        self.dlq = DeadLetterQueue(
            COMPONENT,
            SqlDeadLetterStore(self.engine),
            handlers={GROUP: self.listener.handle},
            metrics=self.metrics,
            outbox=OutboxDeadLetters(self.engine),
        )
        self.book = ServiceBook(self.engine, reserved_mutations=operator_mutation_names(),
                                on_change=self._catalogue_changed, on_alert=self._alerted,
                                webhook=settings.alert_webhook_url is not None, records=reader_secret is None)
        self.follower: DeclarationFollower | None = None
        self.backends = Backends(
            self.book,
            settings.service_urls,
            settings.coordinator_url,
            settings.admin_urls,
            self.internal_token,
            settings.http_timeout_s,
        )
        self.services = Services(
            settings=settings,
            engine=self.engine,
            book=self.book,
            registry=self.registry,
            policies=self.policies,
            writer=CommandWriter(self.engine, self.policies, self.webhook, self._wake,
                                 on_refusal=self.domain_metrics.refused),
            webhook=self.webhook,
            backends=self.backends,
            local_dlq=self.dlq,
            wake_relay=self._wake,
            database=DatabaseReads(self.engine, settings.database_reads),
            pacer=Pacer(),
            alert_feed=AlertFeed(DatabaseReads(self.engine, 1).connect),
            budget_refused=self.domain_metrics.refused,
        )
        # Its own read connection (one at a time), so its polls never take a request's.
        self.durability = gateway_watcher(settings, self.engine, self.backends,
                                          DatabaseReads(self.engine, 1).connect, self.dlq, self.webhook,
                                          self._wake)
        # Rate and in-flight counts per principal, and the parse, validation and cost caches, kept across
        # schema rebuilds. A reader charges nothing: its gateway admitted each request it is sent.
        self.fairness = fairness_from(settings)
        self.query_cache = document_cache(settings)
        self.schema: Any = None
        self.graphql_app: Any = None
        # Every background task runs as a role of this supervisor; /healthz asks it about each.
        self.supervisor = Supervisor(COMPONENT, on_give_up=self._gave_up)
        self.metrics.watch_roles(self.supervisor.health)
        # Called when a role is not restarted any more; the process must then exit non-zero.
        self.on_give_up: Callable[[GaveUp], None] | None = None
        self._catalogue_changed(self.book.catalogue)
        # Where costly reads run: in readers (started at the first one), unless this is a reader.
        self.reads = ReadPool(self, on_offload=self.domain_metrics.offloaded)
        self.app = create_app(self)

    @property
    def is_reader(self) -> bool:
        return self.reader_secret is not None

    def authenticate(self, key: str) -> Principal | None:
        return self.registry.authenticate(key)

    @property
    def catalogue(self) -> OperationCatalogue:
        return self.book.catalogue

    def _catalogue_changed(self, catalogue: OperationCatalogue) -> None:
        """Build the schema for the new catalogue and serve it from the next request on.

        A request already running keeps the app (schema, parser and validation caches) it started with:
        `GraphQLSwitch` reads `graphql_app` once per request.
        """
        self.schema = build_schema(
            catalogue, dev_mode=self.settings.dev_mode,
            extensions=schema_extensions(self.settings, None if self.is_reader else self.fairness,
                                         self.query_cache),
            declarations=self.book.declarations,
        )
        self.graphql_app = graphql_app(self, self.schema)
        log.info("GraphQL schema built: %d agent operation(s) from %d service(s)", len(catalogue),
                 len(self.book.declarations))

    def _alerted(self, alert: Any) -> None:
        if self.webhook.url is not None:
            self.webhook.send_later(alert)

    def own_topics(self) -> list[TopicSpec]:
        """The topics the gateway itself needs: run facts, alerts, the catalogue and its DLQ."""
        wanted = {RUNS, ALERTS, dlq_topic(GROUP)}
        specs = [spec for spec in topic_catalogue([], groups=[GROUP]) if spec.name in wanted]
        return [*specs, catalogue_topic_spec(name=self.settings.catalogue_topic)]

    def _wake(self) -> None:
        if self.relay is not None:
            self.relay.wake()

    async def install(self) -> None:
        # One migration of the whole database (kernel and gateway branches); then the receipt chain opens.
        await install_gateway_tables(self.engine)
        await open_chain(self.engine, COMPONENT)

    async def start(self) -> None:
        """Check the gateway's topics (no start on a missing or under-replicated one), create tables, load
        the accepted services and follow the catalogue, start the releaser; with
        `background` also the relay, the outbox housekeeper, the durability watcher and the listener.

        Each runs as a role of `self.supervisor`: one that dies is restarted with backoff and `/healthz`
        names it until it runs again; one that keeps dying makes the supervisor give up, and
        `on_give_up` (the CLI stops uvicorn and exits non-zero) hands the process to its orchestrator.
        """
        if self.is_reader:
            # Its gateway checked the topics and migrated the database; a reader reads the catalogue only.
            await self.book.load()
            await self._follow_catalogue()
            return
        await verify_topics(COMPONENT, self.stack, self.own_topics())
        await self.install()
        await self.book.load()
        await self._follow_catalogue()
        releaser = Releaser(
            self.engine, self.settings.releaser_interval_s, self.settings.releaser_batch, self._wake
        )
        self.supervisor.add("releaser", releaser.run, self.restart_policy)
        if not self.settings.background:
            return
        bootstrap = self.stack.kafka_bootstrap
        self.producer = AsyncProducer(bootstrap, client_id="kinshasa-gateway")
        relay = self.relay = OutboxRelay(self.engine, self.producer,
                                         on_publish_failure=self.metrics.publish_failed)

        async def run_relay(stop: asyncio.Event) -> None:
            await relay.run(stop, idle_sleep_s=0.05)

        self.supervisor.add("relay", run_relay, self.restart_policy)
        housekeeper = Housekeeper(self.engine, housekeeping_policy(self.settings),
                                  also=[lambda now: idempotency.prune(self.engine, now)])
        self.supervisor.add("housekeeping", housekeeper.run, self.restart_policy)
        self.supervisor.add("durability", self.durability.run, self.restart_policy)
        handler = guarded_handler(
            self.listener.handle,
            store=SqlDeadLetterStore(self.engine),
            producer=self.producer,
            group=GROUP,
            metrics=self.metrics,
        )

        async def listen(stop: asyncio.Event) -> None:
            # A consumer runs once: every (re)start joins the group with a new one. A pattern, so the
            # events of a service registered later are heard too (new topics are found at the next
            # metadata refresh).
            consumer = AsyncConsumer(bootstrap, GROUP, listened_topics(),
                                     extra_config={"topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
                                                   "session.timeout.ms": SESSION_TIMEOUT_MS})
            await consumer.run(handler, stop)

        self.supervisor.add("listener", listen, self.restart_policy)

    async def _follow_catalogue(self) -> None:
        """Read every service declaration published so far before serving, then keep following."""
        follower = self.follower = DeclarationFollower(self.stack.kafka_bootstrap, self.book.offer,
                                                       self.settings.catalogue_topic)
        self.supervisor.add("catalogue", follower.run, self.restart_policy)
        first = self.supervisor.attempt("catalogue")
        assert first is not None
        caught_up = asyncio.create_task(follower.caught_up.wait())
        await asyncio.wait([caught_up, first], timeout=self.settings.catalogue_wait_s,
                           return_when=asyncio.FIRST_COMPLETED)
        caught_up.cancel()
        if first.done() and not follower.caught_up.is_set():
            # The follower failed at start: say why, do not serve an empty schema.
            await self.supervisor.stop()
            first.result()
            raise RuntimeError("the catalogue follower ended at start without reading the catalogue")
        if not follower.caught_up.is_set():
            log.warning("the catalogue topic %s was not read to its end within %.0f s: serving the %d "
                        "service(s) accepted so far", self.settings.catalogue_topic,
                        self.settings.catalogue_wait_s, len(self.book.declarations))

    def roles(self) -> list[str]:
        """The names of the roles `start` runs, each a check of /healthz."""
        if self.is_reader:
            return ["catalogue"]
        names = ["catalogue", "releaser"]
        if self.settings.background:
            names += ["relay", "housekeeping", "durability", "listener"]
        return names

    def _gave_up(self, failure: GaveUp) -> None:
        log.critical("gateway stopping: %s", failure)
        if self.on_give_up is not None:
            self.on_give_up(failure)

    async def stop(self) -> None:
        """Stop the roles in the order the outbox needs, as every component does: what commits outbox rows
        (the listener's message in hand, the releaser's batch, the catalogue and durability chores, the
        writes already queued) finishes first, the relay then publishes what they committed, then the
        rest ends."""
        await self.supervisor.stop(["listener", "releaser", "catalogue", "durability"], timeout_s=15)
        await self.services.writer.drain()
        await self.supervisor.stop(["relay"], timeout_s=15)
        if self.relay is not None and "relay" in self.supervisor.names:
            await drain_outbox(self.relay)
        await self.supervisor.stop(timeout_s=15)
        await self.webhook.drain()
        if self.producer is not None:
            await self.producer.close()
            self.producer = None
        await self.reads.close()
        await self.backends.close()
        await self.engine.dispose()

    def context(self, request: HTTPConnection) -> GatewayContext:
        if self.reader_secret is not None:
            # A reader: its gateway authenticated the caller (ReaderDoor checked the secret already).
            principal = trusted_principal(request.headers, self.reader_secret)
            return GatewayContext(self.services, principal, presented_key=principal is not None)
        header = request.headers.get("authorization")
        key = bearer_key(header)
        principal = self.registry.authenticate(key) if key else None
        return GatewayContext(self.services, principal, presented_key=bool(header))


class GatewayGraphQL(GraphQL[GatewayContext, None]):
    """Strawberry's ASGI app on one schema, refusing JSON bodies that are not one object (a batch) or not
    objects at all, and WebSockets (graphql-transport-ws, the subscriptions) of anyone but an operator.

    Plain ASGI, not a FastAPI app with Strawberry's router: routing and dependency solving cost ~0.3 ms of
    CPU per request (measured in process: 490 µs against 170 µs for the same echo), and /graphql needs
    neither. Its plain-text refusals (malformed JSON, a batch, a wrong method) get GraphQL's shape from
    `RequestGuard`, in front of every /graphql request.
    """

    def __init__(self, schema: Any, *, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(schema, **kwargs)
        self.gateway = gateway

    async def get_context(self, request: Request | WebSocket,
                          response: Response | WebSocket) -> GatewayContext:
        # A WebSocket (the subscriptions) gets its context here too; its key comes in connection_init.
        context = self.gateway.context(request)
        context.request = request
        context.response = response if isinstance(response, Response) else None
        return context

    async def on_ws_connect(self, context: GatewayContext) -> UnsetType | dict[str, object] | None:
        """A browser cannot set headers on a WebSocket: the key comes in connection_init's payload,
        `{"authorization": "Bearer <key>"}` (an Authorization header still counts for other clients).
        Anyone but an operator is refused (close code 4403): subscriptions are operator only."""
        params = context.connection_params if isinstance(context.connection_params, dict) else {}
        given = params.get("authorization", params.get("Authorization"))
        if isinstance(given, str):
            key = bearer_key(given)
            context.principal = self.gateway.registry.authenticate(key) if key else None
            context.presented_key = True
        if context.principal is None or not context.principal.is_operator:
            raise ConnectionRejectionError(
                {"message": "subscriptions are for operators: send connection_init with the payload "
                 '{"authorization": "Bearer <operator key>"}'}
            )
        return UNSET

    def parse_json(self, data: str | bytes) -> Any:
        parsed = super().parse_json(data)
        if not isinstance(parsed, dict | list):
            raise HTTPException(
                400, 'the request body must be a JSON object: {"query": "...", "variables": {...}}'
            )
        return parsed


def graphql_app(gateway: Gateway, schema: Any) -> GatewayGraphQL:
    """An app serving /graphql on one schema; the gateway builds a new one when the catalogue changes."""
    return GatewayGraphQL(
        schema,
        gateway=gateway,
        graphql_ide="graphiql" if gateway.settings.dev_mode else None,
        allow_queries_via_get=False,
        multipart_uploads_enabled=False,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        # Each runChanged polls its run's row every half second while it lasts: the inbox follows at most
        # 24 open runs unasked (inbox.js FOLLOW_MAX) beside alertRaised; a connection holds no more than this.
        max_subscriptions_per_connection=MAX_SUBSCRIPTIONS_PER_CONNECTION,
    )


class GraphQLSwitch:
    """ASGI middleware sending /graphql to the gateway's current GraphQL app, read once per request, so a
    schema swap never changes the schema under a request already running."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("path", "").rstrip("/") == "/graphql":
            current = self.gateway.graphql_app
            await serve_graphql(self.gateway.reads, current, scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(gateway: Gateway, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app: /graphql, /mcp, the console at /console, plus /healthz, /admin/dlq and /metrics from
    the kernel's admin app."""
    settings = gateway.settings

    mcp = mcp_endpoint(gateway)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            tracing.setup(COMPONENT)
            await gateway.start()
            freeze_startup_heap()
        try:
            # MCP sessions close (and finish their bound runs) before the gateway stops.
            async with mcp.running():
                yield
        finally:
            if manage_lifecycle:
                await gateway.stop()

    app = FastAPI(
        title="Kinshasa gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    checks = {"database": database_check(gateway.engine), **gateway.supervisor.health_checks(gateway.roles())}
    admin = admin_app(COMPONENT, token=gateway.internal_token, dlq_api=gateway.dlq, metrics=gateway.metrics,
                      outbox=OutboxStatus(gateway.engine), health_checks=checks,
                      receipts=ChainVerifier(gateway.engine, COMPONENT, gateway_sources))
    # The operator's console: static files that speak only to /graphql (kinshasa/gateway/console/).
    app.add_api_route("/console", lambda: RedirectResponse("/console/"), include_in_schema=False)
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")
    app.mount("/", admin)
    app.add_middleware(GraphQLSwitch, gateway=gateway)
    app.add_middleware(McpRoute, endpoint=mcp)
    app.add_middleware(RequestGuard, limit=settings.max_request_bytes)
    # Outermost, so every request (and the command it writes) continues the caller's traceparent.
    app.add_middleware(tracing.TraceRequests)
    if gateway.reader_secret is not None:
        # A reader answers its gateway alone, and only reads.
        app.add_middleware(ReaderDoor, secret=gateway.reader_secret, cache=gateway.query_cache)
    return app


def mcp_endpoint(gateway: Gateway) -> McpEndpoint:
    """/mcp: MCP tools whose calls go to the gateway's current GraphQL app in process."""

    async def graphql(scope: Any, receive: Any, send: Any) -> None:
        await serve_graphql(gateway.reads, gateway.graphql_app, scope, receive, send)

    return McpEndpoint(graphql, lambda key: gateway.registry.authenticate(key), McpSettings())


def bootstrap(settings: GatewayConfig | None = None, stack: StackSettings | None = None) -> Gateway:
    """Build the process's gateway from the environment (the only place settings are read)."""
    return Gateway(settings or GatewayConfig(), stack or StackSettings())
