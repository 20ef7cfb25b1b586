"""Entity reads for every declared service: the generic `entity` query and the typed reads generated from
each service's read models.

Nothing here names a service. `entity(service, type, id)` reads any entity of any accepted service;
for each entity type a service declares, the schema also gets `<type>(id)` returning a type generated
from the read model's JSON Schema (`document(id) { title }`), and `<type>s(<field>)` for each field the
entity can be listed by (`links(entityId)`, `emails(runId)`). A generated read is left out when its name
would shadow a field the gateway already has; `entity` still reaches it.

Every one of them needs the service's read scope: an agent reads a service's entities only with
`<service>:read` (or `*`, or a glob matching it such as `*:read`) among its scopes; a write scope such as
`orders.*` does not grant reads. Operators read everything. Without it the read is FORBIDDEN before any
backend is asked.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import strawberry
from strawberry.permission import BasePermission
from strawberry.scalars import JSON

from kinshasa.gateway.errors import Forbidden, Invalid, NotFound, camel
from kinshasa.gateway.principals import read_scope
from kinshasa.schemas.declaration import ServiceDeclaration
from kinshasa.schemas.payloads import normalize_schema

INT32 = 2**31 - 1
ID_MAX = 256
HISTORY_MAX = 200
_CAMEL_RE = re.compile(r"^[a-z][A-Za-z0-9]*$")

VisibleRun = Callable[[strawberry.Info, str], Awaitable[Any]]


@dataclass(frozen=True)
class ReadWiring:
    """What generated resolvers need from the schema module, passed in so neither imports the other."""

    permission: list[type[BasePermission]]
    long_type: Any
    visible_run: VisibleRun
    backends: Callable[[strawberry.Info], Any]


def check_read_scope(info: strawberry.Info, service: str) -> None:
    """FORBIDDEN unless the caller may read `service`'s entities (see the module docstring)."""
    principal = info.context.require_principal()
    if not principal.may_read(service):
        raise Forbidden(
            f"agent {principal.id} has no read scope for the {service} service: ask an operator to grant "
            f"{read_scope(service)!r}"
        )


def _bounded(value: str, name: str) -> str:
    if not value or len(value) > ID_MAX:
        raise Invalid(f"{name} must be 1-{ID_MAX} characters", [(name, "empty or too long")])
    return value


def _stamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@strawberry.type(description="One version of an entity: who wrote it, in which run, by which operation.")
class EntityVersion:
    version: int
    run_id: strawberry.ID | None
    actor: str | None
    operation: str | None = strawberry.field(description="command type, e.g. tickets.close; "
                                             "`<type>.compensate` when a revert wrote it")
    at: datetime | None
    state: JSON

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> EntityVersion:
        return cls(version=_int(row.get("version")) or 0,
                   run_id=strawberry.ID(row["run_id"]) if isinstance(row.get("run_id"), str) else None,
                   actor=row.get("actor") if isinstance(row.get("actor"), str) else None,
                   operation=row.get("operation") if isinstance(row.get("operation"), str) else None,
                   at=_stamp(row.get("recorded_at")), state=JSON(dict(row)))


@strawberry.type(description="An entity of any service, as its service's read API answers it.")
class Entity:
    service: str
    type: str
    id: strawberry.ID
    version: int | None
    state: JSON

    @strawberry.field(description="Its versions, oldest first; `after` is a version number from a previous "
                                  "page.")
    async def history(self, info: strawberry.Info, first: int = 50,
                      after: int | None = None) -> list[EntityVersion]:
        if first < 1 or first > HISTORY_MAX:
            raise Invalid(f"first must be between 1 and {HISTORY_MAX}", [("first", "out of range")])
        rows = await info.context.reads.versions(self.service, self.type, str(self.id))
        chosen = [r for r in rows if after is None or (_int(r.get("version")) or 0) > after]
        return [EntityVersion.of(r) for r in chosen[:first]]


def entity_query(wiring: ReadWiring) -> Any:
    """`entity(service, type, id): Entity` over every accepted service."""

    async def entity(info: strawberry.Info, service: str, type: str, id: strawberry.ID) -> Entity | None:
        book = info.context.services.book
        declaration = book.declaration(_bounded(service, "service"))
        if declaration is None:
            known = ", ".join(sorted(book.declarations)) or "none yet"
            raise NotFound(f"no service {service!r} is registered: known services are {known}")
        if declaration.entity(_bounded(type, "type")) is None:
            known = ", ".join(e.type for e in declaration.entities) or "none"
            raise Invalid(f"{service} declares no entity type {type!r}: it declares {known}",
                          [("type", "unknown")])
        check_read_scope(info, service)
        state = await wiring.backends(info).entity(service, type, _bounded(str(id), "id"))
        if state is None:
            return None
        return Entity(service=service, type=type, id=strawberry.ID(str(id)),
                      version=_int(state.get("version")), state=JSON(state))

    return strawberry.field(resolver=entity, permission_classes=wiring.permission,
                            description="Any entity of any registered service; null if it does not exist. "
                                        "Agents need the service's read scope (<service>:read).")


