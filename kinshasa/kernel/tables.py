"""The one MetaData every kernel table (outbox, inbox, dead letters, receipts) is declared on."""

from __future__ import annotations

from sqlalchemy import MetaData

# Constraint names are spelled out so migrations and error matching are stable on both backends.
kernel_metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})
