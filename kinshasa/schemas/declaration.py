"""A service's declaration as data: its operations, inverses and read models, versioned, with a digest.

This is the value a service publishes on `kinshasa.catalogue` (docs/service-contract.md, section 9), in
whatever language it is written. The gateway builds its agent mutations from accepted declarations, and
`compatibility_problems` is the one rule deciding whether a newer version may replace an accepted one.
Pure data: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from kinshasa.schemas.envelope import RUN_SERVICE, SEGMENT_RE, invalid_message
from kinshasa.schemas.operations import (
    GRAPHQL_NAME_RE,
    RESERVED_OPERATION_NAMES,
    OperationCatalogue,
    OperationSpec,
)
from kinshasa.schemas.payloads import PayloadSchemaError, compile_payload_schema, normalize_schema

DECLARATION_KIND = "kinshasa.service/v1"
# The components' own names: no service may take them (topics and groups would collide).
RESERVED_SERVICE_NAMES = frozenset({RUN_SERVICE, "gateway", "coordinator"})
SERVICE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

Text = Annotated[str, StringConstraints(max_length=2000)]
Segment = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class DeclarationError(ValueError):
    """A declaration that cannot be used as it stands; the message says what to change."""


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InverseDeclaration(_Data):
    """The domain inverse of an operation, named by the service that owns it."""

    name: Segment
    description: Text = ""


class OperationDeclaration(_Data):
    """One write a service offers agents."""

    name: Segment
    mutation: Segment
    description: Text = ""
    entity_type: Segment
    entity_id_field: Segment | None = None
    payload_schema: dict[str, Any]
    inverse: InverseDeclaration | None = None
    egress: bool = False
    window_s: Annotated[float, Field(ge=0, le=7 * 86_400)] | None = None

    @property
    def creates(self) -> bool:
        return self.entity_id_field is None

    def problems(self, service: str) -> Iterator[str]:
        where = f"{service}.{self.name}"
        for label, value in (("name", self.name), ("entity_type", self.entity_type)):
            if not SEGMENT_RE.match(value):
                yield f"{where}: {label} {value!r} must be lowercase snake_case starting with a letter"
        if self.name in RESERVED_OPERATION_NAMES:
            yield f"{where}: operation name {self.name!r} is reserved as a message-type suffix: pick another"
        if not GRAPHQL_NAME_RE.match(self.mutation):
            yield f"{where}: mutation {self.mutation!r} must be lowerCamelCase, e.g. 'openTicket'"
        if self.egress and self.inverse is not None:
            yield f"{where}: egress cannot have an inverse (what left cannot be taken back): drop inverse"
        if not self.egress and self.inverse is None:
            yield (f"{where}: no inverse: declare the domain inverse so a run that used it can be reverted, "
                   "or mark it egress")
        properties = self.payload_schema.get("properties")
        required = self.payload_schema.get("required") or []
        if self.entity_id_field is not None:
            if not isinstance(properties, Mapping) or self.entity_id_field not in properties:
                yield f"{where}: entity_id_field {self.entity_id_field!r} is not a property of the payload"
            elif self.entity_id_field not in required:
                yield f"{where}: entity_id_field {self.entity_id_field!r} must be required"


class EntityDeclaration(_Data):
    """An entity type the service owns and serves at `GET /entities/{type}/{id}`."""

    type: Segment
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    list_by: list[Segment] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Endpoints(_Data):
    """Where the service answers HTTP: its read API and its admin API (DLQ, metrics)."""

    read: Annotated[str, StringConstraints(max_length=500)] | None = None
    admin: Annotated[str, StringConstraints(max_length=500)] | None = None


class ServiceDeclaration(_Data):
    """Everything the ring needs to know about one service, as it publishes it."""

    kind: Literal["kinshasa.service/v1"] = "kinshasa.service/v1"
    service: Segment
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    digest: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    description: Text = ""
    endpoints: Endpoints = Field(default_factory=Endpoints)
    operations: list[OperationDeclaration]
    entities: list[EntityDeclaration] = Field(default_factory=list)
    published_at: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ServiceDeclaration:
        problems = list(self.problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def problems(self) -> Iterator[str]:
        if not SERVICE_NAME_RE.match(self.service):
            yield (f"service name {self.service!r} must be lowercase letters, digits and '_', starting with "
                   "a letter, at most 48 characters")
        if self.service in RESERVED_SERVICE_NAMES:
            yield f"service name {self.service!r} is reserved for Kinshasa's own components: pick another"
        if not self.operations:
            yield f"service {self.service} declares no operations"
        seen: set[str] = set()
        mutations: set[str] = set()
        entity_types = {e.type for e in self.entities}
        for op in self.operations:
            if op.name in seen:
                yield f"operation {self.service}.{op.name} is declared twice"
            if op.mutation in mutations:
                yield f"mutation {op.mutation} is declared twice"
            seen.add(op.name)
            mutations.add(op.mutation)
            if self.entities and op.entity_type not in entity_types:
                yield (f"{self.service}.{op.name} acts on entity type {op.entity_type!r}, "
                       "which is not in entities")
            yield from op.problems(self.service)

    def body(self) -> dict[str, Any]:
        """What the digest covers: everything but the digest itself, the endpoints and the publish time."""
        return self.model_dump(mode="json", by_alias=True,
                               include={"service", "version", "description", "operations", "entities"})

    def computed_digest(self) -> str:
        return declaration_digest(self.body())

    def stamped(self, **changes: Any) -> ServiceDeclaration:
        """This declaration with `changes` applied and its digest computed."""
        data = self.model_dump(mode="json", by_alias=True) | changes
        data["digest"] = None
        fresh = ServiceDeclaration.model_validate(data)
        return fresh.model_copy(update={"digest": fresh.computed_digest()})

    def operation(self, name: str) -> OperationDeclaration | None:
        return next((op for op in self.operations if op.name == name), None)

    def entity(self, entity_type: str) -> EntityDeclaration | None:
        return next((e for e in self.entities if e.type == entity_type), None)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


DIGEST_KEYS = ("service", "version", "description", "operations", "entities")


def canonical_json(value: Any) -> bytes:
    """Keys sorted, no whitespace, UTF-8 left as is, whole numbers without a fraction: the form the
    digest is computed over (so `30` and `30.0` are one declaration, whichever language wrote it)."""
    return json.dumps(_whole(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def declaration_digest(body: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


def parse_declaration(data: bytes | str | Mapping[str, Any]) -> ServiceDeclaration:
    """Validate a published declaration; DeclarationError names every problem.

    A digest it carries is checked against the declaration as published (before any parsing changed a
    number's spelling), over the canonical form of the keys in DIGEST_KEYS.
    """
    try:
        raw = json.loads(data) if isinstance(data, bytes | str) else dict(data)
    except (ValueError, RecursionError) as exc:
        raise DeclarationError(f"invalid service declaration: not JSON ({type(exc).__name__})") from exc
    if not isinstance(raw, dict):
        raise DeclarationError("invalid service declaration: it must be one JSON object")
    try:
        declaration = ServiceDeclaration.model_validate(raw)
    except ValidationError as exc:
        raise DeclarationError(str(invalid_message(exc, "service declaration"))) from exc
    except (TypeError, AttributeError, RecursionError) as exc:
        # A shape the checks did not expect (a `required` that is not a list, ...): still the publisher's.
        raise DeclarationError(f"invalid service declaration: {type(exc).__name__}: {exc}") from exc
    if declaration.digest is not None:
        published = declaration_digest({k: raw[k] for k in DIGEST_KEYS if k in raw})
        if declaration.digest not in (published, declaration.computed_digest()):
            raise DeclarationError(
                f"invalid service declaration: digest {declaration.digest} does not match its content "
                f"({published}); compute it as docs/service-contract.md says, or leave it out")
    return declaration


# --- compatibility -------------------------------------------------------------------------------------


def compatibility_problems(old: ServiceDeclaration, new: ServiceDeclaration) -> list[str]:
    """Why `new` may not replace `old` for agents already calling `old`; empty when it may.

    Adding operations, entity types and optional fields is allowed. Removing an operation or a field,
    making a field required, changing a field's type, or changing what an operation is (its mutation,
    entity, entity id field or egress flag) would break agents or the ledger, so it is refused.
    """
    problems: list[str] = []
    for before in old.operations:
        after = new.operation(before.name)
        where = f"{old.service}.{before.name}"
        if after is None:
            problems.append(f"operation {where} was removed")
            continue
        for attribute in ("mutation", "entity_type", "entity_id_field", "egress"):
            was, now = getattr(before, attribute), getattr(after, attribute)
            if was != now:
                problems.append(f"{where}: {attribute} changed from {was!r} to {now!r}")
        problems.extend(_field_problems(where, normalize_schema(before.payload_schema),
                                        normalize_schema(after.payload_schema)))
    for entity in old.entities:
        if new.entity(entity.type) is None:
            problems.append(f"entity type {entity.type!r} was removed")
    return problems


def _field_problems(where: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[str]:
    old_props: Mapping[str, Any] = old.get("properties") or {}
    new_props: Mapping[str, Any] = new.get("properties") or {}
    old_required = set(old.get("required") or [])
    new_required = set(new.get("required") or [])
    for name, prop in old_props.items():
        if name not in new_props:
            yield f"{where}: field {name!r} was removed"
            continue
        if _type_of(prop) != _type_of(new_props[name]):
            yield f"{where}: field {name!r} changed type from {_type_of(prop)} to {_type_of(new_props[name])}"
        else:
            yield from _nested_problems(f"{where}.{name}", prop, new_props[name])
    for name in sorted(new_required - old_required):
        if name in old_props:
            yield f"{where}: field {name!r} became required"
        else:
            yield f"{where}: new field {name!r} is required (a new field must be optional)"


def _nested_problems(where: str, old: Any, new: Any) -> Iterator[str]:
    """The same rule inside an object field and inside an array's items."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return
    if "properties" in old:
        yield from _field_problems(where, old, new)
    old_items, new_items = old.get("items"), new.get("items")
    if isinstance(old_items, Mapping):
        if _type_of(old_items) != _type_of(new_items):
            yield f"{where}: items changed type from {_type_of(old_items)} to {_type_of(new_items)}"
        else:
            yield from _nested_problems(f"{where}[]", old_items, new_items)


