"""The log: topic catalogue, idempotent topic creation, typed Kafka producer and consumer."""
