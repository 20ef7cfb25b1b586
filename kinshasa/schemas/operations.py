"""Operation catalogue types: what each service accepts, which entity it touches, and how agents call it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kinshasa.schemas.envelope import (
    COMPENSATE,
    RUN_SERVICE,
    SEGMENT_RE,
    EventSuffix,
    compensate_type,
    event_type,
    split_type,
)

GRAPHQL_NAME_RE = re.compile(r"^[a-z][A-Za-z0-9]*$")
# Suffix words would make `service.name.applied` ambiguous to split_type, so they are not operation names.
RESERVED_OPERATION_NAMES = frozenset({*EventSuffix, COMPENSATE})


class UnknownOperationError(KeyError):
    """No operation in the catalogue matches the name asked for."""

    def __str__(self) -> str:
        # KeyError would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else "unknown operation"


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """One write an agent may ask for: its service, its GraphQL mutation, its payload and its entity.

    `entity_key` names the payload field holding the target entity's id; it is None when the
    operation creates the entity, because then the gateway mints the id.
    """

    service: str
    name: str
    graphql_name: str
    entity_type: str
    payload_model: type[BaseModel]
    entity_key: str | None
    creates: bool = False
    egress: bool = False
    description: str = ""
    # The service's default quarantine window (None: the policy's) and the name of its declared inverse.
    window_s: float | None = None
    inverse: str | None = None
    # The declared JSON Schema the model was compiled from, for the author's own error messages.
    payload_schema: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError(f"invalid operation {self.service}.{self.name}: " + "; ".join(problems))

    def _problems(self) -> Iterator[str]:
        names = (("service", self.service), ("name", self.name), ("entity_type", self.entity_type))
        for label, value in names:
            if not isinstance(value, str) or not SEGMENT_RE.match(value):
                yield f"{label} {value!r} must be lowercase snake_case starting with a letter"
        if self.service == RUN_SERVICE:
            yield f"service name {RUN_SERVICE!r} is reserved for run lifecycle messages: pick another"
        if self.name in RESERVED_OPERATION_NAMES:
            yield f"operation name {self.name!r} is reserved as a message-type suffix: pick another"
        if not isinstance(self.graphql_name, str) or not GRAPHQL_NAME_RE.match(self.graphql_name):
            yield f"graphql_name {self.graphql_name!r} must be lowerCamelCase, e.g. 'archiveDocument'"
        if not (isinstance(self.payload_model, type) and issubclass(self.payload_model, BaseModel)):
            yield f"payload_model must be a pydantic model class, got {self.payload_model!r}"
            return
        model = self.payload_model.__name__
        if self.payload_model.model_config.get("extra") != "forbid":
            yield f"payload model {model} must set extra='forbid' so misspelt fields are refused, not dropped"
        fields = self.payload_model.model_fields
        if self.creates:
            if self.entity_key is not None:
                yield (
                    f"creates=True but entity_key={self.entity_key!r}: a create operation's entity id is "
                    "minted by the gateway, so set entity_key=None"
                )
        elif self.entity_key is None:
            yield "entity_key is None but creates=False: name the payload field holding the entity id"
        elif self.entity_key not in fields:
            yield (
                f"entity_key {self.entity_key!r} is not a field of {model}; "
                f"fields are: {', '.join(fields) or '(none)'}"
            )
        elif not fields[self.entity_key].is_required():
            yield f"entity_key field {model}.{self.entity_key} must be required: commands need their entity"

    @property
    def command_type(self) -> str:
        """The envelope type of the forward command, e.g. `documents.archive`."""
        return f"{self.service}.{self.name}"

    @property
    def compensate_type(self) -> str:
        """The envelope type of the command that undoes it, e.g. `documents.archive.compensate`."""
        return compensate_type(self.command_type)

    def event_type(self, suffix: EventSuffix | str) -> str:
        """The envelope type of an event about it, e.g. `documents.archive.applied`."""
        return event_type(self.command_type, suffix)

    def entity_id(self, payload: BaseModel) -> str | None:
        """The target entity's id read from a validated payload; None for create operations."""
        if self.entity_key is None:
            return None
        return str(getattr(payload, self.entity_key))


class OperationCatalogue:
    """Every declared operation, looked up by command type or GraphQL name; checked when built."""

    def __init__(self, specs: Iterable[OperationSpec]) -> None:
        self._specs: tuple[OperationSpec, ...] = tuple(specs)
        self._by_type: dict[str, OperationSpec] = {}
        self._by_graphql: dict[str, OperationSpec] = {}
        problems: list[str] = []
        for spec in self._specs:
            if not isinstance(spec, OperationSpec):
                problems.append(f"{spec!r} is not an OperationSpec")
                continue
            if spec.command_type in self._by_type:
                problems.append(f"operation {spec.command_type!r} is declared twice")
            else:
                self._by_type[spec.command_type] = spec
            if spec.graphql_name in self._by_graphql:
                other = self._by_graphql[spec.graphql_name].command_type
                problems.append(
                    f"GraphQL name {spec.graphql_name!r} is used by both {other!r} and {spec.command_type!r}"
                )
            else:
                self._by_graphql[spec.graphql_name] = spec
        if problems:
            raise ValueError("invalid operation catalogue: " + "; ".join(problems))

    def __iter__(self) -> Iterator[OperationSpec]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, command_type: object) -> bool:
        return command_type in self._by_type

    def __repr__(self) -> str:
        return f"OperationCatalogue({', '.join(self._by_type)})"

    @property
    def services(self) -> tuple[str, ...]:
        """Service names in declaration order, each once."""
        return tuple(dict.fromkeys(spec.service for spec in self._specs))

    def get(self, command_type: str) -> OperationSpec | None:
        """The operation for `service.name`, or None."""
        return self._by_type.get(command_type)

    def by_command_type(self, command_type: str) -> OperationSpec:
        """The operation for `service.name`; UnknownOperationError lists the known ones."""
        spec = self._by_type.get(command_type)
        if spec is None:
            known = ", ".join(self._by_type) or "(none)"
            raise UnknownOperationError(f"unknown operation {command_type!r}: known operations are {known}")
        return spec

    def by_graphql_name(self, graphql_name: str) -> OperationSpec:
        """The operation behind a GraphQL mutation name, e.g. `archiveDocument`."""
        spec = self._by_graphql.get(graphql_name)
        if spec is None:
            raise UnknownOperationError(
                f"unknown GraphQL operation {graphql_name!r}: "
                f"known mutations are {', '.join(self._by_graphql) or '(none)'}"
            )
        return spec

    def by_message_type(self, message_type: str) -> OperationSpec:
        """The operation any command, event or compensate type is about (`documents.archive.applied`)."""
        try:
            service, name, _ = split_type(message_type)
        except ValueError as exc:
            raise UnknownOperationError(str(exc)) from exc
        return self.by_command_type(f"{service}.{name}")

    def for_service(self, service: str) -> tuple[OperationSpec, ...]:
        """The operations one service declares, in declaration order (empty for an unknown service)."""
        return tuple(spec for spec in self._specs if spec.service == service)
