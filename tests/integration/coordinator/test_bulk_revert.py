"""Bulk reverts (`RevertRuns` via the coordinator's API) revert exactly the runs a selector covers."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta
from pathlib import Path

import httpx

from kinshasa.coordinator.models import RevertRunsResult
from kinshasa.coordinator.starter import bulk_workflow_id
from kinshasa.infra.temporal import TemporalServer
from kinshasa.kernel.admin import load_or_create_internal_token
from kinshasa.schemas.envelope import Envelope, RunEventKind, utcnow
from tests.integration.coordinator.harness import (
    ServiceFleet,
    Stack,
    Workload,
    agent,
    compare,
    coordinator_stack,
    run_fact,
)


async def _bulk(stack: Stack, selector: dict[str, str]) -> RevertRunsResult:
    assert stack.coordinator is not None
    url = stack.coordinator[0].api_url
    token = load_or_create_internal_token(stack.root)
    async with httpx.AsyncClient(base_url=str(url), timeout=30) as http:
        refused = await http.post("/reverts", json={"selector": selector, "reason": "bulk"})
        assert refused.status_code == 401  # starting work on Temporal needs the internal token
        empty = await http.post("/reverts", json={"selector": {}, "reason": "bulk"},
                                headers={"Authorization": f"Bearer {token}"})
        assert empty.status_code == 422 and empty.json()["error"]["code"] == "VALIDATION"
        response = await http.post("/reverts", headers={"Authorization": f"Bearer {token}"},
                                   json={"selector": selector, "reason": "bulk", "max_concurrency": 2})
        assert response.status_code == 202, response.text
        bulk_id = response.json()["bulk_id"]
    handle = stack.client.get_workflow_handle(bulk_workflow_id(bulk_id), result_type=RevertRunsResult)
    return await handle.result()


async def test_bulk_revert_by_agent_and_by_time_range_reverts_exactly_the_selected_runs(
        fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique) as stack:
        now = utcnow()
        plan = {  # run -> (agent, entry point, started hours ago)
            "a1": (f"agent-a-{unique}", "chat", 3.0), "a2": (f"agent-a-{unique}", "batch", 2.0),
            "b1": (f"agent-b-{unique}", "chat", 2.5), "b2": (f"agent-b-{unique}", "chat", 1.0),
        }
        ids = {name: f"{name}-{uuid.uuid4()}" for name in plan}
        works = {name: Workload(random.Random(i)) for i, name in enumerate(plan)}
        world = [cmd for work in works.values() for cmd in work.world(f"setup-{unique}", "setup", 4, 2, 2)]
        await stack.publish(world)
        await stack.wait_results(f"setup-{unique}", len(world))
        before = await stack.snapshot()
        commands: dict[str, list[Envelope]] = {}
        for name, (agent_id, entry_point, hours) in plan.items():
            run_id = ids[name]
            started = (now - timedelta(hours=hours)).isoformat()
            await stack.publish([run_fact(run_id, RunEventKind.STARTED, {
                "agent_id": agent_id, "entry_point": entry_point, "purpose": "bulk", "started_at": started},
                agent(agent_id))])
            commands[name] = works[name].run(run_id, agent_id, 15)
            await stack.publish(commands[name])
            await stack.publish([run_fact(run_id, RunEventKind.FINISHED, {"published_count": 15},
                                          agent(agent_id))])
        for run_id in ids.values():
            await stack.wait_results(run_id, 15)

        by_agent = await _bulk(stack, {"agent_id": f"agent-a-{unique}"})
        assert sorted(o.run_id for o in by_agent.outcomes) == sorted([ids["a1"], ids["a2"]])
        assert {o.status for o in by_agent.outcomes} == {"REVERTED"} and by_agent.reverted == 2
        assert stack.coordinator is not None
        async with httpx.AsyncClient(base_url=str(stack.coordinator[0].api_url), timeout=30) as http:
            progress = (await http.get(f"/runs/{ids['a1']}/revert")).json()
        assert progress["workflow_status"] == "COMPLETED" and progress["progress"]["phase"] == "done"

        window = {"started_after": (now - timedelta(hours=2, minutes=45)).isoformat(),
                  "started_before": (now - timedelta(hours=1, minutes=30)).isoformat()}
        by_time = await _bulk(stack, window)
        # a2 is in the window too: reverting it again is reported and changes nothing.
        assert sorted(o.run_id for o in by_time.outcomes) == sorted([ids["a2"], ids["b1"]])
        assert {o.status for o in by_time.outcomes} == {"REVERTED"}

        for name in ("a1", "a2", "b1"):
            summary = await stack.ledger.summary(ids[name])
            assert summary is not None and summary.status == "REVERTED" and summary.counts.compensated == 15
        untouched = await stack.ledger.summary(ids["b2"])
        assert untouched is not None and untouched.status == "FINISHED" and untouched.counts.compensated == 0
        assert await fleet.compensation_writes(ids["b2"]) == 0
        for name in ("a1", "a2", "b1"):
            assert await fleet.compensation_writes(ids[name]) == 15
        problems = compare(before, await stack.snapshot())
        b2_entities = {c.entity.id for c in commands["b2"] if c.entity is not None}
        assert problems and all(any(e in p for e in b2_entities) for p in problems)
