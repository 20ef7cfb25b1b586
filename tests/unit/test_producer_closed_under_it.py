"""A producer whose librdkafka client is closed under it (what a test session's end does to what leaked)
stops polling instead of failing, and logging, in a busy loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kinshasa.topics.producer import AsyncProducer


async def test_a_client_closed_under_the_producer_ends_its_polling(caplog: pytest.LogCaptureFixture) -> None:
    producer = AsyncProducer("127.0.0.1:1", client_id="closed-under-it", poll_interval=0.01)
    producer._producer.close()
    with caplog.at_level(logging.ERROR, logger="kinshasa.topics.producer"):
        await asyncio.to_thread(producer._thread.join, 10)
    assert not producer._thread.is_alive()
    assert [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name == "kinshasa.topics.producer"] == [
        "kafka producer: its client was closed before the producer; polling stops"]
