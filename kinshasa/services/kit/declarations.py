"""Declaring a service: each operation once, beside its forward handler, with its payload and its inverse.

A service author writes::

    documents = Service("documents", version=1, metadata=metadata, domain_tables=[document_versions])

    async def rename_back(conn, step, ctx): ...

    @documents.operation("rename", payload=RenameDocument, mutation="renameDocument", entity="document",
                         entity_id_field="document_id", inverse=rename_back)
    async def rename(conn, cmd: RenameDocument, ctx) -> dict[str, Any]: ...

and nothing else: the kit publishes the declaration on `kinshasa.catalogue` (the gateway grows a
`renameDocument` mutation from it), consumes the commands, dedupes them, runs the handler in one
transaction with the inbox record and the outbox row, turns domain errors into `*.rejected`, and runs
the inverse when the coordinator sends `<operation>.compensate`. Declaring a non-egress operation without
an inverse raises at import; `Service.verify()` (run before a service starts) refuses a service whose
declaration the gateway would refuse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.schemas.declaration import (
    DeclarationError,
    Endpoints,
    EntityDeclaration,
    InverseDeclaration,
    OperationDeclaration,
    ServiceDeclaration,
    operation_specs,
)
from kinshasa.schemas.operations import OperationSpec
from kinshasa.services.kit.context import AppliedStep, CommandContext
from kinshasa.services.kit.errors import MissingInverseError, ServiceDeclarationError
from kinshasa.services.kit.store import StepStore

ForwardHandler = Callable[[AsyncConnection, Any, CommandContext], Awaitable[Mapping[str, Any]]]
InverseHandler = Callable[[AsyncConnection, AppliedStep, CommandContext], Awaitable[None]]
EntityReader = Callable[[AsyncConnection, str], Awaitable[Mapping[str, Any] | None]]
VersionsReader = Callable[[AsyncConnection, str], Awaitable[Sequence[Mapping[str, Any]]]]
ListReader = Callable[[AsyncConnection, str], Awaitable[Sequence[Mapping[str, Any]]]]
RouterFactory = Callable[[AsyncEngine], APIRouter]
F = TypeVar("F", bound=ForwardHandler)


@dataclass(frozen=True)
class Operation:
    """One declared operation: its declaration, the forward handler, the inverse (None for egress) and
    the pydantic model the service validates payloads with (stricter than the JSON Schema it publishes
    where the model has validators of its own)."""

    declaration: OperationDeclaration
    spec: OperationSpec
    payload: type[BaseModel]
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
    """How the read API answers `GET /entities/{entity_type}/{id}`, its versions and its lists."""

    entity_type: str
    current: EntityReader
    versions: VersionsReader
    schema: Mapping[str, Any]
    lists: Mapping[str, ListReader]
    # The state put on events as `before` and `after`; `current` unless the full read is costly.
    snapshot: EntityReader | None = None


def payload_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema a payload model publishes: pydantic's, without titles, refusing unknown fields."""
    if model.model_config.get("extra") != "forbid":
        raise ServiceDeclarationError(
            f"payload model {model.__name__} must set extra='forbid' so misspelt fields are refused")
    schema = _without_titles(model.model_json_schema())
    schema["additionalProperties"] = False
    return schema


# Keywords whose values are data, not schemas: a field called `title` inside them is kept.
_DATA_KEYWORDS = frozenset({"examples", "default", "const", "enum"})


def _without_titles(value: Any) -> Any:
    """pydantic's schema without the `title` annotations it adds to every schema node."""
    if isinstance(value, dict):
        return {k: v if k in _DATA_KEYWORDS else _without_titles(v) for k, v in value.items()
                if not (k == "title" and isinstance(v, str))}
    if isinstance(value, list):
        return [_without_titles(v) for v in value]
    return value