def _pascal(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def _field_type(prop: Any, long_type: Any) -> Any:
    kind = prop.get("type") if isinstance(prop, Mapping) else None
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind == "string":
        return str
    if kind == "boolean":
        return bool
    if kind == "number":
        return float
    if kind == "integer":
        maximum = prop.get("maximum")
        return int if isinstance(maximum, int) and maximum <= INT32 and (prop.get("minimum") or 0) >= -INT32 \
            else long_type
    return JSON


def _value(value: Any, kind: Any) -> Any:
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if kind is JSON:
        return JSON(value) if value is not None else None
    return _int(value)


def entity_type(declaration: ServiceDeclaration, entity: str, schema: Mapping[str, Any], name: str,
                long_type: Any) -> tuple[type, Callable[[Mapping[str, Any]], Any]]:
    """A Strawberry type for one read model, and the function that fills it from a state document."""
    normalized = normalize_schema(schema)
    found = normalized.get("properties")
    properties: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    kinds: dict[str, Any] = {}
    for prop_name, prop in properties.items():
        if prop_name in ("id", "state") or not re.match(r"^[a-z][a-z0-9_]*$", prop_name):
            continue
        kinds[prop_name] = _field_type(prop, long_type)
    annotations: dict[str, Any] = {"id": strawberry.ID}
    namespace: dict[str, Any] = {"__module__": __name__}
    for prop_name, kind in kinds.items():
        annotations[prop_name] = kind | None
        prop = properties[prop_name]
        description = prop.get("description") if isinstance(prop, Mapping) else None
        if isinstance(description, str):
            namespace[prop_name] = strawberry.field(description=description)
    annotations["state"] = JSON
    namespace["state"] = strawberry.field(description="the whole state document, as the service answered it")
    namespace["__annotations__"] = annotations
    cls = types.new_class(name, (), {}, lambda ns: ns.update(namespace))
    gql = strawberry.type(cls, description=f"Entity type {entity} of the {declaration.service} service, "
                                           "read through its read API.")

    def fill(state: Mapping[str, Any]) -> Any:
        values = {k: _value(state.get(k), kind) for k, kind in kinds.items()}
        return gql(id=strawberry.ID(str(state.get("id", ""))), state=JSON(dict(state)), **values)

    return gql, fill


def typed_reads(declarations: Mapping[str, ServiceDeclaration], taken_fields: set[str],
                taken_types: set[str], wiring: ReadWiring) -> dict[str, Any]:
    """Query fields generated from every accepted service's read models, by GraphQL field name."""
    fields: dict[str, Any] = {}
    for service in sorted(declarations):
        declaration = declarations[service]
        for entity in declaration.entities:
            single = camel(entity.type)
            type_name = _pascal(entity.type)
            if type_name in taken_types:
                type_name = _pascal(service) + type_name
            if (single in taken_fields or single in fields or not _CAMEL_RE.match(single)
                    or type_name in taken_types):
                continue
            gql, fill = entity_type(declaration, entity.type, entity.schema_, type_name, wiring.long_type)
            taken_types.add(type_name)
            fields[single] = _single_read(service, entity.type, gql, fill, wiring)
            for list_field in entity.list_by:
                plural = f"{single}s"
                if plural in taken_fields or plural in fields:
                    continue
                fields[plural] = _list_read(service, entity.type, list_field, gql, fill, wiring)
    return fields


def _single_read(service: str, entity: str, gql: type, fill: Callable[[Mapping[str, Any]], Any],
                 wiring: ReadWiring) -> Any:
    async def read(info: strawberry.Info, id: strawberry.ID) -> Any:
        check_read_scope(info, service)
        state = await wiring.backends(info).entity(service, entity, _bounded(str(id), "id"))
        return None if state is None else fill(state)

    read.__annotations__ = {"info": strawberry.Info, "id": strawberry.ID, "return": gql | None}
    return strawberry.field(resolver=read, permission_classes=wiring.permission,
                            description=f"{service}'s {entity} by id: current state; null if it does not "
                                        "exist.")


def _list_read(service: str, entity: str, field: str, gql: type, fill: Callable[[Mapping[str, Any]], Any],
               wiring: ReadWiring) -> Any:
    argument = camel(field)

    async def read(info: strawberry.Info, **kwargs: Any) -> list[Any]:
        check_read_scope(info, service)
        value = _bounded(str(kwargs[field]), argument)
        if field == "run_id":
            await wiring.visible_run(info, value)  # an agent lists only what its own runs wrote
        return [fill(state) for state in await wiring.backends(info).listed(service, entity, field, value)]

    read.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("info", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=strawberry.Info),
        inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, annotation=strawberry.ID),
    ], return_annotation=list[gql])  # type: ignore[valid-type]
    read.__annotations__ = {"info": strawberry.Info, field: strawberry.ID, "return": list[gql]}  # type: ignore[valid-type]
    return strawberry.field(resolver=read, permission_classes=wiring.permission,
                            description=f"{service}'s {entity} entities with this {field}.")
