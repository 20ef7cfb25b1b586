"""Every Kafka client goes back to its bootstrap servers within seconds once it knows no broker."""

from __future__ import annotations

from kinshasa.topics.admin import _admin
from kinshasa.topics.consumer import consumer_config
from kinshasa.topics.discovery import REBOOTSTRAP_AFTER_MS, client_config
from kinshasa.topics.producer import producer_config


def test_producers_and_consumers_go_back_to_their_bootstrap_servers_within_seconds() -> None:
    assert REBOOTSTRAP_AFTER_MS <= 10_000  # librdkafka's own 5 minutes is what this replaces
    for config in (producer_config("127.0.0.1:1", "p"), consumer_config("127.0.0.1:1", "g")):
        assert config["bootstrap.servers"] == "127.0.0.1:1"
        assert config["metadata.recovery.strategy"] == "rebootstrap"
        assert config["metadata.recovery.rebootstrap.trigger.ms"] == REBOOTSTRAP_AFTER_MS


def test_librdkafka_accepts_the_shared_settings() -> None:
    # An admin client is built from them as they are: a setting this librdkafka did not know would raise.
    _admin("127.0.0.1:1")
    assert set(client_config("127.0.0.1:1")) == {
        "bootstrap.servers", "metadata.recovery.strategy", "metadata.recovery.rebootstrap.trigger.ms"}
