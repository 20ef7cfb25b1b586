"""Declaring a service: each catalogue operation once, beside its forward handler, with its inverse or egress.

A service author writes::

    documents = Service("documents", metadata=metadata, domain_tables=[document_versions])

    async def rename_back(conn, step, ctx): ...

    @documents.operation("rename", inverse=rename_back)
    async def rename(conn, cmd: RenameDocument, ctx) -> dict[str, Any]: ...

and nothing else: the kit consumes the commands, dedupes them, runs the handler in one transaction
with the inbox record and the outbox row, turns domain errors into `*.rejected`, and runs the inverse
when the coordinator sends `<operation>.compensate`. Declaring a non-egress operation without an
inverse raises at import, and `Service.verify()` (run before a service starts) refuses a service that
leaves any of its catalogue operations undeclared.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.schemas.catalogue import CATALOGUE
from kinshasa.schemas.operations import OperationCatalogue, OperationSpec
from kinshasa.services.kit.context import AppliedStep, CommandContext
from kinshasa.services.kit.errors import (
    MissingInverseError,
    ServiceDeclarationError,
    UndeclaredOperationError,
)
from kinshasa.services.kit.store import StepStore

ForwardHandler = Callable[[AsyncConnection, Any, CommandContext], Awaitable[Mapping[str, Any]]]
InverseHandler = Callable[[AsyncConnection, AppliedStep, CommandContext], Awaitable[None]]
EntityReader = Callable[[AsyncConnection, str], Awaitable[Mapping[str, Any] | None]]
VersionsReader = Callable[[AsyncConnection, str], Awaitable[Sequence[Mapping[str, Any]]]]
RouterFactory = Callable[[AsyncEngine], APIRouter]
F = TypeVar("F", bound=ForwardHandler)


@dataclass(frozen=True)
class Operation:
    """One declared operation: the catalogue's spec, the forward handler and the inverse (None for egress)."""

    spec: OperationSpec
    forward: ForwardHandler
    inverse: InverseHandler | None

    @property
    def egress(self) -> bool:
        return self.spec.egress

    @property
    def command_type(self) -> str:
        return self.spec.command_type


@dataclass(frozen=True)
class ReadModel:
    """How the read API answers `GET /entities/{entity_type}/{id}` and `.../versions` for one entity type."""

    entity_type: str
    current: EntityReader
    versions: VersionsReader


class Service:
    """A domain service: its name, its append-only tables, its declared operations and its read models."""

    def __init__(
        self,
        name: str,
        *,
        metadata: MetaData,
        domain_tables: Iterable[Table],
        catalogue: OperationCatalogue = CATALOGUE,
    ) -> None:
        self.name = name
        self.metadata = metadata
        self.catalogue = catalogue
        self.store = StepStore(name, metadata)
        self._domain_tables = tuple(domain_tables)
        for table in self._domain_tables:
            if table.metadata is not metadata:
                raise ServiceDeclarationError(
                    f"table {table.name} of service {name} is declared on another MetaData: "
                    "declare every domain table on the service's own metadata"
                )
        self._operations: dict[str, Operation] = {}
        self._read_models: dict[str, ReadModel] = {}
        self._routers: list[RouterFactory] = []

    def __repr__(self) -> str:
        return f"Service({self.name!r}, operations={list(self._operations)})"

    # declaring

    def operation(
        self, name: str, *, inverse: InverseHandler | None = None, egress: bool = False
    ) -> Callable[[F], F]:
        """Declare the forward handler of catalogue operation `<service>.<name>` with its inverse.

        Raises at declaration (so the service module cannot even be imported) when the operation is
        not egress and has no inverse, when `egress` disagrees with the catalogue, or when the
        operation is unknown or declared twice.
        """
        spec = self.catalogue.get(f"{self.name}.{name}")
        if spec is None:
            known = ", ".join(s.name for s in self.catalogue.for_service(self.name)) or "(none)"
            raise ServiceDeclarationError(
                f"{self.name}.{name} is not in the operation catalogue; operations of {self.name} are: "
                f"{known}. Add it to kinshasa.schemas.catalogue first"
            )
        if egress != spec.egress:
            want = "egress=True" if spec.egress else "an inverse and no egress=True"
            raise ServiceDeclarationError(
                f"{spec.command_type} is {'egress' if spec.egress else 'not egress'} in the catalogue: "
                f"declare it with {want}"
            )
        if egress and inverse is not None:
            raise ServiceDeclarationError(
                f"{spec.command_type} is egress and cannot have an inverse: what left the system cannot "
                "be taken back; drop inverse="
            )
        if not egress and inverse is None:
            raise MissingInverseError(
                f"{spec.command_type} has no inverse: declare it with inverse=<handler> so a run that "
                "used it can be reverted, or mark it egress=True in the catalogue and here"
            )
        if spec.command_type in self._operations:
            raise ServiceDeclarationError(f"{spec.command_type} is declared twice: keep one declaration")

        def register(forward: F) -> F:
            self._operations[spec.command_type] = Operation(spec=spec, forward=forward, inverse=inverse)
            return forward

        return register

    def read_model(self, entity_type: str, *, current: EntityReader, versions: VersionsReader) -> None:
        """Serve `GET /entities/{entity_type}/{id}` (current state or 404) and its version history."""
        if entity_type in self._read_models:
            raise ServiceDeclarationError(f"read model for {entity_type!r} is declared twice")
        self._read_models[entity_type] = ReadModel(entity_type, current, versions)

    def router(self, factory: RouterFactory) -> RouterFactory:
        """Add service-specific HTTP reads (e.g. the notifier's `/emails`); `factory(engine)` builds them."""
        self._routers.append(factory)
        return factory

    # inspecting

    @property
    def operations(self) -> Mapping[str, Operation]:
        """Declared operations by command type (`documents.rename`)."""
        return dict(self._operations)

    @property
    def read_models(self) -> Mapping[str, ReadModel]:
        return dict(self._read_models)

    @property
    def routers(self) -> Sequence[RouterFactory]:
        return tuple(self._routers)

    @property
    def domain_tables(self) -> tuple[Table, ...]:
        return self._domain_tables

    @property
    def append_only_tables(self) -> tuple[Table, ...]:
        """Every table of this service the database must refuse UPDATE and DELETE on."""
        return (*self._domain_tables, *self.store.tables)

    def get(self, command_type: str) -> Operation | None:
        return self._operations.get(command_type)

    def missing_operations(self) -> list[str]:
        """Catalogue operations of this service that have no declaration."""
        return [s.command_type for s in self.catalogue.for_service(self.name)
                if s.command_type not in self._operations]

    def verify(self) -> None:
        """Refuse to run a service that leaves any of its catalogue operations undeclared or irreversible."""
        if not self.catalogue.for_service(self.name):
            raise ServiceDeclarationError(
                f"the operation catalogue has no operations for service {self.name!r}: "
                "add them to kinshasa.schemas.catalogue or check the service name"
            )
        missing = self.missing_operations()
        if missing:
            raise UndeclaredOperationError(
                f"service {self.name} does not declare {', '.join(missing)}: declare each with "
                f"@{self.name}.operation(name, inverse=...) (or egress=True) before starting the service"
            )
        for op in self._operations.values():
            # Re-checked here too: an Operation can be built by hand, bypassing operation().
            if op.inverse is None and not op.egress:
                raise MissingInverseError(f"{op.command_type} has no inverse and is not egress")
