"""The documents service: create, rename, edit, archive and unarchive, each declared with its inverse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints
from sqlalchemy import Column, MetaData, String, Text
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.services.kit import (
    AppliedStep,
    CommandContext,
    DomainError,
    EntityExistsError,
    EntityNotFoundError,
    Service,
    StateChangedError,
    Versions,
    versioned_table,
)
from kinshasa.services.kit.fields import NOT_BLANK, EntityId

Status = Literal["active", "archived", "deleted"]
ACTIVE: Status = "active"
ARCHIVED: Status = "archived"
DELETED: Status = "deleted"

metadata = MetaData()
document_versions = versioned_table(
    "document_versions", metadata, "document_id",
    Column("title", String(200), nullable=False),
    Column("body", Text, nullable=False),
    # A delete is a version with status 'deleted' (a tombstone); its title and body stay for the history.
    Column("status", String(16), nullable=False),
)
versions = Versions(document_versions, "document_id")

documents = Service("documents", version=1, metadata=metadata, domain_tables=[document_versions],
                     description="Documents with a title and a body; archived documents refuse changes.")

TITLE_MAX = 200
BODY_MAX = 100_000
Title = Annotated[str, StringConstraints(min_length=1, max_length=TITLE_MAX), NOT_BLANK]
Body = Annotated[str, StringConstraints(max_length=BODY_MAX)]


# payloads: what agents send; the gateway validates them against the JSON Schema each one publishes


class CreateDocument(BaseModel):
    """Create a document; the gateway mints its id."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [{"title": "Q3 plan", "body": "Draft"}]})
    title: Title
    body: Body = ""


class RenameDocument(BaseModel):
    """Give an existing document a new title."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [{"document_id": "doc-1", "title": "Q4 plan"}]})
    document_id: EntityId
    title: Title


class EditDocument(BaseModel):
    """Replace the body of an existing document."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [{"document_id": "doc-1", "body": "Final"}]})
    document_id: EntityId
    body: Body


class ArchiveDocument(BaseModel):
    """Archive a document: it stays readable but refuses edits."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [{"document_id": "doc-1"}]})
    document_id: EntityId


class UnarchiveDocument(BaseModel):
    """Bring an archived document back."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [{"document_id": "doc-1"}]})
    document_id: EntityId


class DocumentState(BaseModel):
    """What `GET /entities/document/{id}` answers."""

    id: str
    version: int
    title: str
    body: str
    status: Literal["active", "archived", "deleted"]
    run_id: str | None
    command_id: str
    actor: str
    recorded_at: str


# domain errors


class DocumentNotFoundError(EntityNotFoundError):
    code = "DOCUMENT_NOT_FOUND"


class DocumentExistsError(EntityExistsError):
    code = "DOCUMENT_EXISTS"


class DocumentArchivedError(DomainError):
    code = "DOCUMENT_ARCHIVED"


class DocumentNotArchivedError(DomainError):
    code = "DOCUMENT_NOT_ARCHIVED"


class DocumentChangedError(StateChangedError):
    code = "DOCUMENT_CHANGED"


# invariants


def check_absent(current: Mapping[str, Any] | None, document_id: str) -> None:
    if current is not None:
        raise DocumentExistsError(
            f"document {document_id} already exists: creating it again would overwrite it; "
            "use a fresh id (the gateway mints one per createDocument)"
        )


def check_exists(current: dict[str, Any] | None, document_id: str) -> dict[str, Any]:
    if current is None or current["status"] == DELETED:
        raise DocumentNotFoundError(
            f"document {document_id} does not exist{' any more' if current else ''}: check the id "
            "returned by createDocument"
        )
    return current


def check_not_archived(doc: Mapping[str, Any]) -> None:
    if doc["status"] == ARCHIVED:
        raise DocumentArchivedError(
            f"document {doc['document_id']} is archived and refuses changes: unarchive it first"
        )


def check_archived(doc: Mapping[str, Any]) -> None:
    if doc["status"] != ARCHIVED:
        raise DocumentNotArchivedError(
            f"document {doc['document_id']} is not archived, so it cannot be unarchived")


def check_unchanged(doc: Mapping[str, Any], field: str, expected: Any, what: str) -> None:
    """An inverse may only restore a value if nobody changed it since the forward step."""
    if doc[field] != expected:
        raise DocumentChangedError(
            f"document {doc['document_id']}'s {field} was changed since {what} (by command "
            f"{doc['command_id']}): revert that change first, or fix the document by hand"
        )


async def _current(conn: AsyncConnection, document_id: str) -> dict[str, Any]:
    return check_exists(await versions.current(conn, document_id), document_id)


async def _write(conn: AsyncConnection, doc: Mapping[str, Any], ctx: CommandContext, **changes: Any) -> None:
    values = {"title": doc["title"], "body": doc["body"], "status": doc["status"], **changes}
    await versions.append(conn, doc["document_id"], ctx, after=doc, **values)


# operations: each inverse sits right above the forward handler it undoes


