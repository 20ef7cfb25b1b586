"""The rules of an agent write as the gateway takes it, whatever the mutation that carries it.

How a catalogued operation's payload is passed (flat arguments or one `input` object), whether the write
takes an idempotency key, who may call it, and its payload checked by the same pydantic model the service
uses, with the service's own words for a bad field where its declared schema gives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from kinshasa.gateway.errors import Forbidden, Invalid, camel, invalid_from_pydantic
from kinshasa.gateway.principals import Principal
from kinshasa.schemas.operations import OperationSpec
from kinshasa.schemas.payloads import error_messages

IDEMPOTENCY_KEY_ARG = "idempotency_key"


def uses_input_object(spec: OperationSpec) -> bool:
    """Creates and payloads of three or more fields take one `input` object; smaller updates, flat args."""
    return spec.creates or len(spec.payload_model.model_fields) > 2


def takes_idempotency_key(spec: OperationSpec) -> bool:
    """Every write takes an idempotency key, unless a payload field already has that name."""
    return IDEMPOTENCY_KEY_ARG not in spec.payload_model.model_fields


def own_arguments(spec: OperationSpec) -> set[str]:
    """The GraphQL arguments of a write that are the gateway's, not the payload's."""
    return {"runId", camel(IDEMPOTENCY_KEY_ARG)} if takes_idempotency_key(spec) else {"runId"}


def check_may_call(principal: Principal, spec: OperationSpec) -> None:
    if not principal.may_call(spec):
        raise Forbidden(
            f"agent {principal.id} has no scope for {spec.command_type}: ask an operator to grant it"
        )


def validate_payload(spec: OperationSpec, values: Mapping[str, Any], prefix: str) -> BaseModel:
    """The payload model of `values`; `prefix` ("input." or "") leads each bad field's path."""
    # Omitted and null optional arguments both mean "use the model's default".
    data = {k: v for k, v in values.items() if v is not None}
    try:
        return spec.payload_model.model_validate(data)
    except ValidationError as exc:
        if spec.payload_schema is None:
            raise invalid_from_pydantic(exc, prefix) from exc
        # The service's own words (errorMessage in its declared schema) where it gave them.
        fields = [(prefix + (".".join(camel(str(p)) for p in loc) or "input"), message)
                  for loc, message in error_messages(spec.payload_schema, exc)]
        summary = "; ".join(f"{path}: {problem}" for path, problem in fields)
        raise Invalid(f"invalid input: {summary}", fields) from exc
