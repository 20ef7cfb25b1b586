"""Pure decisions of the Kafka layer: pinned client settings, fatal-error rebuilds, envelope framing."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, Message

from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, new_id, utcnow
from kinshasa.topics.consumer import consumer_config, to_record
from kinshasa.topics.producer import (
    Delivered,
    FailedSend,
    Outgoing,
    PublishError,
    envelope_message,
    producer_config,
    should_rebuild,
)


def test_producer_is_idempotent_with_acks_all() -> None:
    config = producer_config("127.0.0.1:9092", "relay", {"linger.ms": 20})
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger.ms"] == 20
    assert config["client.id"] == "relay"
    assert config["bootstrap.servers"] == "127.0.0.1:9092"


def test_producers_do_not_linger_and_keep_the_gapless_guarantee() -> None:
    config = producer_config("127.0.0.1:9092", "relay")
    assert config["linger.ms"] == 0
    assert config["enable.gapless.guarantee"] is True


@pytest.mark.parametrize("weakening", [{"enable.idempotence": False}, {"enable.idempotence": "false"},
                                       {"acks": "1"}, {"acks": 0}, {"enable.gapless.guarantee": False}])
def test_producer_refuses_weaker_delivery_settings(weakening: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="refused"):
        producer_config("b:9092", "relay", weakening)


def test_producer_accepts_restating_the_pinned_settings() -> None:
    config = producer_config("b:9092", "relay", {"acks": -1, "enable.idempotence": "true"})
    assert config["acks"] == "all"
    assert config["enable.idempotence"] is True


@pytest.mark.parametrize(("error", "rebuild"), [
    (None, False),
    (KafkaError(KafkaError._FATAL, "fenced", fatal=True), True),
    (KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "gap", fatal=True), True),
    (KafkaError(KafkaError._FATAL), True),
    (KafkaError(KafkaError._MSG_TIMED_OUT), False),
    (KafkaError(KafkaError._TRANSPORT, "broker down", retriable=True), False),
    (KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), False),
])
def test_only_fatal_errors_rebuild_the_producer(error: KafkaError | None, rebuild: bool) -> None:
    assert should_rebuild(error) is rebuild


def test_consumer_stores_offsets_only_by_hand() -> None:
    config = consumer_config("b:9092", "kinshasa.svc.documents", {"session.timeout.ms": 6000})
    assert config["enable.auto.offset.store"] is False
    assert config["enable.auto.commit"] is True
    assert config["auto.offset.reset"] == "earliest"
    assert config["session.timeout.ms"] == 6000
    with pytest.raises(ValueError, match=r"enable\.auto\.offset\.store"):
        consumer_config("b:9092", "g", {"enable.auto.offset.store": True})


def test_envelope_message_is_keyed_by_entity_with_type_headers() -> None:
    envelope = Envelope(
        message_id=new_id(), type="documents.archive", run_id="run-1",
        actor=Actor(kind="agent", id="agent-7"),
        entity=EntityRef(service="documents", type="document", id="doc-1"),
        occurred_at=utcnow(), traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    out = envelope_message("kinshasa.commands.documents", envelope)
    assert out.key == b"documents:doc-1"
    assert Envelope.from_bytes(out.value) == envelope
    assert dict(out.headers or {}) == {
        "type": "documents.archive", "message_id": str(envelope.message_id),
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }


def test_publish_error_says_which_items_failed_and_what_to_do() -> None:
    item = Outgoing("t", b"k", b"v")
    error = PublishError([FailedSend(1, item, "Broker: Unknown topic")],
                         [Delivered("t", 0, 7), None])
    assert error.delivered[0] == Delivered("t", 0, 7)
    assert "1 of 2 messages not delivered" in str(error)
    assert "item 1" in str(error)
    assert "kinshasa topics ensure" in str(error)


def test_record_copies_message_fields() -> None:
    msg = Message(topic="t", partition=2, offset=41, key=b"k", value=b"v",
                  headers=[("type", b"documents.archive"), ("empty", None)], timestamp=(1, 1_700_000_000_000))
    record = to_record(msg)
    assert (record.topic, record.partition, record.offset) == ("t", 2, 41)
    assert (record.key, record.value) == (b"k", b"v")
    assert record.header("type") == b"documents.archive"
    assert record.header("empty") == b""
    assert record.header("missing") is None
    assert record.timestamp is not None and record.timestamp.year == 2023
