"""The services the gateway serves: each one's accepted declaration, and the rule a new version must pass.

Declarations arrive on `kinshasa.catalogue`. Each accepted version is appended to `gw_service_versions`
(shared by the replicas of one gateway), so a restart, or a replica reading a topic that compaction
has since thinned, serves what was accepted rather than whatever was published last. A newer version
replaces the accepted one only if `compatibility_problems` finds nothing; otherwise the accepted one
keeps serving and operators get one `catalogue_incompatible` alert per refused version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.gateway.alerts import Alert, store_alert
from kinshasa.gateway.store import service_versions
from kinshasa.schemas.declaration import (
    DeclarationError,
    ServiceDeclaration,
    build_catalogue,
    compatibility_problems,
    declaration_digest,
    parse_declaration,
)
from kinshasa.schemas.envelope import deterministic_id, utcnow
from kinshasa.schemas.operations import OperationCatalogue
from kinshasa.topics.declaration_feed import PublishedDeclaration

log = logging.getLogger(__name__)

INCOMPATIBLE = "catalogue_incompatible"

@dataclass(frozen=True)
class Decision:
    """What the book did with one published record."""

    service: str
    outcome: str  # accepted | unchanged | stale | refused
    detail: str = ""


class ServiceBook:
    """Accepted declarations by service, and the operation catalogue built from them."""

    def __init__(self, engine: AsyncEngine, *, reserved_mutations: frozenset[str] = frozenset(),
                 on_change: Callable[[OperationCatalogue], None] | None = None,
                 on_alert: Callable[[Alert], None] | None = None, webhook: bool = False,
                 records: bool = True) -> None:
        """`records=False` (a gateway's reader): decide in memory only, as the gateway that records each
        accepted version and each refusal's alert decides the same from the same topic."""
        self._engine = engine
        self._records = records
        # The gateway's own mutations (startRun, revertRun, ...): no service may take their names.
        self._reserved = reserved_mutations
        self._on_change = on_change
        self._on_alert = on_alert
        self._webhook = webhook
        self._accepted: dict[str, ServiceDeclaration] = {}
        self.catalogue = OperationCatalogue([])

    @property
    def declarations(self) -> Mapping[str, ServiceDeclaration]:
        return dict(self._accepted)

    def declaration(self, service: str) -> ServiceDeclaration | None:
        return self._accepted.get(service)

    def owner_of(self, entity_type: str) -> ServiceDeclaration | None:
        """The service that declares `entity_type` (first by name if two do)."""
        for name in sorted(self._accepted):
            declaration = self._accepted[name]
            if declaration.entity(entity_type) is not None:
                return declaration
        return None

    async def load(self) -> None:
        """Read the newest accepted version of every service from the database."""
        async with self._engine.connect() as conn:
            newest = (select(service_versions.c.service, func.max(service_versions.c.version).label("v"))
                      .group_by(service_versions.c.service).subquery())
            rows = (await conn.execute(select(service_versions.c.declaration).join(
                newest, (service_versions.c.service == newest.c.service)
                & (service_versions.c.version == newest.c.v)))).scalars().all()
            await conn.rollback()
        for raw in rows:
            declaration = parse_declaration(raw)
            self._accepted[declaration.service] = declaration
        self._rebuild()

    async def offer(self, record: PublishedDeclaration) -> Decision:
        """Decide on one record of the catalogue topic; accepting it swaps the catalogue."""
        try:
            declaration = parse_declaration(record.value)
        except DeclarationError as exc:
            return await self._refuse(record.key or "(no key)", None, _digest_of(record.value),
                                      f"the declaration is invalid: {exc}")
        if record.key and record.key != declaration.service:
            return await self._refuse(declaration.service, declaration.version, declaration.computed_digest(),
                                      f"it was published under key {record.key!r}: "
                                      "key it by its service name")
        current = self._accepted.get(declaration.service)
        digest = declaration.computed_digest()
        taken = sorted(op.mutation for op in declaration.operations if op.mutation in self._reserved)
        if taken:
            return await self._refuse(declaration.service, declaration.version, digest,
                                      f"mutation {', '.join(taken)} is one of the gateway's own: rename it")
        if current is not None:
            if declaration.version < current.version:
                return Decision(declaration.service, "stale",
                                f"version {declaration.version} < {current.version}")
            if declaration.version == current.version:
                if digest == current.computed_digest():
                    return await self._refresh_endpoints(current, declaration)
                return await self._refuse(declaration.service, declaration.version, digest,
                                          f"version {declaration.version} was already accepted with other "
                                          "content: bump the version when the declaration changes")
            problems = compatibility_problems(current, declaration)
            if problems:
                return await self._refuse(declaration.service, declaration.version, digest,
                                          "; ".join(problems))
        try:
            catalogue = build_catalogue([*(d for n, d in self._accepted.items() if n != declaration.service),
                                         declaration])
        except DeclarationError as exc:
            return await self._refuse(declaration.service, declaration.version, digest, str(exc))
        previous = self._accepted.get(declaration.service)
        self._accepted[declaration.service] = declaration
        try:
            # Built before it is stored: a declaration the schema cannot be built from is never kept.
            self._swap(catalogue)
        except Exception as exc:
            if previous is None:
                del self._accepted[declaration.service]
            else:
                self._accepted[declaration.service] = previous
            return await self._refuse(declaration.service, declaration.version, digest,
                                      "the gateway could not build its schema from it "
                                      f"({type(exc).__name__})")
        if self._records:
            await self._store(declaration, digest)
        log.info("accepted %s version %d (%s): %d operation(s)", declaration.service, declaration.version,
                 digest, len(declaration.operations))
        return Decision(declaration.service, "accepted", digest)

    async def _refresh_endpoints(self, current: ServiceDeclaration,
                                 published: ServiceDeclaration) -> Decision:
        # A restarted service republishes the same version from a new address: same content, new endpoints.
        if published.endpoints != current.endpoints:
            self._accepted[current.service] = current.model_copy(update={"endpoints": published.endpoints})
        return Decision(current.service, "unchanged")

    async def _store(self, declaration: ServiceDeclaration, digest: str) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(service_versions).values(
                    service=declaration.service, version=declaration.version, digest=digest,
                    declaration=declaration.model_copy(update={"digest": digest}).to_json().decode(),
                    accepted_at=utcnow()))
        except IntegrityError:
            # Another replica on the same database accepted it first: the same decision, already made.
            pass

    async def _refuse(self, service: str, version: int | None, digest: str, why: str) -> Decision:
        what = (f"version {version} of service {service}" if version is not None
                else f"declaration of {service}")
        keeps = self._accepted.get(service)
        serving = (f"version {keeps.version} keeps serving" if keeps is not None
                   else "the service stays unavailable to agents")
        summary = (f"refused {what}: {why}. {serving}; publish a compatible version (add operations or "
                   "optional fields only) or the change under a new service name")
        if not self._records:
            return Decision(service, "refused", why)
        log.warning("%s", summary)
        alert = Alert(
            alert_id=str(deterministic_id(INCOMPATIBLE, service, digest)), run_id="", kind=INCOMPATIBLE,
            created_at=utcnow(), summary=summary,
            payload={"service": service, "version": version, "digest": digest, "problems": why.split("; "),
                     "serving_version": keeps.version if keeps else None},
        )
        async with self._engine.begin() as conn:
            fresh = await store_alert(conn, alert, self._webhook)
        if fresh and self._on_alert is not None:
            self._on_alert(alert)
        return Decision(service, "refused", why)

    def _rebuild(self) -> None:
        self._swap(build_catalogue(self._accepted.values()))

    def _swap(self, catalogue: OperationCatalogue) -> None:
        if self._on_change is not None:
            self._on_change(catalogue)  # raises before anything changes if the schema cannot be built
        self.catalogue = catalogue


def _digest_of(raw: bytes) -> str:
    try:
        return declaration_digest(json.loads(raw))
    except (ValueError, RecursionError):
        return declaration_digest({"raw": raw.decode(errors="replace")})


async def accepted_versions(conn: AsyncConnection, service: str) -> list[int]:
    """Every version of `service` this gateway ever accepted, oldest first."""
    return list((await conn.execute(select(service_versions.c.version).where(
        service_versions.c.service == service).order_by(service_versions.c.version))).scalars())
