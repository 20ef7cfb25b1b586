"""Idempotent writes: a retried `startRun` or agent write with the same idempotency key gets the first answer.

An agent that times out does not know whether its write was taken; it retries with the key it sent. The
first request with a key stores (principal, key, a digest of the request, the answer) in
gw_idempotency_keys in the very transaction that creates the run or the command, so the key exists if
and only if the effect does: whichever replica takes the retry, even after the first gateway died
between its commit and its response, finds the row and answers the same run id or receipt, creating
nothing. The same key with a different request is VALIDATION, never a silent second effect.

Keys are per principal, 1-255 characters, and live 24 hours: an older row is treated as absent (and
replaced by a new use of the key); the housekeeper deletes them. A request that was refused (VALIDATION,
BREAKER_OPEN, AGENT_BUDGET_EXCEEDED, ...) created nothing and stores nothing, so its retry is judged anew.
Two requests with one key racing on two replicas both insert the row; the loser's transaction fails on
the primary key and is retried, and then finds the winner's answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.store import IDEMPOTENCY_KEY_MAX, idempotency_keys
from kinshasa.kernel.database import OFF_LOOP

log = logging.getLogger(__name__)

KEY_TTL = timedelta(hours=24)
REUSED = "idempotency key reused with a different request"


def check_key(key: str | None) -> str | None:
    """The key as given, or VALIDATION when it is empty or too long; None stays None (no key)."""
    if key is None:
        return None
    if not key or len(key) > IDEMPOTENCY_KEY_MAX:
        raise Invalid(
            f"idempotencyKey must be 1-{IDEMPOTENCY_KEY_MAX} characters, e.g. a UUID made once per "
            "intended write and sent again with each retry of it",
            [("idempotencyKey", "empty or too long")],
        )
    return key


def digest(operation: str, arguments: dict[str, Any]) -> str:
    """A stable fingerprint of a request: the operation and its (validated, normalised) arguments."""
    canonical = json.dumps([operation, arguments], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Remembered:
    """A key's first use: the request's digest and the answer it got."""

    digest: str
    answer: dict[str, Any]

    def replay(self, request_digest: str) -> dict[str, Any]:
        """The first answer, if this is the same request again; VALIDATION if the key was reused."""
        if request_digest != self.digest:
            raise Invalid(
                f"{REUSED}: a key names one intended write; send a new key for a new request",
                [("idempotencyKey", REUSED)],
            )
        return self.answer


async def recall(
    conn: AsyncConnection, principal_id: str, keys: Iterable[str], now: datetime
) -> dict[str, Remembered]:
    """The principal's live keys among `keys`. Expired rows for them are deleted first, so a key reused
    after 24 hours is a new key (its insert must not meet the old row)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    mine = (idempotency_keys.c.principal_id == principal_id, idempotency_keys.c.key.in_(wanted))
    await conn.execute(delete(idempotency_keys).where(*mine, idempotency_keys.c.created_at <= now - KEY_TTL))
    c = idempotency_keys.c
    rows = await conn.execute(select(c.key, c.request_digest, c.answer).where(*mine))
    return {key: Remembered(request_digest, json.loads(answer)) for key, request_digest, answer in rows}


def row(
    principal_id: str, key: str, request_digest: str, answer: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """One gw_idempotency_keys row, to insert in the transaction that makes the effect."""
    return {
        "principal_id": principal_id,
        "key": key,
        "request_digest": request_digest,
        "answer": json.dumps(answer, sort_keys=True, default=str),
        "created_at": now,
    }


async def remember(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(insert(idempotency_keys), rows)


def is_key_race(exc: BaseException) -> bool:
    """Did a transaction fail because another one took an idempotency key first?"""
    return isinstance(exc, IntegrityError) and idempotency_keys.name in str(exc)


async def prune(engine: AsyncEngine, now: datetime, chunk: int = 5_000) -> int:
    """Delete keys older than KEY_TTL, oldest first, about `chunk` rows per short transaction; the count."""
    cutoff = now - KEY_TTL
    total = 0
    engine = engine.execution_options(**{OFF_LOOP: True})  # on SQLite, a chunk runs off the loop's thread
    while True:
        async with engine.begin() as conn:
            # The chunk-th oldest expired key bounds this round (rows sharing its instant go with it).
            edge = (
                await conn.execute(
                    select(idempotency_keys.c.created_at)
                    .where(idempotency_keys.c.created_at <= cutoff)
                    .order_by(idempotency_keys.c.created_at)
                    .offset(chunk - 1)
                    .limit(1)
                )
            ).scalar_one_or_none()
            deleted = await conn.execute(
                delete(idempotency_keys).where(idempotency_keys.c.created_at <= (edge or cutoff))
            )
        total += max(deleted.rowcount, 0)
        if edge is None:
            return total


def kill_after_commit_if_marked(marker: str | None, key: str | None) -> None:
    """TEST ONLY: SIGKILL this gateway process right after a commit, before its answer is sent.

    Off unless KINSHASA_GATEWAY_TEST_KILL_AFTER_COMMIT_KEY is set, and then it acts only on the request
    carrying exactly that idempotency key: it is how tests/integration/gateway/test_idempotency.py makes
    a gateway die between its commit and its response, deterministically. Never set it in production.
    """
    if marker is not None and key is not None and key == marker:
        log.critical("test hook: killing the gateway after committing the request keyed %r", key)
        os.kill(os.getpid(), signal.SIGKILL)
