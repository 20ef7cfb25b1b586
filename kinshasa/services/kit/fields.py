"""Field types for payload models that publish what they check: each validator has its JSON Schema twin.

A payload model's validators run in the service; the gateway only sees the JSON Schema the model
publishes. Every type here pairs its check with the schema keywords (and `errorMessage`) that make the
gateway refuse the same input with the same words, so an agent learns of a bad field before its write is
accepted rather than from a rejection afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler, Strict, StringConstraints
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

ENTITY_ID_MAX = 128
EMAIL_MAX = 254  # RFC 5321's limit on a forward path
# Kept under 2**53 so an amount survives JavaScript clients and JSON parsers that use doubles.
SAFE_INTEGER_MAX = 10**15

_NOT_BLANK = r"\S"
_NOT_BLANK_MESSAGE = "must contain more than whitespace"
# One line with something in it, without a lookahead (not every schema validator's regex has one).
_SINGLE_LINE = r"^[^\r\n]*[^\s][^\r\n]*$"
_SINGLE_LINE_MESSAGE = "must be a single line with more than whitespace: remove line breaks"
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError(_NOT_BLANK_MESSAGE)
    return value


def _single_line(value: str) -> str:
    # A CR or LF in a mail header would let the sender inject headers of their own.
    if "\r" in value or "\n" in value or not value.strip():
        raise ValueError(_SINGLE_LINE_MESSAGE)
    return value


def _non_zero(value: int) -> int:
    if value == 0:
        raise ValueError("must not be zero: a zero change changes nothing, so do not send it")
    return value


def _email(value: str) -> str:
    if not EMAIL_RE.match(value):
        raise ValueError(f"{value!r} is not an email address: use the form name@example.org")
    return value


@dataclass(frozen=True)
class Published:
    """A check a payload field runs in the service, with the JSON Schema keywords saying it to the gateway.

    Put it in the field's `Annotated[...]`: `Annotated[str, StringConstraints(max_length=200), NOT_BLANK]`.
    """

    check: Callable[[Any], Any]
    keywords: Mapping[str, Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        published = handler(schema)
        published.update(self.keywords)
        return published


NOT_BLANK = Published(_not_blank, {"pattern": _NOT_BLANK, "errorMessage": {"pattern": _NOT_BLANK_MESSAGE}})
SINGLE_LINE = Published(_single_line,
                        {"pattern": _SINGLE_LINE, "errorMessage": {"pattern": _SINGLE_LINE_MESSAGE}})
EMAIL = Published(_email, {"format": "email"})
NON_ZERO = Published(_non_zero, {"not": {"const": 0},
                                 "errorMessage": {"not": "must not be zero: a zero change changes nothing, "
                                                         "so do not send it"}})

EntityId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ENTITY_ID_MAX, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"),
    Field(description="id of an existing entity, as returned in CommandReceipt.entityId"),
]
Email = Annotated[str, StringConstraints(min_length=3, max_length=EMAIL_MAX), EMAIL]
# Strict: a float or a boolean here is a caller bug, not a value to round or coerce.
NonZeroAmount = Annotated[int, Strict(), Field(ge=-SAFE_INTEGER_MAX, le=SAFE_INTEGER_MAX), NON_ZERO]
