"""The kit's error families: domain refusals (they become events) and declaration mistakes (no start)."""

from __future__ import annotations

from kinshasa.schemas.envelope import InvalidMessage


class DomainError(Exception):
    """An invariant refused a command or an inverse; the kit turns it into `*.rejected` or
    `*.compensation_failed`, never into a crash or a retry.

    Subclasses set `code` (machine-readable, upper snake case) and give a message that says what the
    caller can do next.
    """

    code = "DOMAIN_ERROR"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EntityNotFoundError(DomainError):
    """The command names an entity this service has never seen (or that was deleted)."""

    code = "NOT_FOUND"


class EntityExistsError(DomainError):
    """A create command names an id that is already taken."""

    code = "ALREADY_EXISTS"


class StateChangedError(DomainError):
    """An inverse cannot run because the entity changed since the forward step."""

    code = "STATE_CHANGED"


class ServiceDeclarationError(Exception):
    """A service's operation declarations are incomplete or inconsistent; the service refuses to start."""


class MissingInverseError(ServiceDeclarationError):
    """A non-egress operation was declared without an inverse: it could never be reverted."""


class UndeclaredOperationError(ServiceDeclarationError):
    """The operation catalogue lists an operation the service did not declare a handler for."""


class PoisonMessageError(InvalidMessage):
    """A valid envelope this service can never handle (an event, another service's command, no entity).

    An InvalidMessage, so the DLQ guard dead-letters it at once instead of retrying what cannot succeed.
    """
