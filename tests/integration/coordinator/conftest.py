"""Fixtures of the coordinator suite: one fleet of real service processes per module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kinshasa.infra.kafka import KafkaBroker
from tests.integration.coordinator.harness import ServiceFleet, service_fleet


@pytest.fixture(scope="module")
def fleet(kafka: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceFleet]:
    """documents, ledger and links as processes on topics of their own (suffix), shared by a module's tests.

    Each test still gets its own coordinator, ledger database, consumer group and task queue, and its
    own runs and entities, so tests never depend on each other.
    """
    root = tmp_path_factory.mktemp("fleet")
    with service_fleet(kafka.bootstrap, root, f"m{uuid.uuid4().hex[:8]}") as running:
        yield running
