"""The one naming convention of Kinshasa's tables, and the MetaData every kernel table (outbox, inbox, dead
letters, receipts) is declared on."""

from __future__ import annotations

from sqlalchemy import MetaData

# Constraint names are spelled out so migrations and error matching are stable on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def component_metadata() -> MetaData:
    """A MetaData for one component's own tables (the gateway's, the coordinator's), named as the kernel's."""
    return MetaData(naming_convention=NAMING_CONVENTION)


kernel_metadata = component_metadata()
