"""Coordinator integration tests: real Kafka, Temporal, databases and example services."""
