"""Every Kafka client in `kinshasa/` is built from the shared settings, and librdkafka accepts them."""

from __future__ import annotations

import re
from pathlib import Path

from kinshasa.topics.admin import _admin
from kinshasa.topics.consumer import consumer_config
from kinshasa.topics.discovery import REBOOTSTRAP_AFTER_MS
from kinshasa.topics.producer import producer_config

PACKAGE = Path(__file__).resolve().parents[2] / "kinshasa"
CLIENT = re.compile(r"^[^#]*\b(Consumer|Producer|AdminClient)\(", re.MULTILINE)
SHARED = re.compile(r"\b(client_config|consumer_config|producer_config)\(")
# Where a client's settings may be spelt out without them: the one-second broker start-up probes, each of
# which lives for a single request.
STARTUP_PROBES = {"infra/kafka.py"}


def test_producers_and_consumers_carry_the_shared_settings() -> None:
    for config in (producer_config("127.0.0.1:1", "p"), consumer_config("127.0.0.1:1", "g")):
        assert config["bootstrap.servers"] == "127.0.0.1:1"
        assert config["metadata.recovery.rebootstrap.trigger.ms"] == REBOOTSTRAP_AFTER_MS


def test_librdkafka_accepts_the_shared_settings() -> None:
    # librdkafka refuses an unknown setting or an out-of-range value when the client is built.
    _admin("127.0.0.1:1")


def test_every_module_that_builds_a_kafka_client_builds_its_settings_from_the_shared_ones() -> None:
    # A module that builds a librdkafka client and calls none of the shared builders spelt its own.
    own_settings = [
        path.relative_to(PACKAGE).as_posix() for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).as_posix() not in STARTUP_PROBES
        and CLIENT.search(path.read_text()) and not SHARED.search(path.read_text())
    ]
    assert not own_settings, own_settings
