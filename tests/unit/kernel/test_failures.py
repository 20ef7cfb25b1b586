"""Retryable versus poison: the pure classification of handler and publish failures."""

from __future__ import annotations

import errno
import socket
import sqlite3

import asyncpg
import pytest
from confluent_kafka import KafkaError, KafkaException
from pydantic import BaseModel, ValidationError
from sqlalchemy import exc as sa_exc
from temporalio.service import RPCError, RPCStatusCode

from kinshasa.kernel.failures import classify_failure, classify_publish_error, kafka_error_name
from kinshasa.schemas.envelope import InvalidMessage


class _Model(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        _Model.model_validate({"n": "not a number"})
    except ValidationError as exc:
        return exc
    raise AssertionError("expected a ValidationError")


def _sa(cls: type[sa_exc.DBAPIError], orig: BaseException, invalidated: bool = False) -> sa_exc.DBAPIError:
    return cls("UPDATE documents SET title = ?", {}, orig, connection_invalidated=invalidated)


def _chained(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("could not rename the document") from cause
    except RuntimeError as exc:
        return exc


RETRYABLE = {
    "sqlite locked": _sa(sa_exc.OperationalError, sqlite3.OperationalError("database is locked")),
    "sqlite busy": sqlite3.OperationalError("database is busy"),
    "postgres operational": _sa(sa_exc.OperationalError, Exception("server closed the connection")),
    "postgres interface": _sa(sa_exc.InterfaceError, Exception("connection is closed")),
    "invalidated connection": _sa(sa_exc.DBAPIError, Exception("reset"), invalidated=True),
    "pool timeout": sa_exc.TimeoutError("QueuePool limit reached"),
    "asyncpg connection": asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    "asyncpg cannot connect now": asyncpg.exceptions.CannotConnectNowError("the database system is starting"),
    "timeout": TimeoutError(),
    "refused": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    "reset by errno": OSError(errno.ECONNRESET, "Connection reset by peer"),
    "all brokers down": KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN)),
    "transport": KafkaException(KafkaError(KafkaError._TRANSPORT)),
    "kafka retriable": KafkaException(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, retriable=True)),
    "temporal unavailable": RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b""),
    "temporal deadline": RPCError("deadline", RPCStatusCode.DEADLINE_EXCEEDED, b""),
    "wrapped lock": _chained(_sa(sa_exc.OperationalError, sqlite3.OperationalError("database is locked"))),
    "host not resolvable now": socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
    "host gone from dns": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    "every address refused": OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432), "
                                     "[Errno 111] Connect call failed ('127.0.0.1', 5432)"),
    "sqlite disk full": sqlite3.OperationalError("database or disk is full"),
    "postgres disk full": asyncpg.exceptions.DiskFullError("could not extend file"),
}

POISON = {
    "handler bug": KeyError("title"),
    "domain invariant": ValueError("document doc-1 is archived; unarchive it first"),
    "sqlite missing table": _sa(sa_exc.OperationalError, sqlite3.OperationalError("no such table: docs")),
    "integrity": _sa(sa_exc.IntegrityError, Exception("duplicate key")),
    "asyncpg unique": asyncpg.exceptions.UniqueViolationError("duplicate key"),
    "file not found": FileNotFoundError(errno.ENOENT, "missing"),
    "message too large": KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)),
    "fatal kafka": KafkaException(KafkaError(KafkaError._FATAL, fatal=True)),
    "temporal not found": RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b""),
    # asyncpg's input errors inherit from its InterfaceError, which otherwise means a broken connection.
    "asyncpg data error": asyncpg.exceptions.DataError("invalid input for query argument $1: 2147483648"),
    "asyncpg data error wrapped": _sa(sa_exc.InterfaceError, _chained(
        asyncpg.exceptions.DataError("value out of int32 range"))),
    "asyncpg unsupported": asyncpg.exceptions.UnsupportedClientFeatureError("no such feature"),
}


@pytest.mark.parametrize("exc", RETRYABLE.values(), ids=RETRYABLE.keys())
def test_infrastructure_unavailability_is_retryable(exc: BaseException) -> None:
    assert classify_failure(exc) == "retryable"


@pytest.mark.parametrize("exc", POISON.values(), ids=POISON.keys())
def test_deterministic_failures_are_poison(exc: BaseException) -> None:
    assert classify_failure(exc) == "poison"


def test_messages_that_do_not_parse_are_invalid_even_when_chained() -> None:
    assert classify_failure(InvalidMessage([("type", "missing")])) == "invalid"
    assert classify_failure(_validation_error()) == "invalid"


def test_a_cyclic_cause_chain_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__cause__, second.__cause__ = second, first
    assert classify_failure(first) == "poison"


def test_a_bug_raised_while_handling_a_lock_error_is_poison() -> None:
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError:
            raise KeyError("title")  # noqa: B904 - the implicit context is the point
    except KeyError as exc:
        assert classify_failure(exc) == "poison"


def test_publish_errors_naming_the_message_are_its_own() -> None:
    too_large = str(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert kafka_error_name(too_large) == "MSG_SIZE_TOO_LARGE"
    assert classify_publish_error(too_large) == "own"
    assert classify_publish_error(str(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))) == "own"


@pytest.mark.parametrize("error", [
    str(KafkaError(KafkaError._MSG_TIMED_OUT)), str(KafkaError(KafkaError._TRANSPORT)),
    str(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS)), "local producer queue still full after 30s",
    "producer closed before the broker acknowledged", "no delivery report", "RuntimeError: boom",
])
def test_publish_errors_of_the_broker_or_unnamed_are_unavailability(error: str) -> None:
    assert classify_publish_error(error) == "unavailable"
