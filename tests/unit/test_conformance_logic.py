"""Pure decisions of the conformance kit: declarations, payloads from examples, states, answers, the table."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from kinshasa.conformance.errors import CheckFailed, SetupError
from kinshasa.conformance.report import Check, ConformanceReport, render_table
from kinshasa.conformance.subject import ServiceUnderTest
from kinshasa.conformance.verdicts import (
    answer_problems,
    applied_payload_problems,
    compensate_echo_problems,
    count_command_versions,
    example_payload,
    expected_id,
    forward_payload,
    malformed_payload,
    numbered_payload,
    order_problems,
    refusal_problems,
    replay_payloads,
    state_differences,
    versions_problems,
)
from kinshasa.schemas.declaration import InverseDeclaration, OperationDeclaration
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, new_id, utcnow

TITLE = {"type": "string", "minLength": 1, "maxLength": 200}


def schema(properties: dict[str, Any], required: list[str], example: dict[str, Any],
           closed: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "object", "properties": properties, "required": required,
                            "examples": [example]}
    if closed:
        body["additionalProperties"] = False
    return body


def operation(name: str, entity_id_field: str | None, payload_schema: dict[str, Any],
              egress: bool = False) -> OperationDeclaration:
    return OperationDeclaration(
        name=name, mutation=f"{name}Ticket", entity_type="ticket", entity_id_field=entity_id_field,
        payload_schema=payload_schema, egress=egress,
        inverse=None if egress else InverseDeclaration(name=f"undo_{name}"))


OPEN = operation("open", None, schema({"title": TITLE}, ["title"], {"title": "Printer on fire"}))
RETITLE = operation("retitle", "ticket_id",
                    schema({"ticket_id": {"type": "string"}, "title": TITLE}, ["ticket_id", "title"],
                           {"ticket_id": "t-1", "title": "Printer fixed"}))
CLOSE = operation("close", "ticket_id",
                  schema({"ticket_id": {"type": "string"}}, ["ticket_id"], {"ticket_id": "t-1"}))


def as_json(op: OperationDeclaration) -> dict[str, Any]:
    return op.model_dump(mode="json")


def declaration_body(**changes: Any) -> dict[str, Any]:
    body = {
        "kind": "kinshasa.service/v1", "service": "tickets", "version": 2,
        "description": "Support tickets.",
        "endpoints": {"read": "http://127.0.0.1:8105/", "admin": "http://127.0.0.1:8105"},
        "operations": [as_json(operation("notify", None, OPEN.payload_schema, egress=True)),
                       as_json(OPEN), as_json(CLOSE)],
        "entities": [{"type": "ticket", "schema": {"type": "object"}, "list_by": ["run_id"]}],
    }
    body.update(changes)
    return body


# --- declarations ---------------------------------------------------------------------------------


def published(**changes: Any) -> ServiceUnderTest:
    return ServiceUnderTest.from_record("tickets", json.dumps(declaration_body(**changes)).encode(),
                                        "kinshasa.catalogue")


def test_a_declaration_gives_operations_entity_types_and_the_read_url() -> None:
    decl = published()
    assert decl.read_url == "http://127.0.0.1:8105"
    assert [op.name for op in decl.operations] == ["notify", "open", "close"]
    assert decl.entity_types == ["ticket"]
    assert decl.command_type(decl.operations[2]) == "tickets.close"


def test_without_declared_entities_the_operations_entity_types_are_read() -> None:
    assert published(entities=[]).entity_types == ["ticket"]


def test_the_create_operation_chosen_for_an_entity_type_is_not_egress_when_another_exists() -> None:
    decl = published()
    creator = decl.creator_for("ticket")
    assert creator is not None and creator.name == "open"
    assert decl.creator_for("invoice") is None
    assert [op.name for op in decl.updates()] == ["close"]


@pytest.mark.parametrize(("raw", "says"), [
    (None, "tombstone"),
    # The wording after this prefix is kinshasa.schemas.declaration's, the gateway's own reader.
    (b"{not json", "gateway would refuse"),
    (b"[]", "gateway would refuse"),
    (json.dumps(declaration_body(service="other")).encode(), "record key"),
    (json.dumps(declaration_body(endpoints={"read": "127.0.0.1:8105"})).encode(), "no http"),
    (json.dumps(declaration_body(endpoints={})).encode(), "endpoints.read"),
    (json.dumps(declaration_body(operations=[])).encode(), "gateway would refuse"),
])
def test_an_unusable_declaration_is_a_setup_error_saying_what_to_fix(raw: bytes | None, says: str) -> None:
    with pytest.raises(SetupError, match=says):
        ServiceUnderTest.from_record("tickets", raw, "kinshasa.catalogue")


# --- payloads -------------------------------------------------------------------------------------


def test_the_example_payload_is_a_copy_of_examples_zero() -> None:
    payload = example_payload(OPEN)
    payload["title"] = "changed"
    assert OPEN.payload_schema["examples"][0] == {"title": "Printer on fire"}


def test_an_operation_without_an_example_fails_its_check_asking_for_one() -> None:
    bare = operation("open", None, {"type": "object"})
    with pytest.raises(CheckFailed, match=r"examples\[0\]"):
        example_payload(bare)


def test_a_forward_payload_names_the_target_entity_in_the_entity_id_field() -> None:
    assert forward_payload(RETITLE, "abc") == {"ticket_id": "abc", "title": "Printer fixed"}
    assert forward_payload(OPEN, "abc") == {"title": "Printer on fire"}


def test_a_malformed_payload_adds_a_field_a_closed_schema_refuses() -> None:
    payload, how = malformed_payload(RETITLE, "abc")
    assert payload == {"ticket_id": "abc", "title": "Printer fixed", "conformance_unexpected_field": True}
    assert "undeclared field" in how


def test_the_malformed_field_never_collides_with_a_declared_one() -> None:
    op = operation("odd", None, schema({"conformance_unexpected_field": TITLE}, [],
                                       {"conformance_unexpected_field": "x"}))
    payload, _ = malformed_payload(op, "abc")
    assert "conformance_unexpected_field_" in payload


def test_without_additional_properties_false_the_malformed_payload_drops_a_required_field() -> None:
    op = operation("retitle", "ticket_id", schema(dict(RETITLE.payload_schema["properties"]),
                                                  ["ticket_id", "title"], {"ticket_id": "t", "title": "x"},
                                                  closed=False))
    payload, how = malformed_payload(op, "abc")
    assert payload == {"ticket_id": "abc"}
    assert "'title'" in how


def test_a_schema_that_refuses_nothing_fails_the_malformed_check() -> None:
    op = operation("touch", "ticket_id", schema({"ticket_id": {"type": "string"}}, ["ticket_id"],
                                                {"ticket_id": "t"}, closed=False))
    with pytest.raises(CheckFailed, match="additionalProperties"):
        malformed_payload(op, "abc")


def test_replayed_payloads_differ_in_a_free_text_field_within_its_length() -> None:
    payloads, varied = replay_payloads(RETITLE, "abc", ["71", "72", "73", "74", "75"])
    assert varied
    titles = [p["title"] for p in payloads]
    assert len(set(titles)) == 5 and titles[0] == "Printer fixed #71"
    assert all(p["ticket_id"] == "abc" for p in payloads)


def test_a_patterned_field_is_marked_in_a_way_its_pattern_accepts() -> None:
    ref = {"type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]*$"}
    sku = {"type": "string", "pattern": "^[A-Z0-9]+$"}
    kind = {"type": "string", "enum": ["a"]}
    op = operation("link", None, schema({"from_id": ref, "sku": sku, "kind": kind}, ["from_id"],
                                        {"from_id": "doc-1", "sku": "AB", "kind": "a"}))
    assert numbered_payload(op, "abc", "4821") == {"from_id": "doc-1-4821", "sku": "AB4821", "kind": "a"}


def test_nothing_to_mark_gives_no_numbered_payload() -> None:
    assert numbered_payload(CLOSE, "abc", "1") is None


def test_a_full_length_example_is_cut_to_make_room_for_the_number() -> None:
    op = operation("retitle", "ticket_id",
                   schema({"ticket_id": {"type": "string"}, "title": {"type": "string", "maxLength": 6}},
                          ["ticket_id", "title"], {"ticket_id": "t", "title": "abcdef"}))
    payloads, varied = replay_payloads(op, "abc", ["1", "2"])
    assert varied and [p["title"] for p in payloads] == ["abc #1", "abc #2"]


@pytest.mark.parametrize("constraint", [{"enum": ["low", "high"]}, {"pattern": "^[a-z]+$"},
                                        {"format": "email"}, {"const": "low"}])
def test_fields_that_cannot_be_marked_are_left_so_the_example_is_repeated(constraint: dict[str, Any]) -> None:
    op = operation("set", "ticket_id",
                   schema({"ticket_id": {"type": "string"}, "level": {"type": "string", **constraint}},
                          ["ticket_id", "level"], {"ticket_id": "t", "level": "low"}))
    payloads, varied = replay_payloads(op, "abc", ["1", "2", "3"])
    assert not varied
    assert payloads == [{"ticket_id": "abc", "level": "low"}] * 3


def test_the_entity_id_field_is_never_varied() -> None:
    payloads, varied = replay_payloads(CLOSE, "abc", ["1", "2"])
    assert not varied and payloads == [{"ticket_id": "abc"}, {"ticket_id": "abc"}]


# --- states ---------------------------------------------------------------------------------------


def state(**changes: Any) -> dict[str, Any]:
    base = {"id": "t-1", "version": 3, "title": "a", "status": "open", "run_id": "r1", "command_id": "c1",
            "actor": "agent:a", "recorded_at": "2024-05-01T12:00:00Z"}
    return {**base, **changes}


def test_states_that_differ_only_in_provenance_are_the_same() -> None:
    restored = state(version=5, run_id="r2", command_id="c9", actor="system:coordinator",
                     recorded_at="2024-05-02T00:00:00+00:00", operation="compensate")
    assert state_differences(state(), restored) == []


def test_a_changed_missing_or_unexpected_domain_field_is_named() -> None:
    before = state()
    after = {k: v for k, v in state(title="b", priority=2).items() if k != "status"}
    assert state_differences(before, after) == [
        "priority unexpected (2)", "status missing (expected 'open')", "title is 'b', expected 'a'"]


def test_no_entity_equals_only_no_entity() -> None:
    assert state_differences(None, None) == []
    assert "expected no entity" in state_differences(None, state())[0]
    assert "found no entity" in state_differences(state(), None)[0]


def test_timestamps_compare_as_instants_and_nested_values_compare_whole() -> None:
    a = state(due="2024-05-01T12:00:00Z", tags=["x", {"at": "2024-05-01T12:00:00.000+00:00"}])
    b = state(due="2024-05-01T14:00:00+02:00", tags=["x", {"at": "2024-05-01T12:00:00Z"}])
    assert state_differences(a, b) == []
    assert state_differences(a, state(due="2024-05-01T12:00:01Z", tags=a["tags"])) != []


# --- answers --------------------------------------------------------------------------------------


def command(**changes: Any) -> Envelope:
    fields: dict[str, Any] = dict(
        message_id=new_id(), type="tickets.retitle", run_id="run-1",
        actor=Actor(kind="agent", id="conformance"),
        correlation_id="conformance:apply", entity=EntityRef(service="tickets", type="ticket", id="t-1"),
        occurred_at=utcnow(), payload={"ticket_id": "t-1", "title": "x"},
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    fields.update(changes)
    return Envelope(**fields)


def test_the_expected_event_id_is_the_contracts_uuid5_of_the_compact_json_pair() -> None:
    cause = "9f1c1a2e-0000-4000-8000-000000000001"
    namespace = uuid.UUID("296c86a6-1483-5b7a-a87e-dd0e1594f7cc")
    assert expected_id("applied", cause) == uuid.uuid5(namespace, f'["applied","{cause}"]')


def test_an_event_derived_from_its_command_with_the_deterministic_id_keeps_the_envelope_contract() -> None:
    sent = command()
    event = sent.derive(type="tickets.retitle.applied", actor=sent.actor,
                        message_id=expected_id("applied", sent.message_id), payload={})
    assert answer_problems(sent, event, "applied", sent.message_id) == []


def test_each_envelope_field_the_service_failed_to_keep_is_named() -> None:
    sent = command()
    event = command(message_id=new_id(), type="tickets.retitle.applied", run_id="other",
                    actor=Actor(kind="service", id="tickets"), causation_id=new_id(), traceparent=None)
    problems = " | ".join(answer_problems(sent, event, "applied", sent.message_id))
    for field in ("message_id is", "causation_id is", "run_id not copied", "actor not copied",
                  "traceparent not copied"):
        assert field in problems
    assert "entity" not in problems and "correlation_id" not in problems


def test_an_event_may_carry_the_services_own_span_in_the_commands_trace_but_not_another_trace() -> None:
    sent = command()
    own_span = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    other_trace = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for traceparent, accepted in ((own_span, True), (other_trace, False)):
        event = sent.derive(type="tickets.retitle.applied", actor=sent.actor,
                            message_id=expected_id("applied", sent.message_id), payload={})
        event = event.model_copy(update={"traceparent": traceparent})
        problems = answer_problems(sent, event, "applied", sent.message_id)
        assert (problems == []) is accepted, problems


def test_a_compensate_answer_is_typed_after_the_forward_operation() -> None:
    sent = command(type="tickets.retitle.compensate", actor=Actor(kind="system", id="conformance"),
                   payload={"forward_event_id": str(new_id()), "forward_type": "tickets.retitle.applied"})
    forward = sent.payload["forward_event_id"]
    event = sent.derive(type="tickets.retitle.compensated", actor=sent.actor,
                        message_id=expected_id("compensated", forward), payload=dict(sent.payload))
    assert answer_problems(sent, event, "compensated", forward) == []
    assert compensate_echo_problems(sent, event) == []
    assert compensate_echo_problems(sent, event.model_copy(update={"payload": {}})) != []


def test_an_applied_payload_needs_before_and_after_and_egress_needs_irreversible() -> None:
    assert applied_payload_problems(RETITLE, {"before": state(), "after": state()}) == []
    assert applied_payload_problems(RETITLE, {"after": state()}) == ["payload has no 'before'"]
    assert applied_payload_problems(OPEN, {"before": state(), "after": state()}) == [
        "a create's before must be null"]
    egress = operation("notify", "ticket_id", CLOSE.payload_schema, egress=True)
    assert "irreversible" in applied_payload_problems(egress, {"before": None, "after": None})[0]
    assert applied_payload_problems(egress, {"before": None, "after": None, "irreversible": True}) == []


def test_a_refusal_needs_a_reason_and_for_a_rejection_a_code() -> None:
    assert refusal_problems({"reason": "closed", "code": "TICKET_CLOSED"}, needs_code=True) == []
    assert refusal_problems({"reason": "  "}, needs_code=False) == ["payload has no non-empty reason"]
    assert refusal_problems({"reason": "x"}, needs_code=True) == ["payload has no non-empty code"]


def test_answers_in_the_order_sent_keep_order_and_others_say_which_came_first() -> None:
    a, b, c = new_id(), new_id(), new_id()
    assert order_problems([a, b, c], [a, b, c]) == []
    assert order_problems([a, b, c], [a, c, b]) == ["answered in the order #1, #3, #2"]
    assert order_problems([a, b, c], [a, b]) == ["no answer to command(s) #3"]


def test_a_version_history_needs_its_provenance_fields_and_ends_at_the_current_version() -> None:
    current = state(version=2)
    body = {"entity_type": "ticket", "id": "t-1", "versions": [state(version=1), state(version=2)]}
    assert versions_problems(body, "ticket", "t-1", current) == []
    stale = {**body, "versions": [state(version=1)]}
    assert "newest entry is version 1" in versions_problems(stale, "ticket", "t-1", current)[0]
    bare = {**body, "versions": [{"version": 1}, {"version": 2}]}
    lacking = versions_problems(bare, "ticket", "t-1", current)[0]
    assert "lacks run_id, command_id, actor, recorded_at" in lacking
    assert "expected {entity_type" in versions_problems([], "ticket", "t-1", current)[0]


def test_versions_written_by_one_command_are_counted_case_insensitively() -> None:
    command_id = new_id()
    body = {"versions": [state(command_id=str(command_id).upper()), state(command_id="other")]}
    assert count_command_versions(body, command_id) == 1
    assert count_command_versions(None, command_id) == 0


# --- the report -----------------------------------------------------------------------------------


def test_the_table_aligns_its_columns_and_closes_with_the_counts_alone_on_a_line() -> None:
    report = ConformanceReport("tickets", "run-1", [
        Check("apply:open", True, "applied as 1"),
        Check("compensate_unknown", False, "no answer\nwithin 30s"),
    ])
    lines = report.render().splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert lines[1] == "apply:open          PASS    applied as 1"
    assert lines[2] == "compensate_unknown  FAIL    no answer within 30s"
    assert lines[-1] == "1 passed, 1 failed"
    assert not report.ok


def test_a_report_is_ok_only_when_it_has_checks_and_all_passed() -> None:
    assert ConformanceReport("tickets", "r", [Check("order", True, "")]).ok
    assert not ConformanceReport("tickets", "r", []).ok
    name, passed, detail = ConformanceReport("tickets", "r", [Check("order", True, "d")]).checks[0]
    assert (name, passed, detail) == ("order", True, "d")
    assert render_table([]) == "CHECK  RESULT  DETAIL"