def _type_of(prop: Any) -> str:
    if not isinstance(prop, Mapping):
        return "any"
    kind = prop.get("type")
    if isinstance(kind, list):
        return "|".join(sorted(str(k) for k in kind))
    if kind is None and ("enum" in prop or "const" in prop):
        return "enum"
    return str(kind)


def service_names(declarations: Iterable[ServiceDeclaration]) -> tuple[str, ...]:
    return tuple(sorted(d.service for d in declarations))


def operation_specs(declaration: ServiceDeclaration) -> list[OperationSpec]:
    """The gateway's view of each declared operation, its payload schema compiled into a model."""
    specs = []
    for op in declaration.operations:
        where = f"{declaration.service}.{op.name}"
        try:
            model = compile_payload_schema(op.payload_schema, f"{op.mutation}_payload")
        except PayloadSchemaError as exc:
            raise DeclarationError(f"{where}: {exc}") from exc
        except Exception as exc:
            # pydantic refusing a keyword value (a negative maxLength, a lookaround its regex engine lacks,
            # an unhashable enum value): the schema is the publisher's mistake, never the gateway's crash.
            raise DeclarationError(f"{where}: the payload schema cannot be compiled ({type(exc).__name__}: "
                                   f"{str(exc)[:300]}); check its keywords against the contract") from exc
        try:
            specs.append(OperationSpec(
                service=declaration.service, name=op.name, graphql_name=op.mutation,
                entity_type=op.entity_type, payload_model=model, entity_key=op.entity_id_field,
                creates=op.creates, egress=op.egress, description=op.description,
                window_s=op.window_s, inverse=op.inverse.name if op.inverse else None,
                payload_schema=op.payload_schema,
            ))
        except ValueError as exc:
            raise DeclarationError(str(exc)) from exc
    return specs


def build_catalogue(declarations: Iterable[ServiceDeclaration]) -> OperationCatalogue:
    """One catalogue over every service's operations; DeclarationError if two of them collide."""
    specs: list[OperationSpec] = []
    for declaration in sorted(declarations, key=lambda d: d.service):
        specs.extend(operation_specs(declaration))
    try:
        return OperationCatalogue(specs)
    except ValueError as exc:
        raise DeclarationError(str(exc)) from exc
