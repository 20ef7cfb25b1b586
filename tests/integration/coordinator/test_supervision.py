"""The coordinator's roles are supervised: a projector that dies is named by `/healthz` until it is restarted,
and then it folds run facts into the ledger again; `/metrics` shows the restart, and the ledger's revert
figures once a revert has run.

Real coordinator (projector, Temporal worker, relay, sweeper, API), Kafka, Temporal and SQLite; the
projector's consumer is made to fail as a fatal client error does (`ConsumerError` out of its fetch)
until the test lets it recover.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Message

from kinshasa.infra.temporal import TemporalServer
from kinshasa.kernel.admin_api import load_or_create_internal_token
from kinshasa.topics.consumer import AsyncConsumer, ConsumerError
from tests.integration.coordinator.harness import ServiceFleet, coordinator_stack, wait_for
from tests.integration.prometheus import scrape, scrape_until, value


def _break_consumer(monkeypatch: pytest.MonkeyPatch, group: str) -> threading.Event:
    """While the returned event is set, every fetch of `group`'s consumer fails as a fatal client error
    would (the event is read on the consumer's own thread)."""
    broken = threading.Event()
    fetch = AsyncConsumer._fetch

    def failing_fetch(self: AsyncConsumer) -> list[Message]:
        if broken.is_set() and self.group_id == group:
            raise ConsumerError("fatal client error (injected by the test): the consumer cannot go on")
        return fetch(self)

    monkeypatch.setattr(AsyncConsumer, "_fetch", failing_fetch)
    return broken


async def test_a_dead_projector_is_named_by_healthz_until_it_is_restarted_and_then_projects_again(
    fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique) as stack:
        assert stack.coordinator is not None
        runtime = stack.coordinator[0]
        checks: dict[str, str] = {}

        async with httpx.AsyncClient(base_url=runtime.api_url or "") as http:
            def health(status: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    response = await http.get("/healthz")
                    checks.clear()
                    checks.update(response.json()["checks"])
                    return response.status_code == status

                return check

            await wait_for(health(200), 30, "200 after start")
            assert set(checks) == {"database", "api", "relay", "housekeeping", "worker", "projector",
                                   "sweeper"}

            token = load_or_create_internal_token(tmp_path)
            projector = {"component": "coordinator", "role": "projector"}
            before = await scrape(http, token)
            assert value(before, "kinshasa_role_restarts_total", **projector) == 0

            broken = _break_consumer(monkeypatch, stack.consumer_group)
            broken.set()
            await wait_for(health(503), 30, "503 for the dead projector")
            assert [name for name, why in checks.items() if why != "ok"] == ["projector"]
            assert checks["projector"].startswith("failed: projector is down, restarting since ")
            assert "ConsumerError: fatal client error" in checks["projector"]

            broken.clear()
            await wait_for(health(200), 30, "200 again after the restart")
            after = await scrape(http, token)
            assert value(after, "kinshasa_role_restarts_total", **projector) >= 1
            assert value(after, "kinshasa_role_state", state="running", **projector) == 1
            assert value(after, "kinshasa_role_restarts_total", component="coordinator", role="worker") == 0

            run_id = f"run-{uuid.uuid4()}"
            await stack.start_run(run_id, "agent-a")

            async def projected() -> bool:
                return bool(await stack.ledger.run_facts(run_id))

            await wait_for(projected, 30, "the run fact published after the restart in the ledger")

            # A revert of a run that wrote nothing: requested, then reverted, nothing to compensate.
            await stack.request_revert(run_id, 0)
            await stack.revert_result(run_id)

            def reverted(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> bool:
                return value(samples, "kinshasa_reverts", component="coordinator", status="reverted") == 1

            figures = await scrape_until(http, token, reverted, "the reverted run", within_s=60)
            assert value(figures, "kinshasa_reverts", component="coordinator", status="requested") == 1
            assert value(figures, "kinshasa_reverts", component="coordinator", status="failed") == 0
            assert value(figures, "kinshasa_compensations", component="coordinator", outcome="sent") == 0