async def delete_created(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Tombstone a document this step created, unless somebody changed it since."""
    doc = await _current(conn, step.entity.id)
    check_unchanged(doc, "title", step.data["title"], "it was created")
    check_unchanged(doc, "body", step.data["body"], "it was created")
    check_not_archived(doc)
    await _write(conn, doc, ctx, status=DELETED)


@documents.operation("create", payload=CreateDocument, mutation="createDocument", entity="document",
                     inverse=delete_created,
                     description="Create a document with a title and a body; returns its new id at once.")
async def create(conn: AsyncConnection, cmd: CreateDocument, ctx: CommandContext) -> dict[str, Any]:
    check_absent(await versions.current(conn, ctx.entity_id), ctx.entity_id)
    await versions.append(conn, ctx.entity_id, ctx, after=None, title=cmd.title, body=cmd.body, status=ACTIVE)
    return {"document_id": ctx.entity_id, "title": cmd.title, "body": cmd.body}


async def rename_back(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    doc = await _current(conn, step.entity.id)
    check_not_archived(doc)
    check_unchanged(doc, "title", step.data["new_title"], "the rename")
    await _write(conn, doc, ctx, title=step.data["old_title"])


@documents.operation("rename", payload=RenameDocument, mutation="renameDocument", entity="document",
                     entity_id_field="document_id", inverse=rename_back,
                     description="Change a document's title. Reverted by restoring the previous title.")
async def rename(conn: AsyncConnection, cmd: RenameDocument, ctx: CommandContext) -> dict[str, Any]:
    doc = await _current(conn, cmd.document_id)
    check_not_archived(doc)
    await _write(conn, doc, ctx, title=cmd.title)
    return {"document_id": cmd.document_id, "old_title": doc["title"], "new_title": cmd.title}


async def restore_body(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    doc = await _current(conn, step.entity.id)
    check_not_archived(doc)
    check_unchanged(doc, "body", step.data["new_body"], "the edit")
    await _write(conn, doc, ctx, body=step.data["old_body"])


@documents.operation("edit", payload=EditDocument, mutation="editDocument", entity="document",
                     entity_id_field="document_id", inverse=restore_body,
                     description="Replace a document's body. Reverted by restoring the previous body.")
async def edit(conn: AsyncConnection, cmd: EditDocument, ctx: CommandContext) -> dict[str, Any]:
    doc = await _current(conn, cmd.document_id)
    check_not_archived(doc)
    await _write(conn, doc, ctx, body=cmd.body)
    return {"document_id": cmd.document_id, "old_body": doc["body"], "new_body": cmd.body}


async def unarchive_again(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Inverse of archive: the document must still be archived."""
    doc = await _current(conn, step.entity.id)
    if doc["status"] != ARCHIVED:
        raise DocumentChangedError(
            f"document {doc['document_id']} was unarchived since (by command {doc['command_id']}): "
            "nothing to undo here; revert that unarchive first if it was wrong"
        )
    await _write(conn, doc, ctx, status=ACTIVE)


@documents.operation("archive", payload=ArchiveDocument, mutation="archiveDocument", entity="document",
                     entity_id_field="document_id", inverse=unarchive_again,
                     description="Archive a document. Reverted by unarchiving it.")
async def archive(conn: AsyncConnection, cmd: ArchiveDocument, ctx: CommandContext) -> dict[str, Any]:
    doc = await _current(conn, cmd.document_id)
    check_not_archived(doc)
    await _write(conn, doc, ctx, status=ARCHIVED)
    return {"document_id": cmd.document_id}


async def archive_again(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Inverse of unarchive: the document must still be active."""
    doc = await _current(conn, step.entity.id)
    if doc["status"] != ACTIVE:
        raise DocumentChangedError(
            f"document {doc['document_id']} was archived again since (by command {doc['command_id']}): "
            "nothing to undo here"
        )
    await _write(conn, doc, ctx, status=ARCHIVED)


@documents.operation("unarchive", payload=UnarchiveDocument, mutation="unarchiveDocument",
                     entity="document", entity_id_field="document_id", inverse=archive_again,
                     description="Unarchive a document. Reverted by archiving it again.")
async def unarchive(conn: AsyncConnection, cmd: UnarchiveDocument, ctx: CommandContext) -> dict[str, Any]:
    doc = await _current(conn, cmd.document_id)
    check_archived(doc)
    await _write(conn, doc, ctx, status=ACTIVE)
    return {"document_id": cmd.document_id}


# reads


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["document_id"], "version": row["version"], "title": row["title"], "body": row["body"],
        "status": row["status"], "run_id": row["run_id"], "command_id": row["command_id"],
        "actor": row["actor"], "recorded_at": row["recorded_at"],
    }


async def read_document(conn: AsyncConnection, document_id: str) -> dict[str, Any] | None:
    row = await versions.current(conn, document_id)
    # A tombstoned document reads as absent; its history stays readable under /versions.
    return None if row is None or row["status"] == DELETED else _public(row)


async def read_document_versions(conn: AsyncConnection, document_id: str) -> list[dict[str, Any]]:
    return [_public(row) for row in await versions.history(conn, document_id)]


documents.read_model("document", current=read_document, versions=read_document_versions, schema=DocumentState)


async def domain_state(conn: AsyncConnection) -> dict[str, dict[str, Any]]:
    """Every document's current title, body and status: what a revert must restore."""
    return {row["document_id"]: {"title": row["title"], "body": row["body"], "status": row["status"]}
            for row in await versions.all_current(conn)}


def removed(state: Mapping[str, Any]) -> bool:
    """True for the state a reverted create leaves behind."""
    return bool(state["status"] == DELETED)
