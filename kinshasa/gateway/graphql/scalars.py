"""The scalars the gateway adds to GraphQL's own: Long, for amounts beyond GraphQL Int's 32 bits."""

from __future__ import annotations

from typing import NewType

import strawberry

from kinshasa.gateway.arguments import parse_long

Long = NewType("Long", int)
LONG_SCALAR = strawberry.scalar(
    name="Long",
    serialize=int,
    parse_value=parse_long,
    description="A 53-bit signed integer (GraphQL Int is only 32-bit), e.g. an amount in cents.",
)
