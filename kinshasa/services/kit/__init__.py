"""The service kit: what a domain service author imports to declare operations, inverses, tables and reads.

Writing a service (see `kinshasa.services.documents`, or `examples/tickets` for one in a package of its
own; `kinshasa new-service NAME` writes a starting point):

1. Tables: declare them on the service's own `MetaData`, entity state as `versioned_table(...)` (an
   update is a new version, a delete a tombstone version); read and write them through `Versions`.
2. `svc = Service("<name>", version=1, metadata=..., domain_tables=[...])`; bump `version` whenever a
   declaration changes (the gateway refuses a changed declaration under an accepted version number).
3. Payloads: pydantic models with `extra="forbid"` and an example (`json_schema_extra={"examples":
   [...]}`); the JSON Schema they publish is what the gateway validates agents' writes against
   (`kit.fields` has field types whose checks the schema says too).
4. Invariants: `check_*` functions raising subclasses of `DomainError` with a `code` and a message
   that says what to do next.
5. Each operation once, beside its forward handler, with its inverse::

       async def rename_back(conn, step: AppliedStep, ctx: CommandContext) -> None: ...

       @svc.operation("rename", payload=RenameDocument, mutation="renameDocument", entity="document",
                      entity_id_field="document_id", inverse=rename_back)
       async def rename(conn, cmd: RenameDocument, ctx: CommandContext) -> dict[str, Any]:
           ...  # checks, new version rows; return the domain data the inverse needs

   or `egress=True` (and no inverse) for an operation that acts outside the system. A missing inverse
   raises at import; `Service.verify()`, run before a service starts, refuses what the gateway would.
6. Reads: `svc.read_model("<entity type>", current=..., versions=..., schema=..., lists=...)` for every
   entity type an operation acts on.
7. Run it: `kinshasa service --module package.module:svc`, or `kinshasa up --service package.module:svc`
   beside the local stack. At start it publishes its declaration on `kinshasa.catalogue`, and agents
   can call its mutations within seconds.

What the kit does, and so what a handler may assume: each command is applied at most once (the
inbox), in its entity's order (one partition per key), in the same transaction as its event's outbox
row, its step record and its receipt. Commands are committed a fetched batch at a time.

What it asks of handlers:

* Every effect goes through `conn`. A handler may run more than once before its command commits
  (when another command of its batch is refused, the batch is rolled back and run again), so a
  forward handler must not act outside the database; an operation that must (send an email) is
  `egress=True`, and a service with egress operations commits each command alone.
* Write versions of a versioned table through `Versions.append`. In a batch, `Versions.current` reads
  each entity once (the batch's entities in one query per table) and learns of new versions from
  `append`; a version inserted another way would not be seen by a later read in the same batch.
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
