"""The catalogue follower reads the records there at start with short waits, then follows with longer ones."""

from __future__ import annotations

import asyncio
import threading

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.topics import declaration_feed
from kinshasa.topics.declaration_feed import DeclarationFollower, PublishedDeclaration
from tests.integration.test_relay import create_topic


async def test_a_catalogue_is_read_to_its_end_with_short_waits_then_followed_with_steady_ones(
        kafka: KafkaBroker, examples_catalogue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[PublishedDeclaration] = []
    waits: list[tuple[float, bool]] = []  # each consume()'s timeout, and whether caught up before it
    follower: DeclarationFollower | None = None
    following = threading.Event()  # a consume() began after the follower was caught up

    class RecordingConsumer(Consumer):
        def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
            assert follower is not None
            waits.append((timeout, follower.caught_up.is_set()))
            if follower.caught_up.is_set():
                following.set()
            return super().consume(num_messages, timeout)

    # A consume() waits out its whole timeout unless its batch fills, which a handful of records never
    # does: with the steady wait while catching up, every gateway start took three of them (1.5 s).
    monkeypatch.setattr(declaration_feed, "Consumer", RecordingConsumer)

    async def hear(record: PublishedDeclaration) -> None:
        heard.append(record)

    follower = DeclarationFollower(kafka.bootstrap, hear, examples_catalogue)
    stop = asyncio.Event()
    run = asyncio.create_task(follower.run(stop))
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 30)
        assert await asyncio.to_thread(following.wait, 30), "the follower stopped polling once caught up"
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
    assert heard, "the example services' declarations were not read"
    assert {wait for wait, caught_up in waits if not caught_up} == {declaration_feed.CATCH_UP_POLL_S}
    assert {wait for wait, caught_up in waits if caught_up} == {declaration_feed.POLL_S}
    assert declaration_feed.CATCH_UP_POLL_S < declaration_feed.POLL_S


async def test_a_follower_stopped_while_it_opens_or_polls_closes_its_client(
        kafka: KafkaBroker, examples_catalogue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway stopped during its start cancels the follower while its client is being opened in a
    thread, or while a consume() runs there: the client it opened is closed all the same, after the
    consume() ended (it used to stay open for the life of the process)."""
    opened: list[Consumer] = []
    opening = threading.Event()  # the thread is inside _open; it may finish once `go` is set
    go = threading.Event()

    class SlowToOpen(DeclarationFollower):
        def _open(self) -> tuple[Consumer, int, int | None]:
            opening.set()
            go.wait(30)
            consumer, start, end = super()._open()
            opened.append(consumer)
            return consumer, start, end

    async def hear(record: PublishedDeclaration) -> None:
        pass

    follower = SlowToOpen(kafka.bootstrap, hear, examples_catalogue)
    run = asyncio.create_task(follower.run(asyncio.Event()))
    assert await asyncio.to_thread(opening.wait, 30)
    run.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 30)
    [consumer] = opened
    with pytest.raises(RuntimeError, match="closed"):
        consumer.assignment()

    # Cancelled in the middle of a consume(): closed once that consume() returned.
    polled: list[Consumer] = []
    polling = threading.Event()
    in_consume = threading.Event()
    closed_during_consume: list[bool] = []

    class PollingConsumer(Consumer):
        def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
            polled.append(self)
            in_consume.set()
            polling.set()
            try:
                return super().consume(num_messages, 1.0)  # long enough for the cancel to land inside it
            finally:
                in_consume.clear()

        def close(self) -> None:
            closed_during_consume.append(in_consume.is_set())
            super().close()

    monkeypatch.setattr(declaration_feed, "Consumer", PollingConsumer)
    follower = DeclarationFollower(kafka.bootstrap, hear, examples_catalogue)
    run = asyncio.create_task(follower.run(asyncio.Event()))
    assert await asyncio.to_thread(polling.wait, 30)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 30)
    with pytest.raises(RuntimeError, match="closed"):
        polled[0].assignment()
    assert closed_during_consume == [False]


@pytest.mark.parametrize("bounds", ["read", "unavailable"])
async def test_a_follower_is_caught_up_once_it_handled_the_last_record_there_at_start(
        kafka: KafkaBroker, unique: str, bounds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """It reads the topic's bounds first: caught up the moment it handled the last record present (not after
    an empty fetch, which the broker holds for half a second), at once on an empty topic, and it goes on
    hearing the records published later. With the end-of-partition event off, only the bounds can say so.
    Bounds it cannot read leave it to that event, with the same outcome."""
    if bounds == "read":
        monkeypatch.setattr(declaration_feed, "_consumer", lambda bootstrap: Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"bounds-{unique}", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False}))
    else:
        monkeypatch.setattr(DeclarationFollower, "_bounds", lambda self, consumer: (OFFSET_BEGINNING, None))
    topic = create_topic(kafka.bootstrap, f"catalogue.bounds.{unique}", partitions=1)
    producer = Producer({"bootstrap.servers": kafka.bootstrap})

    def publish(*keys: str) -> None:
        for key in keys:
            producer.produce(topic, key=key.encode(), value=b"{}")
        assert producer.flush(30) == 0

    async def follow(until: int) -> tuple[list[str], list[str]]:
        """Follow the topic until `until` records were heard; returns the keys heard by the time it was
        caught up, and all of them."""
        heard: list[str] = []

        async def hear(record: PublishedDeclaration) -> None:
            heard.append(record.key)
            if len(heard) == until:
                stop.set()

        stop = asyncio.Event()
        follower = DeclarationFollower(kafka.bootstrap, hear, topic)
        run = asyncio.create_task(follower.run(stop))
        try:
            await asyncio.wait_for(follower.caught_up.wait(), 30)
            at_catch_up = list(heard)
            if until > len(heard):
                publish(*(f"later-{i}" for i in range(until - len(heard))))
            await asyncio.wait_for(stop.wait(), 30)
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)
        return at_catch_up, heard

    # An empty topic: caught up with nothing heard, then the record published after is heard.
    assert await follow(until=1) == ([], ["later-0"])
    publish("a", "b", "c")
    # Four records there at start: caught up with all four heard, then one more.
    at_catch_up, heard = await follow(until=5)
    assert at_catch_up == ["later-0", "a", "b", "c"]
    assert heard == [*at_catch_up, "later-0"]
