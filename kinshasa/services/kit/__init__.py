"""The service kit: what a domain service author imports to declare operations, inverses, tables and reads.

Writing a service (see `kinshasa.services.documents` for a complete one):

1. Tables: declare them on the service's own `MetaData`, entity state as `versioned_table(...)` (an
   update is a new version, a delete a tombstone version); read and write them through `Versions`.
2. `svc = Service("<name>", metadata=..., domain_tables=[...])`; the name must have operations in
   `kinshasa.schemas.catalogue.CATALOGUE`.
3. Invariants: `check_*` functions raising subclasses of `DomainError` with a `code` and a message
   that says what to do next.
4. Each catalogue operation once, beside its forward handler, with its inverse::

       async def rename_back(conn, step: AppliedStep, ctx: CommandContext) -> None: ...

       @svc.operation("rename", inverse=rename_back)
       async def rename(conn, cmd: RenameDocument, ctx: CommandContext) -> dict[str, Any]:
           ...  # checks, new version rows; return the domain data the inverse needs

   or `@svc.operation("send_email", egress=True)` for egress. A missing inverse raises at import;
   an undeclared catalogue operation stops `Service.verify()`, run before the service starts.
5. Reads: `svc.read_model("<entity type>", current=..., versions=...)` and, if needed,
   `@svc.router` for extra routes.
6. Register it in `kinshasa.services.registry`; `kinshasa service <name>` runs it.

What the kit does, and so what a handler may assume: each command is applied at most once (the
inbox), in its entity's order (one partition per key), in the same transaction as its event's outbox
row, its step record and its receipt. Commands are committed a fetched batch at a time.

What it asks of handlers:

* Every effect goes through `conn`. A handler may run more than once before its command commits
  (when another command of its batch is refused, the batch is rolled back and run again), so a
  forward handler must not act outside the database; an operation that must (send an email) is
  `egress=True`, and a service with egress operations commits each command alone.
* Refuse with a `DomainError` subclass (the command becomes `*.rejected` with its code and message);
  never catch database errors, which belong to the kit's retry and dead-letter handling.
* An inverse refuses (`StateChangedError`) when its entity changed since the forward step. The
  coordinator sends several compensations of one entity at once, newest first; that refusal is what
  stops an older one from being applied over a newer one that did not apply.
"""

from kinshasa.services.kit.context import AppliedStep, CommandContext
from kinshasa.services.kit.declarations import (
    ForwardHandler,
    InverseHandler,
    Operation,
    ReadModel,
    Service,
)
from kinshasa.services.kit.errors import (
    DomainError,
    EntityExistsError,
    EntityNotFoundError,
    MissingInverseError,
    PoisonMessageError,
    ServiceDeclarationError,
    StateChangedError,
    UndeclaredOperationError,
)
from kinshasa.services.kit.store import StepStore, Versions, serialize_on, utc, versioned_table

__all__ = [
    "AppliedStep",
    "CommandContext",
    "DomainError",
    "EntityExistsError",
    "EntityNotFoundError",
    "ForwardHandler",
    "InverseHandler",
    "MissingInverseError",
    "Operation",
    "PoisonMessageError",
    "ReadModel",
    "Service",
    "ServiceDeclarationError",
    "StateChangedError",
    "StepStore",
    "UndeclaredOperationError",
    "Versions",
    "serialize_on",
    "utc",
    "versioned_table",
]
