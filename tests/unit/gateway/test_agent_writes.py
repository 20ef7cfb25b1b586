"""The rules of an agent write: argument shape, idempotency key, scope, and the payload checked."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import BaseModel, ConfigDict

from kinshasa.gateway.agent_writes import (
    check_may_call,
    own_arguments,
    takes_idempotency_key,
    uses_input_object,
    validate_payload,
)
from kinshasa.gateway.errors import Forbidden, Invalid
from kinshasa.gateway.principals import Principal
from kinshasa.schemas.operations import OperationSpec
from kinshasa.services.registry import example_catalogue

SPECS = {spec.command_type: spec for spec in example_catalogue()}


def test_creates_and_payloads_of_three_fields_take_one_input_object() -> None:
    assert uses_input_object(SPECS["documents.create"])  # creates, two fields
    assert uses_input_object(SPECS["ledger.post_entry"])  # three fields
    assert not uses_input_object(SPECS["documents.rename"])  # two fields
    assert not uses_input_object(SPECS["documents.archive"])


class _Keyed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str
    idempotency_key: str


def test_a_payload_field_named_idempotency_key_keeps_its_name_and_the_write_takes_no_key() -> None:
    keyed = dataclasses.replace(
        SPECS["documents.archive"], payload_model=_Keyed, payload_schema=None, entity_key="item_id"
    )
    assert not takes_idempotency_key(keyed)
    assert own_arguments(keyed) == {"runId"}
    assert takes_idempotency_key(SPECS["documents.archive"])
    assert own_arguments(SPECS["documents.archive"]) == {"runId", "idempotencyKey"}


def test_an_agent_without_the_scope_is_told_to_ask_an_operator() -> None:
    spec = SPECS["documents.rename"]
    check_may_call(Principal(id="a", kind="agent", scopes=frozenset({"documents.*"})), spec)
    check_may_call(Principal(id="a", kind="agent", scopes=frozenset({"renameDocument"})), spec)
    with pytest.raises(Forbidden, match=r"agent a has no scope for documents\.rename: ask an operator"):
        check_may_call(Principal(id="a", kind="agent", scopes=frozenset({"ledger.*"})), spec)


def test_null_optional_values_take_the_models_default() -> None:
    payload = validate_payload(SPECS["documents.create"], {"title": "Plan", "body": None}, "input.")
    assert payload.model_dump() == SPECS["documents.create"].payload_model(title="Plan").model_dump()


def _problem(spec: OperationSpec, values: dict[str, object], prefix: str) -> Invalid:
    with pytest.raises(Invalid) as exc:
        validate_payload(spec, values, prefix)
    return exc.value


def test_a_bad_field_is_named_by_its_camel_case_path_under_the_prefix() -> None:
    declared = _problem(SPECS["documents.rename"], {"document_id": "d1"}, "")
    assert [f["path"] for f in declared.extensions["fields"]] == ["title"]
    assert str(declared).startswith("invalid input: title: ")
    nested = _problem(SPECS["ledger.post_entry"], {"account_id": "a1", "memo": "m"}, "input.")
    assert [f["path"] for f in nested.extensions["fields"]] == ["input.amountCents"]


def test_without_a_declared_schema_pydantics_errors_name_the_fields() -> None:
    plain = dataclasses.replace(SPECS["ledger.post_entry"], payload_schema=None)
    problem = _problem(plain, {"account_id": "a1", "memo": "m"}, "input.")
    assert "input.amountCents" in [f["path"] for f in problem.extensions["fields"]]
