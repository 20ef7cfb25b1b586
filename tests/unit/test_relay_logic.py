"""Pure logic of the outbox relay: backoff, per-item outcomes, failure plans, per-key batch prefixes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from kinshasa.kernel.appendonly import AppendOnlyViolation, is_append_only_violation
from kinshasa.kernel.outbox import ClaimedRow, OutboxError, key_lock_id, outbox_message, publishable_prefixes
from kinshasa.kernel.relay import (
    OutboxRelay,
    PublishOutcome,
    backoff_delay,
    order_breaks,
    plan_failures,
    publish_outcomes,
)
from kinshasa.topics.producer import Delivered, FailedSend, Outgoing, PublishError

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def row(seq: int, key: bytes | None = b"k", attempts: int = 0, topic: str = "t") -> ClaimedRow:
    return ClaimedRow(seq=seq, message_id=uuid.uuid4(), topic=topic, key=key, entity_key=None, value=b"v",
                      headers=(), attempts=attempts)


class TestBackoff:
    def test_doubles_from_the_base_and_stops_at_the_cap(self) -> None:
        delays = [backoff_delay(n, base_s=0.2, max_s=30) for n in range(1, 12)]
        assert delays[:4] == [0.2, 0.4, 0.8, 1.6]
        assert delays[-1] == 30 and max(delays) == 30
        assert delays == sorted(delays)

    def test_huge_attempt_counts_do_not_overflow(self) -> None:
        assert backoff_delay(10_000, base_s=0.2, max_s=30) == 30

    def test_jitter_only_shortens(self) -> None:
        assert backoff_delay(3, base_s=1, max_s=30, jitter=0.5, rand=lambda: 1.0) == 2.0
        assert backoff_delay(3, base_s=1, max_s=30, jitter=0.5, rand=lambda: 0.0) == 4.0
        assert backoff_delay(9, base_s=1, max_s=30, jitter=0.5, rand=lambda: 0.0) == 30

    def test_zero_attempts_is_a_caller_bug(self) -> None:
        with pytest.raises(ValueError, match="attempts must be >= 1"):
            backoff_delay(0, base_s=1, max_s=2)


def _items(n: int) -> list[Outgoing]:
    return [Outgoing("t", b"k", str(i).encode()) for i in range(n)]


class TestPublishOutcomes:
    def test_success_delivers_everything(self) -> None:
        assert publish_outcomes(2, None) == [PublishOutcome(True), PublishOutcome(True)]

    def test_partial_failure_marks_failed_items_and_unsent_ones(self) -> None:
        items = _items(4)
        error = PublishError(
            [FailedSend(1, items[1], "Broker: Unknown topic or partition"),
             FailedSend(2, items[2], "local queue full"),
             FailedSend(3, items[3], "not sent: item 2 before it failed")],
            [Delivered("t", 0, 7), None, None, None])
        outcomes = publish_outcomes(4, error)
        assert outcomes[0] == PublishOutcome(True)
        assert outcomes[1] == PublishOutcome(False, True, "Broker: Unknown topic or partition")
        assert outcomes[2].attempted and not outcomes[2].delivered
        # Never produced: no attempt is charged to it.
        assert outcomes[3] == PublishOutcome(False, False, "not sent: item 2 before it failed")

    def test_rows_purged_from_the_queue_pay_no_attempt_when_another_row_explains_it(self) -> None:
        items = _items(3)
        refused = FailedSend(0, items[0], TOO_LARGE)
        queued = FailedSend(1, items[1], PURGED)
        in_flight = FailedSend(2, items[2], 'KafkaError{code=_PURGE_INFLIGHT,val=-151,str="Local: Purged"}')
        outcomes = publish_outcomes(3, PublishError([refused, queued, in_flight], [None, None, None]))
        assert [o.attempted for o in outcomes] == [True, False, True]
        assert not any(o.delivered for o in outcomes)
        # Another row delivered explains it too.
        delivered = publish_outcomes(2, PublishError([FailedSend(1, items[1], PURGED)],
                                                     [Delivered("t", 0, 1), None]))
        assert not delivered[1].attempted

    def test_rows_purged_when_nothing_went_through_pay_an_attempt(self) -> None:
        # The producer itself is failing: the relay backs off rather than claim them again at once.
        items = _items(2)
        outcomes = publish_outcomes(2, PublishError([FailedSend(0, items[0], PURGED),
                                                     FailedSend(1, items[1], PURGED)], [None, None]))
        assert all(o.attempted and not o.delivered for o in outcomes)

    def test_any_other_error_fails_every_item(self) -> None:
        outcomes = publish_outcomes(3, RuntimeError("AsyncProducer is closed"))
        assert all(not o.delivered and o.attempted for o in outcomes)
        assert outcomes[0].error == "RuntimeError: AsyncProducer is closed"


TOO_LARGE = 'KafkaError{code=MSG_SIZE_TOO_LARGE,val=10,str="Broker: Message size too large"}'
PURGED = 'KafkaError{code=_PURGE_QUEUE,val=-152,str="Local: Purged in queue"}'
TIMED_OUT = 'KafkaError{code=_MSG_TIMED_OUT,val=-192,str="Local: Message timed out"}'


class TestPlanFailures:
    def test_attempts_backoff_and_dead_state_for_a_failure_of_the_rows_own(self) -> None:
        rows = [row(1, attempts=0), row(2, attempts=9), row(3), row(4)]
        outcomes = [PublishOutcome(False, True, TOO_LARGE), PublishOutcome(False, True, TOO_LARGE),
                    PublishOutcome(True), PublishOutcome(False, False, "not sent")]
        plans = plan_failures(rows, outcomes, now=NOW, max_attempts=10, base_backoff_s=0.5, max_backoff_s=30)
        assert [(p.seq, p.attempts, p.dead) for p in plans] == [(1, 1, False), (2, 10, True)]
        assert plans[0].next_attempt_at == NOW + timedelta(seconds=0.5)
        # The dead row records when it died, it is not scheduled again.
        assert plans[1].next_attempt_at == NOW
        assert plans[0].error == TOO_LARGE
        assert "message of 2 bytes" in plans[1].error and "message.max.bytes" in plans[1].error

    def test_an_unavailable_broker_never_kills_a_row(self) -> None:
        for error in (TIMED_OUT, "boom", "local producer queue still full after 30s"):
            plans = plan_failures([row(1, attempts=500)], [PublishOutcome(False, True, error)], now=NOW,
                                  max_attempts=10, base_backoff_s=0.5, max_backoff_s=30)
            assert [(p.attempts, p.dead) for p in plans] == [(501, False)]
            assert plans[0].next_attempt_at == NOW + timedelta(seconds=30)

    def test_max_attempts_one_dies_at_once(self) -> None:
        plans = plan_failures([row(1)], [PublishOutcome(False, True, TOO_LARGE)], now=NOW, max_attempts=1,
                              base_backoff_s=0.1, max_backoff_s=1)
        assert plans[0].dead and TOO_LARGE in plans[0].error


def test_order_break_is_a_later_success_behind_a_failure_of_its_key() -> None:
    rows = [row(1, b"a"), row(2, b"a"), row(3, b"b"), row(4, None)]
    ok = PublishOutcome(True)
    outcomes = [PublishOutcome(False, True, "x"), ok, ok, ok]
    assert [r.seq for r in order_breaks(rows, outcomes)] == [2]
    # A row purged or not sent counts too: its key's later row went out without it.
    unsent = [PublishOutcome(False, False, "not sent"), ok, ok, ok]
    assert [r.seq for r in order_breaks(rows, unsent)] == [2]


class TestPublishablePrefixes:
    def test_a_key_stops_at_its_first_row_not_due(self) -> None:
        rows = [(1, b"a", "t", True), (2, b"b", "t", False), (3, b"a", "t", True), (4, b"b", "t", True)]
        assert publishable_prefixes(rows, {1, 2, 3, 4}) == {1, 3}

    def test_a_key_stops_at_a_row_someone_else_holds(self) -> None:
        # Row 2 is the key's head but not ours (another relay locked it): nothing of key a may go.
        rows = [(2, b"a", "t", True), (5, b"a", "t", True), (6, b"b", "t", True)]
        assert publishable_prefixes(rows, {5, 6}) == {6}

    def test_a_key_stops_where_its_topic_changes(self) -> None:
        rows = [(1, b"a", "commands", True), (2, b"a", "commands", True), (3, b"a", "events", True),
                (4, b"a", "commands", True), (5, b"b", "events", True)]
        assert publishable_prefixes(rows, {1, 2, 3, 4, 5}) == {1, 2, 5}

    def test_rows_without_a_key_have_no_order(self) -> None:
        rows = [(1, None, "t", False), (2, None, "t", True), (3, None, "u", True)]
        assert publishable_prefixes(rows, {1, 2, 3}) == {2, 3}


class TestOutboxMessage:
    def test_normalises_key_value_id_and_headers(self) -> None:
        mid = uuid.uuid4()
        message = outbox_message("t", "documents:d1", "{}", str(mid), {"type": "x", "trace": b"abc"})
        assert (message.key, message.value, message.message_id) == (b"documents:d1", b"{}", mid)
        assert message.entity_key == "documents:d1"
        assert message.headers == (("type", "x"), ("trace", "abc"))

    def test_binary_key_has_no_entity_key(self) -> None:
        assert outbox_message("t", b"\xff\xfe", b"v", uuid.uuid4()).entity_key is None

    @pytest.mark.parametrize(("args", "match"), [
        (("", b"k", b"v", uuid.uuid4()), "catalogue's topic name"),
        (("t", b"k", b"v", "nope"), "not a UUID"),
    ])
    def test_bad_input_names_the_fix(self, args: tuple[object, ...], match: str) -> None:
        with pytest.raises(OutboxError, match=match):
            outbox_message(*args)  # type: ignore[arg-type]

    def test_binary_header_is_refused(self) -> None:
        with pytest.raises(OutboxError, match="envelope payload"):
            outbox_message("t", b"k", b"v", uuid.uuid4(), [("h", b"\xff")])


def test_key_lock_id_is_stable_and_fits_postgres_int4() -> None:
    ids = {key_lock_id(f"documents:{i}".encode()) for i in range(2000)}
    assert all(-(2**31) <= i < 2**31 for i in ids)
    assert len(ids) > 1990
    assert key_lock_id(b"documents:d1") == key_lock_id(b"documents:d1")


class TestAppendOnlyViolation:
    def test_recognises_the_message_through_the_cause_chain(self) -> None:
        driver = RuntimeError("document_versions is append-only: write a new version row instead")
        try:
            try:
                raise driver
            except RuntimeError as exc:
                raise ValueError("wrapped") from exc
        except ValueError as wrapped:
            violation = AppendOnlyViolation.from_error(wrapped)
        assert violation is not None and violation.table == "document_versions"
        assert "tombstone" in str(violation)

    def test_recognises_the_sqlstate_and_ignores_other_errors(self) -> None:
        coded = RuntimeError("custom text")
        coded.sqlstate = "KS001"  # type: ignore[attr-defined]
        assert is_append_only_violation(coded)
        assert not is_append_only_violation(RuntimeError("UNIQUE constraint failed"))


class _Recording:
    """A publisher that delivers every item alone and records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_batch(self, items: Sequence[Outgoing]) -> list[Delivered]:
        self.sent.extend(item.value for item in items)
        return [Delivered(item.topic, 0, len(self.sent)) for item in items]


async def test_isolation_sends_no_row_alone_behind_an_undelivered_row_of_its_key() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")  # never connected: _isolate only publishes
    publisher = _Recording()
    relay = OutboxRelay(engine, publisher)
    rows = [row(1, b"k"), row(2, b"k"), row(3, b"j")]
    outcomes = [PublishOutcome(False, False, PURGED),  # purged, pays no attempt: still ahead of row 2
                PublishOutcome(False, True, TOO_LARGE), PublishOutcome(False, True, TOO_LARGE)]
    isolated = await relay._isolate(rows, outcomes)
    assert publisher.sent == [b"v"]  # row 3 alone; row 2 waits behind row 1
    assert [o.delivered for o in isolated] == [False, False, True]
    assert not isolated[1].attempted
    await engine.dispose()
