"""How every Kafka client of Kinshasa's finds the brokers, whatever its role."""

from __future__ import annotations

from typing import Any

# How long a client that can reach none of the brokers it knows waits before it goes back to its
# bootstrap servers (librdkafka's default is 5 minutes). A broker fenced by its controller (its
# heartbeats lapsed during a pause) answers metadata listing no broker, and librdkafka then drops the
# broker it had learned, its bootstrap entries long gone: the client knows no broker at all. In the
# run that showed it with this setting, most clients went back to their bootstrap servers at once or
# within 10 s, but one consumer-group member never did ("Kafka with a single broker" in
# docs/operations.md).
REBOOTSTRAP_AFTER_MS = 10_000


def client_config(bootstrap: str) -> dict[str, Any]:
    """The settings shared by every producer, consumer and admin client: where the brokers are, and how
    to find them again when every broker the client knew is gone."""
    return {
        "bootstrap.servers": bootstrap,
        "metadata.recovery.strategy": "rebootstrap",
        "metadata.recovery.rebootstrap.trigger.ms": REBOOTSTRAP_AFTER_MS,
    }
