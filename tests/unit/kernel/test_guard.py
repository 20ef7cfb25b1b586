"""The DLQ guard's counting, as pure logic: poison means failing the same way N times in a row, so stray
errors met during an outage never add up to a dead letter. The store and producer are stand-ins that
record what would have been dead-lettered; the guard's real I/O is tested in tests/integration/test_dlq.py."""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import exc as sa_exc

from kinshasa.kernel.dlq import DeadLetterPolicy, guarded_handler
from kinshasa.topics.consumer import Record

GROUP = "kinshasa.svc.documents"
LOCKED = sa_exc.OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))


class Letters:
    def __init__(self) -> None:
        self.recorded: list[dict[str, Any]] = []

    async def record(self, **letter: Any) -> Any:
        self.recorded.append(letter)
        raise AssertionError(f"dead-lettered: {letter['error']}")


class Unused:
    async def send(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing is sent to the DLQ topic")


def _handler(failures: list[BaseException]) -> Any:
    calls = iter(failures)

    async def handle(record: Record) -> None:
        failure = next(calls, None)
        if failure is not None:
            raise failure

    return handle


async def _no_sleep(_seconds: float) -> None:
    return None


async def test_stray_errors_during_an_outage_do_not_add_up_to_a_dead_letter() -> None:
    # Unknown errors, each between lock timeouts, then success: never 3 in a row, so never poison.
    failures: list[BaseException] = [LOCKED, KeyError("stray"), LOCKED, KeyError("stray"), LOCKED,
                                     KeyError("stray"), LOCKED]
    letters = Letters()
    guarded = guarded_handler(_handler(failures), store=letters, producer=Unused(), group=GROUP,  # type: ignore[arg-type]
                              backoff=DeadLetterPolicy(max_attempts=3, backoff_s=0, hand_back_s=3600),
                              sleep=_no_sleep)
    await guarded(Record("t", 0, 7, b"k", b"{}"))
    assert letters.recorded == []


async def test_the_same_failure_n_times_in_a_row_is_poison() -> None:
    letters = Letters()
    guarded = guarded_handler(_handler([KeyError("bug")] * 3), store=letters, producer=Unused(), group=GROUP,  # type: ignore[arg-type]
                              backoff=DeadLetterPolicy(max_attempts=3, backoff_s=0), sleep=_no_sleep)
    try:
        await guarded(Record("t", 0, 8, b"k", b"{}"))
    except AssertionError:
        pass
    assert len(letters.recorded) == 1 and letters.recorded[0]["attempts"] == 3
