"""Local infrastructure started by the project itself: Kafka (KRaft), Temporal dev server, PostgreSQL."""
