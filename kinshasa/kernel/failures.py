"""Retryable versus poison: which failures wait for the infrastructure and which go to the dead-letter queue.

A handler failure or a publish failure is one of two things. Either the infrastructure was unavailable
for a moment (the database locked, busy or unreachable, the broker or Temporal down): the same message
will succeed once it is back, so it must wait, in order, and never be dead-lettered. Or the message
itself cannot succeed (a handler bug, a domain invariant raised, a message too large for the broker):
retrying a few times and then dead-lettering it is the only way its partition or key moves on.

Both decisions are pure functions of the error, so they are unit-tested and can be replayed over logs.
When unsure, a consumed message counts as poison (the old rule, bounded by `max_attempts`), and a publish
failure counts as unavailability (a row is only made dead by an error that names the row's own fault):
the first keeps a partition from stalling forever on a bug, the second keeps an outage from ever
breaking a key's order.
"""

from __future__ import annotations

import errno
import re
import socket
import sqlite3
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc

from kinshasa.schemas.envelope import InvalidMessage

FailureKind = Literal["invalid", "retryable", "poison"]
PublishFailureKind = Literal["unavailable", "own"]

# How far down `raise ... from` / implicit context chains to look: a handler that wraps a lock timeout in
# its own error still failed because of the lock.
_CHAIN_DEPTH = 8

# SQLite reports contention and I/O trouble as OperationalError, but also a missing table or a syntax
# error, which no wait fixes; only these messages mean "try again later".
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy",
                     "disk i/o error", "unable to open database file", "database or disk is full")

_CONNECTION_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                                errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})

# asyncpg's errors about the input or the client, not the server's availability; some of them inherit
# from its InterfaceError, which otherwise means a connection in a bad state. Checked first.
_ASYNCPG_DETERMINISTIC = frozenset({"DataError", "ClientConfigurationError", "UnsupportedClientFeatureError",
                                    "UnsupportedServerFeatureError", "OutdatedSchemaCacheError"})

# getaddrinfo failures that mean "not resolvable right now" (a restarting container leaves DNS).
_RESOLVER_TRANSIENT = frozenset({socket.EAI_AGAIN, socket.EAI_NONAME, socket.EAI_FAIL})

# asyncpg's connection-level errors, by class name so this module does not import the driver.
_ASYNCPG_TRANSIENT = frozenset({"PostgresConnectionError", "ConnectionDoesNotExistError",
                                "ConnectionFailureError", "CannotConnectNowError", "TooManyConnectionsError",
                                "ConnectionRejectionError", "InterfaceError", "DeadlockDetectedError",
                                "SerializationError", "LockNotAvailableError", "QueryCanceledError",
                                "AdminShutdownError", "CrashShutdownError", "DiskFullError",
                                "InsufficientResourcesError", "OutOfMemoryError"})

# Broker-unreachable codes librdkafka does not mark retriable() but that only mean "not now".
_KAFKA_TRANSIENT_CODES = frozenset({
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT,
    KafkaError._TIMED_OUT_QUEUE, KafkaError._RESOLVE, KafkaError._WAIT_COORD, KafkaError._QUEUE_FULL,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.NETWORK_EXCEPTION, KafkaError.BROKER_NOT_AVAILABLE, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR, KafkaError._DESTROY,
})

# Publish errors that name the message's own fault: it is too large, malformed, or bound for a topic that
# does not exist or that this producer may not write. Anything else is the broker's state, not the row's.
OWN_PUBLISH_ERRORS = frozenset({
    "MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_MSG_SIZE", "INVALID_MSG", "CORRUPT_MESSAGE",
    "INVALID_RECORD", "RECORD_LIST_TOO_LARGE", "TOPIC_EXCEPTION", "_INVALID_ARG", "_BAD_MSG",
    "UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC", "_UNKNOWN_PARTITION", "TOPIC_AUTHORIZATION_FAILED",
    "_VALUE_SERIALIZATION", "_KEY_SERIALIZATION",
})

_CODE = re.compile(r"\bcode=([A-Z_]+)")

# temporalio's RPCStatusCode values for "the server is not there right now" (gRPC codes).
_GRPC_UNAVAILABLE, _GRPC_DEADLINE_EXCEEDED, _GRPC_RESOURCE_EXHAUSTED = 14, 4, 8


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < _CHAIN_DEPTH and all(current is not s for s in seen):
        seen.append(current)
        # Only the explicit `raise ... from` chain (what SQLAlchemy, asyncpg's adapter and temporalio use):
        # a bug raised while handling a lock error is still a bug.
        current = current.__cause__
    return seen


