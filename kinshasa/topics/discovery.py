"""How Kinshasa's Kafka clients find the brokers again once every broker they knew is out of reach."""

from __future__ import annotations

from typing import Any

# librdkafka already goes back to its bootstrap servers as soon as it has no broker left (its default
# `metadata.recovery.strategy=rebootstrap`). This shortens its other trigger, metadata requests left
# unanswered (a broker paused, a network cut), from 5 minutes to 10 s. In the debug run of
# `tests/faults/test_broker_pause.py` that showed it, the gateway's listener rebootstrapped this way during
# the pause, about 10 s after its metadata requests stopped being answered. It does not cure a
# consumer-group member stranded by a fenced lone broker ("Kafka with a single broker" in
# docs/operations.md). librdkafka does not start this timer for an admin client's requests.
REBOOTSTRAP_AFTER_MS = 10_000


def client_config(bootstrap: str) -> dict[str, Any]:
    """The settings shared by every producer, consumer and admin client in `kinshasa/` (the broker start-up
    probes in `kinshasa.infra.kafka` excepted): where the brokers are, and when to look for them anew."""
    return {
        "bootstrap.servers": bootstrap,
        "metadata.recovery.rebootstrap.trigger.ms": REBOOTSTRAP_AFTER_MS,
    }
