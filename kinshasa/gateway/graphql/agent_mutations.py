"""Agent mutations generated from the operation catalogue: one typed mutation per catalogued operation.

Each payload model becomes typed GraphQL arguments (camelCase), validated by the same pydantic model the
services use, so an operation a service declares appears here without a hand-written resolver. Create
operations and payloads of three or more fields take one `input` object (`createOrder(runId, input:
{customer, note})`); smaller updates take flat arguments (`renameOrder(runId, orderId, name)`).
"""

import inspect
import types
import typing
from typing import Annotated, Any, Union

import annotated_types
import strawberry
from pydantic.fields import FieldInfo
from strawberry.scalars import JSON

from kinshasa.gateway import idempotency
from kinshasa.gateway.agent_writes import (
    IDEMPOTENCY_KEY_ARG,
    check_may_call,
    takes_idempotency_key,
    uses_input_object,
    validate_payload,
)
from kinshasa.gateway.arguments import INT32
from kinshasa.gateway.graphql.permissions import ctx
from kinshasa.gateway.graphql.scalars import Long
from kinshasa.gateway.graphql.types import CommandReceipt
from kinshasa.gateway.graphql.writes import kill_marker
from kinshasa.schemas.operations import OperationSpec


def _strip(annotation: Any) -> tuple[Any, bool]:
    """(core type, optional?) of a pydantic annotation: Annotated and Optional removed."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            annotation = args[0] if len(args) == 1 else Any
        else:
            return annotation, optional


def _int_fits_32(info: FieldInfo) -> bool:
    low = high = None
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge | annotated_types.Gt):
            low = getattr(meta, "ge", getattr(meta, "gt", None))
        if isinstance(meta, annotated_types.Le | annotated_types.Lt):
            high = getattr(meta, "le", getattr(meta, "lt", None))
    return low is not None and high is not None and -INT32 - 1 <= low and high <= INT32


def graphql_type(info: FieldInfo) -> Any:
    """The GraphQL argument type for one pydantic field; constraints stay with pydantic."""
    core, _ = _strip(info.annotation)
    if typing.get_origin(core) is typing.Literal and all(isinstance(v, str) for v in typing.get_args(core)):
        return str  # a declared enum of words: the payload model checks the value
    if core is bool:
        return bool
    if core is int:
        return int if _int_fits_32(info) else Long
    if core is float:
        return float
    if core is str:
        return str
    return JSON


def argument_type(name: str, info: FieldInfo) -> Any:
    # Entity references are IDs to clients, whatever their constraints inside the payload model.
    gql = graphql_type(info)
    return strawberry.ID if gql is str and name.endswith("_id") else gql


def _pascal(name: str) -> str:
    return name[:1].upper() + name[1:]


def build_input_type(spec: OperationSpec) -> type:
    """`CreateDocumentInput { title: String!, body: String }` from the payload model."""
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {"__module__": __name__}
    for name, info in spec.payload_model.model_fields.items():
        gql = argument_type(name, info)
        if info.is_required():
            annotations[name] = gql
        else:
            annotations[name] = gql | None
            namespace[name] = strawberry.field(default=strawberry.UNSET, description=info.description)
            continue
        if info.description:
            namespace[name] = strawberry.field(description=info.description)
    namespace["__annotations__"] = annotations
    cls = types.new_class(f"{_pascal(spec.graphql_name)}Input", (), {}, lambda ns: ns.update(namespace))
    return strawberry.input(cls, description=f"Input of {spec.graphql_name}: {spec.description}")


def _given(value: Any) -> Any:
    # An omitted optional argument (UNSET) reads as null: both mean "use the model's default".
    return None if value is strawberry.UNSET else value


def build_agent_mutation(spec: OperationSpec) -> Any:
    """One Strawberry mutation field for one catalogued operation."""
    fields = spec.payload_model.model_fields
    params = [
        inspect.Parameter("info", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=strawberry.Info),
        inspect.Parameter("run_id", inspect.Parameter.KEYWORD_ONLY, annotation=strawberry.ID),
    ]
    if uses_input_object(spec):
        input_type = build_input_type(spec)
        params.append(inspect.Parameter("input", inspect.Parameter.KEYWORD_ONLY, annotation=input_type))

        def collect(kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
            given = kwargs["input"]
            return {name: _given(getattr(given, name, strawberry.UNSET)) for name in fields}, "input."
    else:
        for name, info in fields.items():
            gql = argument_type(name, info)
            if info.is_required():
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=gql))
            else:
                params.append(
                    inspect.Parameter(
                        name, inspect.Parameter.KEYWORD_ONLY, annotation=gql | None, default=strawberry.UNSET
                    )
                )

        def collect(kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
            return {name: _given(kwargs.get(name, strawberry.UNSET)) for name in fields}, ""

    keyed = takes_idempotency_key(spec)
    if keyed:
        params.append(
            inspect.Parameter(
                IDEMPOTENCY_KEY_ARG,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str | None,
                default=None,
            )
        )

    async def resolver(info: strawberry.Info, **kwargs: Any) -> CommandReceipt:
        context = ctx(info)
        principal = context.require_agent()
        check_may_call(principal, spec)
        run_id = str(kwargs["run_id"])
        values, prefix = collect(kwargs)
        key = idempotency.check_key(kwargs.get(IDEMPOTENCY_KEY_ARG)) if keyed else None
        payload = validate_payload(spec, values, prefix)
        receipt = await context.services.writer.submit(principal, spec, run_id, payload, key)
        idempotency.kill_after_commit_if_marked(kill_marker(info), key)
        return CommandReceipt.of(receipt)

    resolver.__name__ = spec.graphql_name
    resolver.__signature__ = inspect.Signature(params, return_annotation=CommandReceipt)  # type: ignore[attr-defined]
    resolver.__annotations__ = {p.name: p.annotation for p in params} | {"return": CommandReceipt}
    return strawberry.mutation(resolver=resolver, name=spec.graphql_name, description=spec.description)