def _sqlite_transient(error: BaseException) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _SQLITE_TRANSIENT)


def _kafka_transient(error: Any) -> bool:
    if not isinstance(error, KafkaError):
        return False
    if error.fatal():
        return False
    return bool(error.retriable()) or error.code() in _KAFKA_TRANSIENT_CODES


def _asyncpg_deterministic(exc: BaseException | None) -> bool:
    return exc is not None and type(exc).__module__.startswith("asyncpg") and any(
        cls.__name__ in _ASYNCPG_DETERMINISTIC for cls in type(exc).__mro__)


def _one_retryable(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc.orig, sqlite3.Error):
            return _sqlite_transient(exc.orig)
        # SQLAlchemy's asyncpg adapter wraps the driver's error in `orig` (and its own `__cause__`).
        driver = exc.orig.__cause__ if exc.orig is not None and exc.orig.__cause__ is not None else exc.orig
        if _asyncpg_deterministic(driver) or _asyncpg_deterministic(exc.orig):
            return False
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # a dropped connection, or the pool had none free in time
    if isinstance(exc, sqlite3.OperationalError):
        return _sqlite_transient(exc)
    if type(exc).__module__.startswith("asyncpg"):
        if _asyncpg_deterministic(exc):
            return False
        return any(cls.__name__ in _ASYNCPG_TRANSIENT for cls in type(exc).__mro__)
    if isinstance(exc, KafkaException):
        return _kafka_transient(exc.args[0] if exc.args else None)
    if _is_temporal_unavailable(exc):
        return True
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if isinstance(exc, socket.gaierror):
        return exc.errno in _RESOLVER_TRANSIENT
    if isinstance(exc, OSError):
        # asyncio's "Multiple exceptions: ..." (every address of a host refused) carries no errno.
        every_address_refused = exc.errno is None and str(exc).startswith("Multiple exceptions")
        return exc.errno in _CONNECTION_ERRNOS or every_address_refused
    return False


def _is_temporal_unavailable(exc: BaseException) -> bool:
    try:
        from temporalio.service import RPCError
    except ImportError:  # pragma: no cover - temporalio is a dependency; a slim install may lack it
        return False
    return isinstance(exc, RPCError) and int(exc.status) in (
        _GRPC_UNAVAILABLE, _GRPC_DEADLINE_EXCEEDED, _GRPC_RESOURCE_EXHAUSTED)


def classify_failure(exc: BaseException) -> FailureKind:
    """Why a consumer handler failed: "invalid" (the message does not parse: dead-letter at once),
    "retryable" (the infrastructure was unavailable: wait and retry, never dead-letter) or "poison"
    (anything else, deterministic until shown otherwise: dead-letter after N attempts).

    Retryable: SQLAlchemy/DBAPI operational, interface and invalidated-connection errors (on SQLite only
    "locked"/"busy"/I/O ones), asyncpg connection errors, connection-level OSErrors and timeouts, a
    Kafka error that is retriable or means the brokers are unreachable, and a Temporal RPC that found
    the server unavailable or out of time. Any error in the `raise ... from` chain counts; asyncpg's errors
    about the input (DataError, unsupported features) never do.
    """
    if isinstance(exc, InvalidMessage | ValidationError):
        return "invalid"
    if any(_one_retryable(e) for e in _chain(exc)):
        return "retryable"
    return "poison"


def kafka_error_name(error: str) -> str | None:
    """The librdkafka code name in a publish error's text (`KafkaError{code=NAME,...}`), if any."""
    match = _CODE.search(error)
    return match.group(1) if match else None


def classify_publish_error(error: str) -> PublishFailureKind:
    """Whether a failed publish was the message's "own" fault (too large, invalid, unknown or forbidden
    topic) or the broker being "unavailable" (timeouts, transport, leader elections, anything unnamed).

    Works on the error text because that is what `PublishError` carries per item: librdkafka's
    `KafkaError{code=NAME,...}`. An error without a code (a full local queue, a closed producer, a
    missing delivery report) is never the row's fault.
    """
    name = kafka_error_name(error)
    return "own" if name in OWN_PUBLISH_ERRORS else "unavailable"
