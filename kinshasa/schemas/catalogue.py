"""The public contract's operations: one payload model per agent mutation, and the default CATALOGUE."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from kinshasa.schemas.operations import OperationCatalogue, OperationSpec

TITLE_MAX = 200
BODY_MAX = 100_000
NAME_MAX = 200
MEMO_MAX = 500
SUBJECT_MAX = 300
EMAIL_MAX = 254  # RFC 5321's limit on a forward path
ENTITY_ID_MAX = 128
# Kept under 2**53 so the amount survives JavaScript clients and JSON parsers that use doubles.
AMOUNT_CENTS_MAX = 10**15

# Deliberately loose (one @, a dot in the domain, no whitespace): the mail server is the real judge,
# and a stricter regex would refuse valid addresses without a dependency.
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain more than whitespace")
    return value


def _single_line(value: str) -> str:
    # A CR or LF in a mail header would let the sender inject headers of their own.
    if "\r" in value or "\n" in value:
        raise ValueError("must be a single line: remove line breaks")
    return value


def _non_zero(value: int) -> int:
    if value == 0:
        raise ValueError("must not be zero: a zero entry changes nothing, so do not post it")
    return value


def _email(value: str) -> str:
    if not EMAIL_RE.match(value):
        raise ValueError(f"{value!r} is not an email address: use the form name@example.org")
    return value


EntityId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ENTITY_ID_MAX, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"),
    Field(description="id of an existing entity, as returned in CommandReceipt.entityId"),
]
Title = Annotated[str, StringConstraints(min_length=1, max_length=TITLE_MAX), AfterValidator(_not_blank)]
Body = Annotated[str, StringConstraints(max_length=BODY_MAX)]
LinkKind = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]*$")]


class Payload(BaseModel):
    """Base for operation payloads: unknown fields are refused so an agent's typo is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# documents


class CreateDocument(Payload):
    """Create a document; the gateway mints its id."""

    title: Title
    body: Body = ""


class RenameDocument(Payload):
    """Give an existing document a new title."""

    document_id: EntityId
    title: Title


class EditDocument(Payload):
    """Replace the body of an existing document."""

    document_id: EntityId
    body: Body


class ArchiveDocument(Payload):
    """Archive a document: it stays readable but refuses edits."""

    document_id: EntityId


class UnarchiveDocument(Payload):
    """Bring an archived document back."""

    document_id: EntityId


# ledger


class OpenAccount(Payload):
    """Open a ledger account in one currency; the gateway mints its id."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX), AfterValidator(_not_blank)]
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = Field(
        description="ISO 4217 code in upper case, e.g. EUR"
    )


class PostEntry(Payload):
    """Post a signed amount to an account: positive credits, negative debits."""

    account_id: EntityId
    # Strict: a float or a boolean here is a caller bug, not a value to round or coerce.
    amount_cents: Annotated[
        int, Strict(), Field(ge=-AMOUNT_CENTS_MAX, le=AMOUNT_CENTS_MAX), AfterValidator(_non_zero)
    ] = Field(description="signed amount in minor units (cents); never zero")
    memo: Annotated[str, StringConstraints(max_length=MEMO_MAX)] = ""


# links


class Link(Payload):
    """Link two entities with a named relation; the gateway mints the link's id."""

    from_id: EntityId
    to_id: EntityId
    kind: LinkKind = Field(description="relation name in lower case, e.g. `references`")

    @field_validator("to_id")
    @classmethod
    def _distinct_ends(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("from_id"):
            raise ValueError("is the same entity as from_id: a link needs two different ends")
        return value


class Unlink(Payload):
    """Remove a link."""

    link_id: EntityId


# notifier


class SendEmail(Payload):
    """Send an email. Irreversible egress: it waits for operator approval and is never compensated."""

    to: Annotated[str, StringConstraints(min_length=3, max_length=EMAIL_MAX), AfterValidator(_email)]
    subject: Annotated[
        str,
        StringConstraints(min_length=1, max_length=SUBJECT_MAX),
        AfterValidator(_not_blank),
        AfterValidator(_single_line),
    ]
    body: Body = ""


CATALOGUE = OperationCatalogue(
    [
        OperationSpec(
            service="documents", name="create", graphql_name="createDocument", entity_type="document",
            payload_model=CreateDocument, entity_key=None, creates=True,
            description="Create a document with a title and a body; returns its new id at once.",
        ),
        OperationSpec(
            service="documents", name="rename", graphql_name="renameDocument", entity_type="document",
            payload_model=RenameDocument, entity_key="document_id",
            description="Change a document's title. Reverted by restoring the previous title.",
        ),
        OperationSpec(
            service="documents", name="edit", graphql_name="editDocument", entity_type="document",
            payload_model=EditDocument, entity_key="document_id",
            description="Replace a document's body. Reverted by restoring the previous body.",
        ),
        OperationSpec(
            service="documents", name="archive", graphql_name="archiveDocument", entity_type="document",
            payload_model=ArchiveDocument, entity_key="document_id",
            description="Archive a document. Reverted by unarchiving it.",
        ),
        OperationSpec(
            service="documents", name="unarchive", graphql_name="unarchiveDocument", entity_type="document",
            payload_model=UnarchiveDocument, entity_key="document_id",
            description="Unarchive a document. Reverted by archiving it again.",
        ),
        OperationSpec(
            service="ledger", name="open_account", graphql_name="openAccount", entity_type="account",
            payload_model=OpenAccount, entity_key=None, creates=True,
            description="Open an account in one currency; returns its new id at once.",
        ),
        OperationSpec(
            service="ledger", name="post_entry", graphql_name="postEntry", entity_type="account",
            payload_model=PostEntry, entity_key="account_id",
            description="Post a signed amount in cents to an account. Reverted by a reversing entry.",
        ),
        OperationSpec(
            service="links", name="link", graphql_name="link", entity_type="link",
            payload_model=Link, entity_key=None, creates=True,
            description="Link two entities with a named relation; returns the new link id at once.",
        ),
        OperationSpec(
            service="links", name="unlink", graphql_name="unlink", entity_type="link",
            payload_model=Unlink, entity_key="link_id",
            description="Remove a link. Reverted by restoring it.",
        ),
        OperationSpec(
            service="notifier", name="send_email", graphql_name="sendEmail", entity_type="email",
            payload_model=SendEmail, entity_key=None, creates=True, egress=True,
            description="Send an email. Irreversible: held for operator approval, never compensated.",
        ),
    ]
)
