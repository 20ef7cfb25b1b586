"""The service under test: its newest declaration from the catalogue, and what the checks ask of it."""

from __future__ import annotations

from dataclasses import dataclass

from kinshasa.conformance.errors import SetupError
from kinshasa.schemas.declaration import (
    DeclarationError,
    OperationDeclaration,
    ServiceDeclaration,
    parse_declaration,
)


@dataclass(frozen=True)
class ServiceUnderTest:
    """A declaration the gateway would accept, with the read API URL the checks call."""

    declaration: ServiceDeclaration
    read_url: str

    @classmethod
    def from_record(cls, service: str, raw: bytes | None, topic: str) -> ServiceUnderTest:
        """The service a catalogue record declares; SetupError saying what to fix if it cannot be checked."""
        where = f"the declaration of {service!r} on {topic}"
        if raw is None:
            raise SetupError(f"{where} was deleted (a tombstone): start the service so it publishes it again")
        try:
            declaration = parse_declaration(raw)
        except DeclarationError as exc:
            raise SetupError(f"{where} is refused as the gateway would refuse it: {exc}; fix it per "
                             "docs/service-contract.md section 9") from exc
        if declaration.service != service:
            raise SetupError(f"{where} names the service {declaration.service!r}: publish it under its own "
                             "name as the record key")
        read_url = declaration.endpoints.read
        if not read_url or not read_url.startswith(("http://", "https://")):
            raise SetupError(f"{where} has no http(s) endpoints.read ({read_url!r}): advertise the read API "
                             "URL, which the checks and the gateway read entities through")
        return cls(declaration, read_url.rstrip("/"))

    @property
    def service(self) -> str:
        return self.declaration.service

    @property
    def operations(self) -> list[OperationDeclaration]:
        return self.declaration.operations

    @property
    def entity_types(self) -> list[str]:
        """The declared entity types, or, if none are declared, those the operations act on."""
        declared = [e.type for e in self.declaration.entities]
        return declared or list(dict.fromkeys(op.entity_type for op in self.operations))

    def command_type(self, op: OperationDeclaration) -> str:
        return f"{self.service}.{op.name}"

    def creator_for(self, entity_type: str) -> OperationDeclaration | None:
        """The first create operation of `entity_type`, preferring one that is not egress."""
        creators = [op for op in self.operations if op.creates and op.entity_type == entity_type]
        return min(creators, key=lambda op: op.egress) if creators else None

    def updates(self) -> list[OperationDeclaration]:
        """Non-create operations whose entity type the kit can create first, in declaration order."""
        return [op for op in self.operations
                if not op.creates and self.creator_for(op.entity_type) is not None]
