"""The ledger service: open accounts, post integer-cent entries; inverses close and reverse, never delete."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.schemas.envelope import deterministic_id
from kinshasa.services.kit import (
    AppliedStep,
    CommandContext,
    DomainError,
    EntityExistsError,
    EntityNotFoundError,
    Service,
    StateChangedError,
    Versions,
    utc,
    versioned_table,
)
from kinshasa.services.kit.fields import NOT_BLANK, EntityId, NonZeroAmount

NAME_MAX = 200
MEMO_MAX = 500


class OpenAccount(BaseModel):
    """Open a ledger account in one currency; the gateway mints its id."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [{"name": "Petty cash", "currency": "EUR"}]})
    name: Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX), NOT_BLANK]
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = Field(
        description="ISO 4217 code in upper case, e.g. EUR")


class PostEntry(BaseModel):
    """Post a signed amount to an account: positive credits, negative debits."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "examples": [{"account_id": "acc-1", "amount_cents": 1250, "memo": "coffee"}]})
    account_id: EntityId
    amount_cents: NonZeroAmount = Field(description="signed amount in minor units (cents); never zero")
    memo: Annotated[str, StringConstraints(max_length=MEMO_MAX)] = ""


AccountStatus = Literal["open", "closed"]
OPEN: AccountStatus = "open"
CLOSED: AccountStatus = "closed"
POSTED = "posted"
REVERSAL = "reversal"

metadata = MetaData()
account_versions = versioned_table(
    "account_versions", metadata, "account_id",
    Column("name", String(200), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
)
# Entries are facts, not versions of anything: a posted entry is never changed; undoing it posts a
# reversal that names it. `reverses` is unique, so no entry can be reversed twice.
entries = Table(
    "ledger_entries", metadata,
    Column("entry_id", String(36), primary_key=True),
    Column("account_id", String(128), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("memo", String(MEMO_MAX + 100), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("reverses", String(36), nullable=True, unique=True),
    Column("run_id", String(256), nullable=True),
    Column("command_id", String(36), nullable=False),
    Column("actor", String(300), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Index("ix_ledger_entries_account_id", "account_id"),
)
accounts = Versions(account_versions, "account_id")

ledger = Service("ledger", version=1, metadata=metadata, domain_tables=[account_versions, entries],
                 description="Accounts in one currency and integer-cent entries; undone by reversal.")


# domain errors


class AccountNotFoundError(EntityNotFoundError):
    code = "ACCOUNT_NOT_FOUND"


class AccountExistsError(EntityExistsError):
    code = "ACCOUNT_EXISTS"


class AccountClosedError(DomainError):
    code = "ACCOUNT_CLOSED"


class BalanceNotZeroError(StateChangedError):
    code = "BALANCE_NOT_ZERO"


class EntryReversedError(StateChangedError):
    code = "ENTRY_ALREADY_REVERSED"


# invariants


def check_absent(current: Mapping[str, Any] | None, account_id: str) -> None:
    if current is not None:
        raise AccountExistsError(
            f"account {account_id} already exists: use a fresh id (the gateway mints one per openAccount)"
        )


def check_open(current: dict[str, Any] | None, account_id: str) -> dict[str, Any]:
    if current is None:
        raise AccountNotFoundError(
            f"account {account_id} does not exist: check the id returned by openAccount")
    if current["status"] != OPEN:
        raise AccountClosedError(
            f"account {account_id} is closed and takes no entries: post to an open account")
    return current


def check_zero_balance(account_id: str, balance: int) -> None:
    if balance != 0:
        raise BalanceNotZeroError(
            f"account {account_id} cannot be closed: its balance is {balance} cents; revert the entries "
            "posted to it first (a revert does this newest first)"
        )


async def balance(conn: AsyncConnection, account_id: str) -> int:
    total = (await conn.execute(
        select(func.coalesce(func.sum(entries.c.amount_cents), 0)).where(entries.c.account_id == account_id)
    )).scalar_one()
    return int(total)


async def _entry(conn: AsyncConnection, entry_id: str) -> dict[str, Any] | None:
    row = (await conn.execute(select(entries).where(entries.c.entry_id == entry_id))).mappings().first()
    return None if row is None else dict(row)


async def _reversal_of(conn: AsyncConnection, entry_id: str) -> dict[str, Any] | None:
    row = (await conn.execute(select(entries).where(entries.c.reverses == entry_id))).mappings().first()
    return None if row is None else dict(row)


# operations


async def close_opened(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Inverse of open_account: close it, refused while money sits on it."""
    account_id = step.entity.id
    account = check_open(await accounts.current(conn, account_id), account_id)
    check_zero_balance(account_id, await balance(conn, account_id))
    await accounts.append(conn, account_id, ctx, after=account, name=account["name"],
                          currency=account["currency"], status=CLOSED)


