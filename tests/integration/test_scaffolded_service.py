"""A service fresh from `kinshasa new-service`, run in-process on the test broker, passes conformance."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kinshasa.conformance import run_conformance
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.scaffold import write_service
from kinshasa.services.kit import Service
from kinshasa.testing import running_service


@pytest.fixture
def scaffolded(tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """The Service of a package just written by `kinshasa new-service`, imported from tmp_path."""
    name = f"scaffolded_{unique}"
    root = write_service(name, tmp_path / "src")
    monkeypatch.syspath_prepend(str(root))
    try:
        yield getattr(importlib.import_module(f"{name}.service"), name)
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]


async def test_a_scaffolded_service_passes_the_conformance_kit(kafka: KafkaBroker, tmp_path: Path,
                                                                unique: str, scaffolded: Service) -> None:
    suffix = f"s{unique}"  # a suffix starts with a letter, like a service name
    async with running_service(scaffolded, kafka.bootstrap, tmp_path / "run", suffix):
        report = await run_conformance(scaffolded.name, kafka.bootstrap,
                                       catalogue_topic=f"kinshasa.catalogue.{suffix}", topic_suffix=suffix)
    assert report.ok, report.render()
