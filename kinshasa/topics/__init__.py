"""The log: topic catalogue, idempotent topic creation, the start-up topic check, typed Kafka producer and
consumer."""

from kinshasa.topics.admin import (
    EnsureReport,
    TopicAdminError,
    TopicMismatch,
    TopicState,
    describe_topics,
    ensure_topics,
    list_topics,
)
from kinshasa.topics.catalogue import (
    ALERTS,
    RUNS,
    TopicNameError,
    TopicSpec,
    catalogue,
    commands_topic,
    default_groups,
    dlq_topic,
    events_topic,
    group_id,
)
from kinshasa.topics.checks import TopicCheckError, TopicMinimums, check_topics
from kinshasa.topics.consumer import AsyncConsumer, ConsumerError, Record
from kinshasa.topics.producer import AsyncProducer, Delivered, Outgoing, PublishError, envelope_message

__all__ = [
    "ALERTS",
    "RUNS",
    "AsyncConsumer",
    "AsyncProducer",
    "ConsumerError",
    "Delivered",
    "EnsureReport",
    "Outgoing",
    "PublishError",
    "Record",
    "TopicAdminError",
    "TopicCheckError",
    "TopicMinimums",
    "TopicMismatch",
    "TopicNameError",
    "TopicSpec",
    "TopicState",
    "catalogue",
    "check_topics",
    "commands_topic",
    "default_groups",
    "describe_topics",
    "dlq_topic",
    "ensure_topics",
    "envelope_message",
    "events_topic",
    "group_id",
    "list_topics",
]