class Service:
    """A domain service: its name, version, append-only tables, declared operations and read models."""

    def __init__(
        self,
        name: str,
        *,
        version: int = 1,
        metadata: MetaData,
        domain_tables: Iterable[Table],
        description: str = "",
        migrations: str | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.description = description
        # The service's own Alembic script directory (`package:folder`), run at start after the kernel's
        # migrations; None: its tables are created when missing (docs/migrations.md).
        self.migrations = migrations
        self.metadata = metadata
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
        return f"Service({self.name!r}, version={self.version}, operations={list(self._operations)})"

    # declaring

    def operation(
        self,
        name: str,
        *,
        payload: type[BaseModel],
        mutation: str,
        entity: str,
        entity_id_field: str | None = None,
        inverse: InverseHandler | None = None,
        egress: bool = False,
        window_s: float | None = None,
        description: str = "",
    ) -> Callable[[F], F]:
        """Declare operation `<service>.<name>` beside its forward handler, with its inverse.

        `entity_id_field` names the payload field holding the target entity's id; leave it None for an
        operation that creates its entity (the gateway mints the id). Raises at declaration (so the
        service module cannot even be imported) when the operation is not egress and has no inverse,
        is egress and has one, is declared twice, or its payload model cannot be published.
        """
        command_type = f"{self.name}.{name}"
        if egress and inverse is not None:
            raise ServiceDeclarationError(
                f"{command_type} is egress and cannot have an inverse: what left the system cannot "
                "be taken back; drop inverse="
            )
        if not egress and inverse is None:
            raise MissingInverseError(
                f"{command_type} has no inverse: declare it with inverse=<handler> so a run that "
                "used it can be reverted, or mark it egress=True if it acts outside the system"
            )
        if command_type in self._operations:
            raise ServiceDeclarationError(f"{command_type} is declared twice: keep one declaration")
        declared = OperationDeclaration(
            name=name, mutation=mutation, description=description or (payload.__doc__ or "").strip(),
            entity_type=entity, entity_id_field=entity_id_field, payload_schema=payload_schema(payload),
            inverse=None if inverse is None else InverseDeclaration(
                name=inverse.__name__, description=(inverse.__doc__ or "").strip().split("\n")[0]),
            egress=egress, window_s=window_s,
        )
        problems = list(declared.problems(self.name))
        if problems:
            raise ServiceDeclarationError("; ".join(problems))
        try:
            spec = operation_specs(ServiceDeclaration(service=self.name, version=self.version,
                                                      operations=[declared]))[0]
        except (DeclarationError, ValueError) as exc:
            raise ServiceDeclarationError(f"{command_type}: {exc}") from exc

        def register(forward: F) -> F:
            self._operations[command_type] = Operation(declared, spec, payload, forward, inverse)
            return forward

        return register

    def read_model(
        self,
        entity_type: str,
        *,
        current: EntityReader,
        versions: VersionsReader,
        schema: type[BaseModel] | Mapping[str, Any] | None = None,
        lists: Mapping[str, ListReader] | None = None,
        snapshot: EntityReader | None = None,
    ) -> None:
        """Serve `GET /entities/{entity_type}/{id}` (current state or 404), its version history, and
        `GET /entities/{entity_type}?<field>=<value>` for each field in `lists`.

        `schema` is the JSON Schema (or a pydantic model of it) of the state `current` returns; the
        gateway can generate a typed GraphQL read from it. `snapshot` reads the state every applied
        event carries as `before` and `after` (default: `current`); give a cheaper one when `current`
        reads much more than the entity itself.
        """
        if entity_type in self._read_models:
            raise ServiceDeclarationError(f"read model for {entity_type!r} is declared twice")
        published: Mapping[str, Any]
        if schema is None:
            published = {"type": "object"}
        elif isinstance(schema, type) and issubclass(schema, BaseModel):
            published = _without_titles(schema.model_json_schema())
        else:
            published = dict(schema)
        self._read_models[entity_type] = ReadModel(entity_type, current, versions, published,
                                                   dict(lists or {}), snapshot)

    def router(self, factory: RouterFactory) -> RouterFactory:
        """Add service-specific HTTP routes beside the read API; `factory(engine)` builds them."""
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

    def snapshot_reader(self, entity_type: str) -> EntityReader | None:
        """What reads an entity's state for the `before` and `after` of its events (None: no read model)."""
        model = self._read_models.get(entity_type)
        if model is None:
            return None
        return model.snapshot or model.current

    def declaration(self, *, read_url: str | None = None, admin_url: str | None = None) -> ServiceDeclaration:
        """What the service publishes on `kinshasa.catalogue`, with its digest."""
        entities = [EntityDeclaration(type=m.entity_type, schema_=dict(m.schema), list_by=list(m.lists))
                    for m in self._read_models.values()]
        return ServiceDeclaration(
            service=self.name, version=self.version, description=self.description,
            endpoints=Endpoints(read=read_url, admin=admin_url),
            operations=[op.declaration for op in self._operations.values()], entities=entities,
        ).stamped()

    def verify(self) -> None:
        """Refuse to run a service the gateway would refuse: no operations, an operation without an
        inverse, or an operation on an entity type it serves no reads for."""
        if not self._operations:
            raise ServiceDeclarationError(
                f"service {self.name} declares no operations: declare each with "
                f"@{self.name}.operation(name, payload=..., mutation=..., entity=..., inverse=...)"
            )
        for op in self._operations.values():
            # Re-checked here too: an Operation can be built by hand, bypassing operation().
            if op.inverse is None and not op.egress:
                raise MissingInverseError(f"{op.command_type} has no inverse and is not egress")
        missing = sorted({op.spec.entity_type for op in self._operations.values()} - set(self._read_models))
        if missing:
            raise ServiceDeclarationError(
                f"service {self.name} has operations on {', '.join(missing)} but no read model for them: "
                f"declare {self.name}.read_model(<type>, current=..., versions=...) "
                "so the gateway can read them"
            )
        try:
            self.declaration()
        except (DeclarationError, ValueError) as exc:
            raise ServiceDeclarationError(f"service {self.name}: {exc}") from exc
