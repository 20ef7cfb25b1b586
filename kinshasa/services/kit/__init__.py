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
