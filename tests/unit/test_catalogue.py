"""Unit tests for the operation catalogue the gateway builds from the example services' declarations:
lookups, construction checks, and every payload's limits, checked both by the service's own model and by
the model the gateway compiles from the JSON Schema the service publishes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from kinshasa.schemas.operations import OperationCatalogue, OperationSpec, UnknownOperationError
from kinshasa.services.documents import (
    BODY_MAX,
    TITLE_MAX,
    ArchiveDocument,
    CreateDocument,
    EditDocument,
    RenameDocument,
    UnarchiveDocument,
)
from kinshasa.services.ledger import MEMO_MAX, OpenAccount, PostEntry
from kinshasa.services.links import Link, Unlink
from kinshasa.services.notifier import SendEmail
from kinshasa.services.registry import example_catalogue

CATALOGUE = example_catalogue()
# What each service model is published as, by command type.
MODEL_OF: dict[type[BaseModel], str] = {
    CreateDocument: "documents.create", RenameDocument: "documents.rename", EditDocument: "documents.edit",
    ArchiveDocument: "documents.archive", UnarchiveDocument: "documents.unarchive",
    OpenAccount: "ledger.open_account", PostEntry: "ledger.post_entry", Link: "links.link",
    Unlink: "links.unlink", SendEmail: "notifier.send_email",
}
# Checks JSON Schema cannot say (two fields compared): the service alone refuses these.
SERVICE_ONLY = {(Link, "to_id")}

CONTRACT = {
    # graphql name: (command type, entity type, entity key, creates, egress)
    "createDocument": ("documents.create", "document", None, True, False),
    "renameDocument": ("documents.rename", "document", "document_id", False, False),
    "editDocument": ("documents.edit", "document", "document_id", False, False),
    "archiveDocument": ("documents.archive", "document", "document_id", False, False),
    "unarchiveDocument": ("documents.unarchive", "document", "document_id", False, False),
    "openAccount": ("ledger.open_account", "account", None, True, False),
    "postEntry": ("ledger.post_entry", "account", "account_id", False, False),
    "link": ("links.link", "link", None, True, False),
    "unlink": ("links.unlink", "link", "link_id", False, False),
    "sendEmail": ("notifier.send_email", "email", None, True, True),
}

VALID: dict[type[BaseModel], dict[str, Any]] = {
    CreateDocument: {"title": "Q3 plan", "body": "draft"},
    RenameDocument: {"document_id": "doc-1", "title": "Q3 plan v2"},
    EditDocument: {"document_id": "doc-1", "body": ""},
    ArchiveDocument: {"document_id": "doc-1"},
    UnarchiveDocument: {"document_id": "doc-1"},
    OpenAccount: {"name": "Operating", "currency": "EUR"},
    PostEntry: {"account_id": "acc-1", "amount_cents": -1250, "memo": "refund"},
    Link: {"from_id": "doc-1", "to_id": "doc-2", "kind": "references"},
    Unlink: {"link_id": "lnk-1"},
    SendEmail: {"to": "ops@example.org", "subject": "Run tripped", "body": "details"},
}


class _Rename(BaseModel):
    model_config = ConfigDict(extra="forbid")
    document_id: str
    title: str


class _Loose(BaseModel):
    document_id: str


def spec(**overrides: Any) -> OperationSpec:
    fields: dict[str, Any] = {
        "service": "documents", "name": "rename", "graphql_name": "renameDocument",
        "entity_type": "document", "payload_model": _Rename, "entity_key": "document_id",
    }
    fields.update(overrides)
    return OperationSpec(**fields)


def test_catalogue_matches_the_public_contract() -> None:
    assert {s.graphql_name for s in CATALOGUE} == set(CONTRACT)
    for graphql_name, (command_type, entity_type, entity_key, creates, egress) in CONTRACT.items():
        found = CATALOGUE.by_graphql_name(graphql_name)
        assert found is CATALOGUE.by_command_type(command_type)
        assert (found.entity_type, found.entity_key, found.creates, found.egress) == (
            entity_type, entity_key, creates, egress,
        )
        assert found.description
    assert CATALOGUE.services == ("documents", "ledger", "links", "notifier")
    assert len(CATALOGUE) == len(CONTRACT)


def test_every_payload_model_has_a_valid_example() -> None:
    assert set(MODEL_OF.values()) == {s.command_type for s in CATALOGUE}
    for model, example in VALID.items():
        assert model.model_validate(example).model_dump() == {**example}
        compiled = CATALOGUE.by_command_type(MODEL_OF[model]).payload_model
        assert compiled.model_validate(example).model_dump() == {**example}


def test_lookups() -> None:
    archive = CATALOGUE.by_command_type("documents.archive")
    assert archive.command_type == "documents.archive"
    assert archive.compensate_type == "documents.archive.compensate"
    assert archive.event_type("applied") == "documents.archive.applied"
    assert CATALOGUE.by_message_type("documents.archive.compensated") is archive
    assert CATALOGUE.by_message_type("documents.archive.compensate") is archive
    assert CATALOGUE.get("documents.archive") is archive
    assert CATALOGUE.get("documents.shred") is None
    assert "documents.archive" in CATALOGUE and "documents.shred" not in CATALOGUE
    assert [s.name for s in CATALOGUE.for_service("documents")] == [
        "create", "rename", "edit", "archive", "unarchive",
    ]
    assert CATALOGUE.for_service("nowhere") == ()
    assert archive.entity_id(ArchiveDocument(document_id="doc-9")) == "doc-9"
    assert archive.entity_id(archive.payload_model(document_id="doc-9")) == "doc-9"
    assert CATALOGUE.by_graphql_name("createDocument").entity_id(CreateDocument(title="t")) is None


def test_unknown_lookups_list_what_exists() -> None:
    with pytest.raises(UnknownOperationError, match=r"'documents\.shred'.*documents\.archive"):
        CATALOGUE.by_command_type("documents.shred")
    with pytest.raises(KeyError, match="archiveDocument"):
        CATALOGUE.by_graphql_name("shredDocument")
    with pytest.raises(UnknownOperationError, match="malformed message type"):
        CATALOGUE.by_message_type("nonsense")
    error = UnknownOperationError("unknown operation 'x'")
    assert str(error) == "unknown operation 'x'"


def test_valid_spec_and_empty_catalogue() -> None:
    assert spec().command_type == "documents.rename"
    empty = OperationCatalogue([])
    assert len(empty) == 0 and list(empty) == [] and empty.services == ()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"creates": True}, "creates=True but entity_key='document_id'"),
        ({"entity_key": None}, "name the payload field holding the entity id"),
        ({"entity_key": "doc_id"}, "'doc_id' is not a field of _Rename; fields are: document_id, title"),
        ({"payload_model": _Loose}, "extra='forbid'"),
        ({"payload_model": dict}, "pydantic model class"),
        ({"service": "Documents"}, "service 'Documents' must be lowercase snake_case"),
        ({"name": "re-name"}, "name 're-name'"),
        ({"entity_type": ""}, "entity_type ''"),
        ({"graphql_name": "RenameDocument"}, "lowerCamelCase"),
        ({"graphql_name": "rename_document"}, "lowerCamelCase"),
        ({"service": "run"}, "reserved for run lifecycle"),
        ({"name": "applied"}, "reserved as a message-type suffix"),
        ({"name": "compensate"}, "reserved as a message-type suffix"),
    ],
)
def test_invalid_spec_is_refused_with_a_reason(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="invalid operation") as caught:
        spec(**overrides)
    assert message in str(caught.value)


def test_entity_key_field_must_be_required() -> None:
    class Optional(BaseModel):
        model_config = ConfigDict(extra="forbid")
        document_id: str = ""

    with pytest.raises(ValueError, match="must be required"):
        spec(payload_model=Optional)


def test_catalogue_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match=r"'documents\.rename' is declared twice"):
        OperationCatalogue([spec(), spec(graphql_name="renameDocumentAgain")])
    with pytest.raises(ValueError, match="GraphQL name 'renameDocument' is used by both"):
        OperationCatalogue([spec(), spec(name="retitle")])
    with pytest.raises(ValueError, match="is not an OperationSpec"):
        OperationCatalogue([spec(), "documents.rename"])  # type: ignore[list-item]


def test_specs_are_immutable() -> None:
    archive = CATALOGUE.by_command_type("documents.archive")
    with pytest.raises(AttributeError):
        archive.egress = True  # type: ignore[misc]


def test_payload_models_are_frozen() -> None:
    payload = ArchiveDocument(document_id="doc-1")
    with pytest.raises(ValidationError):
        payload.document_id = "doc-2"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("model", "changes", "field"),
    [
        (CreateDocument, {"title": ""}, "title"),
        (CreateDocument, {"title": "   "}, "title"),
        (CreateDocument, {"title": "t" * (TITLE_MAX + 1)}, "title"),
        (CreateDocument, {"body": "b" * (BODY_MAX + 1)}, "body"),
        (CreateDocument, {"title": None}, "title"),
        (CreateDocument, {"document_id": "doc-1"}, "document_id"),
        (RenameDocument, {"document_id": ""}, "document_id"),
        (RenameDocument, {"document_id": "has space"}, "document_id"),
        (RenameDocument, {"document_id": "d" * 129}, "document_id"),
        (RenameDocument, {"title": "t" * (TITLE_MAX + 1)}, "title"),
        (EditDocument, {"body": "b" * (BODY_MAX + 1)}, "body"),
        (EditDocument, {"body": 42}, "body"),
        (ArchiveDocument, {"document_id": None}, "document_id"),
        (ArchiveDocument, {"documentId": "doc-1"}, "documentId"),
        (UnarchiveDocument, {"reason": "x"}, "reason"),
        (OpenAccount, {"name": ""}, "name"),
        (OpenAccount, {"currency": "eur"}, "currency"),
        (OpenAccount, {"currency": "EURO"}, "currency"),
        (OpenAccount, {"currency": "E1R"}, "currency"),
        (PostEntry, {"amount_cents": 0}, "amount_cents"),
        (PostEntry, {"amount_cents": 12.5}, "amount_cents"),
        (PostEntry, {"amount_cents": "100"}, "amount_cents"),
        (PostEntry, {"amount_cents": True}, "amount_cents"),
        (PostEntry, {"amount_cents": 10**16}, "amount_cents"),
        (PostEntry, {"memo": "m" * (MEMO_MAX + 1)}, "memo"),
        (PostEntry, {"account_id": ""}, "account_id"),
        (Link, {"to_id": "doc-1"}, "to_id"),
        (Link, {"kind": "References"}, "kind"),
        (Link, {"kind": ""}, "kind"),
        (Link, {"from_id": ""}, "from_id"),
        (Unlink, {"link_id": ""}, "link_id"),
        (SendEmail, {"to": "not-an-address"}, "to"),
        (SendEmail, {"to": "two@@example.org"}, "to"),
        (SendEmail, {"to": "ops@example.org\nBcc: all@example.org"}, "to"),
        (SendEmail, {"to": "ops@localhost"}, "to"),
        (SendEmail, {"subject": "Hi\r\nBcc: all@example.org"}, "subject"),
        (SendEmail, {"subject": ""}, "subject"),
        (SendEmail, {"body": "b" * (BODY_MAX + 1)}, "body"),
    ],
)
def test_payload_model_rejects_bad_input_naming_the_field(
    model: type[BaseModel], changes: dict[str, Any], field: str
) -> None:
    compiled = CATALOGUE.by_command_type(MODEL_OF[model]).payload_model
    checkers = [model] if (model, field) in SERVICE_ONLY else [model, compiled]
    for checker in checkers:
        with pytest.raises(ValidationError) as caught:
            checker.model_validate({**VALID[model], **changes})
        locations = {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}
        assert field in locations, checker


@pytest.mark.parametrize("model", list(VALID))
def test_payload_model_reports_missing_required_fields(model: type[BaseModel]) -> None:
    required = {name for name, info in model.model_fields.items() if info.is_required()}
    assert required, f"{model.__name__} should require at least one field"
    with pytest.raises(ValidationError) as caught:
        model.model_validate({})
    assert {str(error["loc"][0]) for error in caught.value.errors()} == required
    with pytest.raises(ValidationError) as caught:
        CATALOGUE.by_command_type(MODEL_OF[model]).payload_model.model_validate({})
    assert {str(error["loc"][0]) for error in caught.value.errors()} == required


def test_payload_messages_say_what_to_do() -> None:
    with pytest.raises(ValidationError, match="do not send it"):
        PostEntry(account_id="acc-1", amount_cents=0)
    with pytest.raises(ValidationError, match=r"name@example\.org"):
        SendEmail(to="bob", subject="s")
    with pytest.raises(ValidationError, match="remove line breaks"):
        SendEmail(to="bob@example.org", subject="a\nb")


def test_the_gateway_says_the_services_own_words() -> None:
    from kinshasa.schemas.payloads import error_messages

    cases = [
        ("ledger.post_entry", {"account_id": "acc-1", "amount_cents": 0}, "amount_cents", "do not send it"),
        ("notifier.send_email", {"to": "bob", "subject": "s"}, "to", "name@example.org"),
        ("notifier.send_email", {"to": "b@example.org", "subject": "a\nb"}, "subject", "remove line breaks"),
        ("documents.create", {"title": "   "}, "title", "more than whitespace"),
    ]
    for command_type, payload, field, words in cases:
        spec = CATALOGUE.by_command_type(command_type)
        with pytest.raises(ValidationError) as caught:
            spec.payload_model.model_validate(payload)
        assert spec.payload_schema is not None
        messages = dict(error_messages(spec.payload_schema, caught.value))
        assert words in messages[(field,)], messages


def _declaration(payload_schema: dict[str, Any], **operation: Any) -> dict[str, Any]:
    return {"service": "widgets", "version": 1, "operations": [{
        "name": "open", "mutation": "openWidget", "entity_type": "widget", "payload_schema": payload_schema,
        "inverse": {"name": "close"}, **operation}]}


def _closed(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, **more}


@pytest.mark.parametrize("schema", [
    _closed({"n": {"type": "string", "minLength": "x"}}),
    _closed({"n": {"type": "string", "maxLength": -1}}),
    _closed({"n": {"type": "array", "items": "string"}}),
    _closed({"n": {"enum": [{"a": 1}]}}),
    _closed({"n": {"anyOf": [{"type": "null"}, {"type": "null"}]}}),
    _closed({"id": {"type": "string"}}, required=5),
])
def test_a_hostile_payload_schema_is_a_declaration_error_never_a_crash(schema: dict[str, Any]) -> None:
    from kinshasa.schemas.declaration import DeclarationError, build_catalogue, parse_declaration

    with pytest.raises(DeclarationError):
        build_catalogue([parse_declaration(_declaration(schema, entity_id_field=None))])
    with pytest.raises(DeclarationError):
        parse_declaration(b"[" * 100_000)
    # Definitions that are not an object are ignored, not a crash.
    odd = {"type": "object", "additionalProperties": False, "$defs": [1], "properties": {}}
    assert len(build_catalogue([parse_declaration(_declaration(odd, entity_id_field=None))])) == 1


def test_compatibility_sees_through_nullable_refs_and_items() -> None:
    from kinshasa.schemas.declaration import compatibility_problems, parse_declaration

    def version(n: int, props: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
        schema = {"type": "object", "additionalProperties": False, "properties": props,
                  **({"$defs": defs} if defs else {})}
        return parse_declaration({**_declaration(schema), "version": n})

    nullable_int = {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert compatibility_problems(version(1, {"n": nullable_int}),
                                  version(2, {"n": {"anyOf": [{"type": "string"}, {"type": "null"}]}}))
    assert compatibility_problems(version(1, {"n": nullable_int}),
                                  version(2, {"n": {"type": ["integer", "null"]}})) == []
    assert compatibility_problems(version(1, {"tags": {"type": "array", "items": {"type": "string"}}}),
                                  version(2, {"tags": {"type": "array", "items": {"type": "integer"}}}))
    address = {"type": "object", "properties": {"street": {"type": "string"}}}
    moved = {"type": "object", "properties": {"zip": {"type": "string"}}, "required": ["zip"]}
    problems = compatibility_problems(version(1, {"a": {"$ref": "#/$defs/A"}}, {"A": address}),
                                      version(2, {"a": {"$ref": "#/$defs/A"}}, {"A": moved}))
    assert any("street" in p for p in problems) and any("zip" in p for p in problems)