@ledger.operation("open_account", payload=OpenAccount, mutation="openAccount", entity="account",
                  inverse=close_opened,
                  description="Open an account in one currency; returns its new id at once.")
async def open_account(conn: AsyncConnection, cmd: OpenAccount, ctx: CommandContext) -> dict[str, Any]:
    check_absent(await accounts.current(conn, ctx.entity_id), ctx.entity_id)
    await accounts.append(conn, ctx.entity_id, ctx, after=None, name=cmd.name, currency=cmd.currency,
                          status=OPEN)
    return {"account_id": ctx.entity_id, "name": cmd.name, "currency": cmd.currency}


async def reverse_entry(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Inverse of post_entry: post the opposite amount naming the entry ("posted -> reversed")."""
    account_id, entry_id = step.data["account_id"], step.data["entry_id"]
    check_open(await accounts.current(conn, account_id), account_id)
    existing = await _reversal_of(conn, entry_id)
    if existing is not None:
        raise EntryReversedError(f"entry {entry_id} was already reversed by entry {existing['entry_id']}")
    await conn.execute(insert(entries).values(
        entry_id=str(deterministic_id("reversal", entry_id)), account_id=account_id,
        amount_cents=-int(step.data["amount_cents"]), memo=f"reversal of {entry_id}", kind=REVERSAL,
        reverses=entry_id, **ctx.stamp(),
    ))


@ledger.operation("post_entry", payload=PostEntry, mutation="postEntry", entity="account",
                  entity_id_field="account_id", inverse=reverse_entry,
                  description="Post a signed amount in cents to an account. Reverted by a reversing entry.")
async def post_entry(conn: AsyncConnection, cmd: PostEntry, ctx: CommandContext) -> dict[str, Any]:
    check_open(await accounts.current(conn, cmd.account_id), cmd.account_id)
    # The command id names the entry, so the entry and the command that posted it are one fact.
    entry_id = ctx.command_id
    await conn.execute(insert(entries).values(
        entry_id=entry_id, account_id=cmd.account_id, amount_cents=cmd.amount_cents, memo=cmd.memo,
        kind=POSTED, reverses=None, **ctx.stamp(),
    ))
    return {"account_id": cmd.account_id, "entry_id": entry_id, "amount_cents": cmd.amount_cents}


# reads


def _stamp(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"run_id": row["run_id"], "command_id": row["command_id"], "actor": row["actor"],
            "recorded_at": utc(row["recorded_at"])}


def _public_account(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["account_id"], "version": row["version"], "name": row["name"],
            "currency": row["currency"], "status": row["status"], **_stamp(row)}


def _public_entry(row: Mapping[Any, Any], reversed_by: str | None, version: int = 1) -> dict[str, Any]:
    status = REVERSAL if row["kind"] == REVERSAL else ("reversed" if reversed_by else POSTED)
    # An entry's versions are its posting (1) and, once undone, its reversal (2).
    return {"id": row["entry_id"], "version": version, "account_id": row["account_id"],
            "amount_cents": row["amount_cents"],
            "memo": row["memo"], "kind": row["kind"], "status": status, "reverses": row["reverses"],
            "reversed_by": reversed_by, **_stamp(row)}


async def _account_entries(conn: AsyncConnection, account_id: str) -> list[dict[str, Any]]:
    rows = (await conn.execute(
        select(entries).where(entries.c.account_id == account_id)
        .order_by(entries.c.recorded_at, entries.c.entry_id)
    )).mappings().all()
    reversed_by = {r["reverses"]: r["entry_id"] for r in rows if r["reverses"]}
    return [_public_entry(r, reversed_by.get(r["entry_id"])) for r in rows]


def _withdrawn(row: Mapping[str, Any], has_entries: bool) -> bool:
    """A reverted open_account: closed before any money moved. It reads as absent (its history stays
    under /versions), as a reverted create does in every other service."""
    return bool(row["status"] == CLOSED and not has_entries)


async def read_account(conn: AsyncConnection, account_id: str) -> dict[str, Any] | None:
    row = await accounts.current(conn, account_id)
    if row is None:
        return None
    listed = await _account_entries(conn, account_id)
    if _withdrawn(row, bool(listed)):
        return None
    return {**_public_account(row), "balance_cents": sum(e["amount_cents"] for e in listed),
            "entries": listed}


async def account_snapshot(conn: AsyncConnection, account_id: str) -> dict[str, Any] | None:
    """The account and its balance without its entries: what each entry's event shows before -> after."""
    row = await accounts.current(conn, account_id)
    if row is None:
        return None
    has_entries = (await conn.execute(
        select(entries.c.entry_id).where(entries.c.account_id == account_id).limit(1))).first() is not None
    if _withdrawn(row, has_entries):
        return None
    return {**_public_account(row), "balance_cents": await balance(conn, account_id)}


async def read_account_versions(conn: AsyncConnection, account_id: str) -> list[dict[str, Any]]:
    return [_public_account(row) for row in await accounts.history(conn, account_id)]


async def read_entry(conn: AsyncConnection, entry_id: str) -> dict[str, Any] | None:
    row = await _entry(conn, entry_id)
    if row is None:
        return None
    reversal = await _reversal_of(conn, entry_id)
    return _public_entry(row, reversal["entry_id"] if reversal else None, 2 if reversal else 1)


async def entries_of_run(conn: AsyncConnection, run_id: str) -> list[dict[str, Any]]:
    """Every entry a run posted or reversed, oldest first."""
    rows = (await conn.execute(select(entries).where(entries.c.run_id == run_id)
                               .order_by(entries.c.recorded_at, entries.c.entry_id))).mappings().all()
    reversed_by = {r["reverses"]: r["entry_id"] for r in (await conn.execute(
        select(entries.c.entry_id, entries.c.reverses)
        .where(entries.c.reverses.in_([r["entry_id"] for r in rows])))).mappings()}
    return [_public_entry(r, reversed_by.get(r["entry_id"]), 2 if r["entry_id"] in reversed_by else 1)
            for r in rows]


async def read_entry_versions(conn: AsyncConnection, entry_id: str) -> list[dict[str, Any]]:
    """An entry's history: the posting, then the reversal if any ("posted -> reversed")."""
    row = await _entry(conn, entry_id)
    if row is None:
        return []
    reversal = await _reversal_of(conn, entry_id)
    history = [_public_entry(row, None)]
    if reversal is not None:
        history.append(_public_entry(reversal, None, 2))
    return history


ledger.read_model("account", current=read_account, versions=read_account_versions,
                  schema={"type": "object", "properties": {
                      "id": {"type": "string"}, "version": {"type": "integer"}, "name": {"type": "string"},
                      "currency": {"type": "string"}, "status": {"type": "string"},
                      "balance_cents": {"type": "integer"}, "entries": {"type": "array"}}},
                  snapshot=account_snapshot)
ledger.read_model("entry", current=read_entry, versions=read_entry_versions,
                  schema={"type": "object", "properties": {
                      "id": {"type": "string"}, "account_id": {"type": "string"},
                      "amount_cents": {"type": "integer"}, "memo": {"type": "string"},
                      "kind": {"type": "string"}, "status": {"type": "string"}}},
                  lists={"run_id": entries_of_run})


async def domain_state(conn: AsyncConnection) -> dict[str, dict[str, Any]]:
    """Per account: name, currency, status, balance and the entries still standing (posted, not reversed)."""
    rows = (await conn.execute(select(entries.c.entry_id, entries.c.account_id, entries.c.amount_cents,
                                      entries.c.kind, entries.c.reverses))).all()
    reversed_ids = {r.reverses for r in rows if r.reverses}
    balances: dict[str, int] = {}
    standing: dict[str, list[str]] = {}
    for r in rows:
        balances[r.account_id] = balances.get(r.account_id, 0) + int(r.amount_cents)
        if r.kind == POSTED and r.entry_id not in reversed_ids:
            standing.setdefault(r.account_id, []).append(r.entry_id)
    return {row["account_id"]: {"name": row["name"], "currency": row["currency"], "status": row["status"],
                                "balance_cents": balances.get(row["account_id"], 0),
                                "standing_entries": sorted(standing.get(row["account_id"], []))}
            for row in await accounts.all_current(conn)}


def removed(state: Mapping[str, Any]) -> bool:
    """True for the state a reverted open_account leaves behind: closed, empty."""
    return bool(state["status"] == CLOSED and state["balance_cents"] == 0 and not state["standing_entries"])
