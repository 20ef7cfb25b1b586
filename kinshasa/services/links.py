"""The links service: named relations between entities; link and unlink are each other's inverse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator
from sqlalchemy import Column, Index, MetaData, String
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
    serialize_on,
    versioned_table,
)
from kinshasa.services.kit.fields import ENTITY_ID_MAX, EntityId

LinkKind = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]*$")]


class Link(BaseModel):
    """Link two entities with a named relation; the gateway mints the link's id."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "examples": [{"from_id": "doc-1", "to_id": "doc-2", "kind": "references"}]})
    from_id: EntityId
    to_id: EntityId
    kind: LinkKind = Field(description="relation name in lower case, e.g. `references`")

    # Checked here, in the service: JSON Schema cannot compare two fields, so the gateway accepts the
    # write and the service rejects it with this reason.
    @field_validator("to_id")
    @classmethod
    def _distinct_ends(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("from_id"):
            raise ValueError("is the same entity as from_id: a link needs two different ends")
        return value


class Unlink(BaseModel):
    """Remove a link."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "examples": [{"link_id": "l-1"}]})
    link_id: EntityId


LinkStatus = Literal["active", "removed"]
ACTIVE: LinkStatus = "active"
REMOVED: LinkStatus = "removed"

metadata = MetaData()
link_versions = versioned_table(
    "link_versions", metadata, "link_id",
    Column("from_id", String(ENTITY_ID_MAX), nullable=False),
    Column("to_id", String(ENTITY_ID_MAX), nullable=False),
    Column("kind", String(64), nullable=False),
    # Unlinking writes a 'removed' version (a tombstone); relinking writes 'active' again.
    Column("status", String(16), nullable=False),
    Index("ix_link_versions_ends", "from_id", "to_id", "kind"),
)
versions = Versions(link_versions, "link_id")

links = Service("links", version=1, metadata=metadata, domain_tables=[link_versions],
                description="Named relations between any two entities.")


# domain errors


class LinkNotFoundError(EntityNotFoundError):
    code = "LINK_NOT_FOUND"


class LinkExistsError(EntityExistsError):
    code = "LINK_EXISTS"


class DuplicateLinkError(DomainError):
    code = "LINK_DUPLICATE"


class LinkRemovedError(DomainError):
    code = "LINK_REMOVED"


class LinkChangedError(StateChangedError):
    code = "LINK_CHANGED"


# invariants


def check_absent(current: Mapping[str, Any] | None, link_id: str) -> None:
    if current is not None:
        raise LinkExistsError(
            f"link {link_id} already exists: use a fresh id (the gateway mints one per link)")


def check_exists(current: dict[str, Any] | None, link_id: str) -> dict[str, Any]:
    if current is None:
        raise LinkNotFoundError(f"link {link_id} does not exist: check the id returned by link")
    return current


def check_active(link: Mapping[str, Any]) -> None:
    if link["status"] != ACTIVE:
        raise LinkRemovedError(f"link {link['link_id']} is already removed: nothing to unlink")


async def check_no_duplicate(conn: AsyncConnection, from_id: str, to_id: str, kind: str,
                             except_id: str | None = None) -> None:
    """At most one active link per (from, to, kind): a second one would be the same fact twice."""
    await serialize_on(conn, "links", from_id, to_id, kind)
    c = link_versions.c
    same_ends = await versions.all_current(conn, c.from_id == from_id, c.to_id == to_id, c.kind == kind)
    for other in same_ends:
        if other["status"] == ACTIVE and other["link_id"] != except_id:
            raise DuplicateLinkError(
                f"{from_id} is already linked to {to_id} as {kind!r} by link {other['link_id']}: "
                "reuse that link instead of creating another"
            )


def _data(link: Mapping[str, Any]) -> dict[str, Any]:
    return {"link_id": link["link_id"], "from_id": link["from_id"], "to_id": link["to_id"],
            "kind": link["kind"]}


async def _write(conn: AsyncConnection, link: Mapping[str, Any], ctx: CommandContext,
                 status: LinkStatus, *, new: bool = False) -> None:
    """The next version of `link`, which is the current version read in this transaction (or, when
    `new`, the first one)."""
    await versions.append(conn, link["link_id"], ctx, after=None if new else link, from_id=link["from_id"],
                          to_id=link["to_id"], kind=link["kind"], status=status)


# operations


async def unlink_created(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Inverse of link: remove it, provided it is still the active link this step made."""
    link = check_exists(await versions.current(conn, step.entity.id), step.entity.id)
    if link["status"] != ACTIVE:
        raise LinkChangedError(
            f"link {link['link_id']} was removed since (by command {link['command_id']}): nothing to undo; "
            "revert that unlink first if it was wrong"
        )
    await _write(conn, link, ctx, REMOVED)


@links.operation("link", payload=Link, mutation="link", entity="link", inverse=unlink_created,
                 description="Link two entities with a named relation; returns the new link id at once.")
async def link(conn: AsyncConnection, cmd: Link, ctx: CommandContext) -> dict[str, Any]:
    check_absent(await versions.current(conn, ctx.entity_id), ctx.entity_id)
    await check_no_duplicate(conn, cmd.from_id, cmd.to_id, cmd.kind)
    row = {"link_id": ctx.entity_id, "from_id": cmd.from_id, "to_id": cmd.to_id, "kind": cmd.kind}
    await _write(conn, row, ctx, ACTIVE, new=True)
    return _data(row)


async def relink(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Inverse of unlink: restore the link, unless it is back already or another link took its place."""
    link = check_exists(await versions.current(conn, step.entity.id), step.entity.id)
    if link["status"] != REMOVED:
        raise LinkChangedError(f"link {link['link_id']} is active again (by command {link['command_id']})")
    await check_no_duplicate(conn, link["from_id"], link["to_id"], link["kind"], except_id=link["link_id"])
    await _write(conn, link, ctx, ACTIVE)


@links.operation("unlink", payload=Unlink, mutation="unlink", entity="link", entity_id_field="link_id",
                 inverse=relink, description="Remove a link. Reverted by restoring it.")
async def unlink(conn: AsyncConnection, cmd: Unlink, ctx: CommandContext) -> dict[str, Any]:
    current = check_exists(await versions.current(conn, cmd.link_id), cmd.link_id)
    check_active(current)
    await _write(conn, current, ctx, REMOVED)
    return _data(current)


# reads


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["link_id"], "version": row["version"], "from_id": row["from_id"], "to_id": row["to_id"],
            "kind": row["kind"], "status": row["status"], "run_id": row["run_id"],
            "command_id": row["command_id"], "actor": row["actor"], "recorded_at": row["recorded_at"]}


async def read_link(conn: AsyncConnection, link_id: str) -> dict[str, Any] | None:
    row = await versions.current(conn, link_id)
    return None if row is None or row["status"] == REMOVED else _public(row)


async def read_link_versions(conn: AsyncConnection, link_id: str) -> list[dict[str, Any]]:
    return [_public(row) for row in await versions.history(conn, link_id)]


async def active_links_of(conn: AsyncConnection, entity_id: str) -> list[dict[str, Any]]:
    """Active links with `entity_id` at either end, for the gateway's `links(entityId)` read."""
    c = link_versions.c
    touching = await versions.all_current(conn, (c.from_id == entity_id) | (c.to_id == entity_id))
    return [_public(row) for row in touching if row["status"] == ACTIVE]


links.read_model("link", current=read_link, versions=read_link_versions,
                 schema={"type": "object", "properties": {
                     "id": {"type": "string"}, "version": {"type": "integer"},
                     "from_id": {"type": "string"}, "to_id": {"type": "string"},
                     "kind": {"type": "string"}, "status": {"type": "string"}}},
                 lists={"entity_id": active_links_of})


async def domain_state(conn: AsyncConnection) -> dict[str, dict[str, Any]]:
    return {row["link_id"]: {"from_id": row["from_id"], "to_id": row["to_id"], "kind": row["kind"],
                             "status": row["status"]}
            for row in await versions.all_current(conn)}


def removed(state: Mapping[str, Any]) -> bool:
    return bool(state["status"] == REMOVED)
