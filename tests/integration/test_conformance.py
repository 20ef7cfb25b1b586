"""`kinshasa conformance` against every example service in this repository, each running for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinshasa.conformance import run_conformance
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.services.kit import Service
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.services.registry import all_services
from kinshasa.services.smtp_sink import SmtpSink
from tests.integration.services.helpers import Running, make_runtime


@pytest.mark.parametrize("service", all_services(), ids=lambda s: s.name)
async def test_every_example_service_passes_the_conformance_kit(
    service: Service, kafka: KafkaBroker, tmp_path: Path, unique: str
) -> None:
    suffix = f"c{unique}"
    smtp_port = free_port()
    with SmtpSink(tmp_path / "mail", port=smtp_port):
        runtime = make_runtime(service, kafka, f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}", tmp_path,
                               ServiceTopics.for_service(service.name, suffix), token="t",
                               smtp_port=smtp_port)
        running = Running(runtime)
        try:
            await running.started()
            report = await run_conformance(service.name, kafka.bootstrap, timeout_s=30, topic_suffix=suffix)
        finally:
            await running.shutdown()
    print(report.render())
    assert report.ok, report.render()
    names = {check.name for check in report.checks}
    assert {"duplicate", "compensate", "compensate_unknown", "malformed"} <= names
    assert {f"apply:{op.spec.name}" for op in service.operations.values()} <= names
