"""The GraphQL request context: the caller's principal and the gateway's wired dependencies."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from strawberry.fastapi import BaseContext

from kinshasa.gateway.alerts import WebhookSender
from kinshasa.gateway.commands import CommandWriter
from kinshasa.gateway.errors import Forbidden, Unauthenticated
from kinshasa.gateway.loaders import DatabaseReads, Pacer, RequestReads
from kinshasa.gateway.policy import PolicyBook
from kinshasa.gateway.principals import Principal, PrincipalRegistry
from kinshasa.gateway.reads import Backends
from kinshasa.gateway.service_book import ServiceBook
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.schemas.operations import OperationCatalogue


@dataclass
class Services:
    """Everything a resolver may use, built once by bootstrap."""

    settings: GatewayConfig
    engine: AsyncEngine
    book: ServiceBook
    registry: PrincipalRegistry
    policies: PolicyBook
    writer: CommandWriter
    webhook: WebhookSender
    backends: Backends
    # The gateway's own DLQ (kernel DeadLetterQueue), read in-process rather than over HTTP.
    local_dlq: Any = None
    wake_relay: Callable[[], None] | None = None
    # The alerts feed of the operator's subscriptions (gateway/live.py), one per process.
    alert_feed: Any = None
    # Read-only connections for read resolvers (None: plain connections of `engine`), and the pace of
    # what their batches set off, shared by all requests.
    database: DatabaseReads | None = None
    pacer: Pacer | None = None
    # Counts a request refused on an agent budget, by the budget's name (gateway/domain_metrics.py).
    budget_refused: Callable[[str], None] | None = None

    @property
    def catalogue(self) -> OperationCatalogue:
        """The operations of every accepted service, as of now."""
        return self.book.catalogue


class GatewayContext(BaseContext):
    """Built per request by the context getter: authentication is done, authorization is per field."""

    def __init__(self, services: Services, principal: Principal | None, presented_key: bool) -> None:
        super().__init__()
        self.services = services
        self.principal = principal
        self.presented_key = presented_key
        self.started = time.monotonic()
        self._reads: RequestReads | None = None

    @property
    def reads(self) -> RequestReads:
        """This request's reads of other components and of the database: batched, bounded in time."""
        if self._reads is None:
            settings = self.services.settings
            self._reads = RequestReads(
                self.services.backends,
                self.services.database or DatabaseReads(self.services.engine, settings.database_reads),
                self.services.policies,
                deadline_s=settings.backend_deadline_s,
                concurrency=settings.backend_concurrency,
                call_timeout_s=settings.http_timeout_s,
                started=self.started,
                pacer=self.services.pacer,
            )
        return self._reads

    def renew(self) -> None:
        """Start this context's reads afresh: each event of a subscription is resolved as a request of its
        own, with its own time for reading other components and no answers cached from the last one."""
        self.started = time.monotonic()
        self._reads = None

    def require_principal(self) -> Principal:
        if self.principal is None:
            if self.presented_key:
                raise Unauthenticated(
                    "the Bearer key is not recognised: check it, or ask an operator for one"
                )
            raise Unauthenticated("authentication required: send 'Authorization: Bearer <key>'")
        return self.principal

    def require_agent(self) -> Principal:
        principal = self.require_principal()
        if not principal.is_agent:
            raise Forbidden("only agents write through runs: operators act with the operator mutations")
        return principal

    def require_operator(self) -> Principal:
        principal = self.require_principal()
        if not principal.is_operator:
            raise Forbidden("this is an operator action: agents cannot call it")
        return principal
