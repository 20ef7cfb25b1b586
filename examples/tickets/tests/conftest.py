"""The tickets tests run against a real Kafka broker started by Kinshasa's pytest plugin."""

pytest_plugins = ["kinshasa.testing"]
