"""Agent budgets across runs and entry points that belong to the operator, against the real gateway."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from kinshasa.gateway.store import commands, runs
from kinshasa.kernel.database import create_engine
from tests.integration.gateway.conftest import (
    AGENT_KEY,
    OPERATOR_KEY,
    OTHER_AGENT_KEY,
    PRINCIPALS,
    SUPPORT_AGENT_KEY,
    Harness,
)
from tests.integration.gateway.replicas import gateway_replicas, post

START = "mutation($e: String!) { startRun(entryPoint: $e) { id entryPoint } }"
CREATE = 'mutation($r: ID!) { createDocument(runId: $r, input: {title: "x"}) { commandId status } }'
BUDGET_ALERTS = (
    '{ alerts(kind: "agent_budget") { kind agentId entryPoint threshold { name count limit } details } }'
)


def _budget_refusal(error: dict[str, Any], budget: str, limit: int) -> None:
    extensions = error["extensions"]
    assert extensions["code"] == "AGENT_BUDGET_EXCEEDED", error
    assert extensions["budget"] == budget and extensions["limit"] == limit and extensions["count"] == limit
    assert budget in error["message"]
    assert ("finishRun" if budget == "maxConcurrentRuns" else "retry in") in error["message"]


async def test_an_agent_starting_a_run_per_write_is_refused_past_its_hourly_writes(harness: Harness) -> None:
    c = harness.client
    # The run-per-write escape: a breaker of 5 writes per run never trips when each run gets one write.
    await c.set_policy({"maxWrites": 5, "quarantineWindowS": 0})
    await c.set_policy({"maxAgentWritesPerHour": 10}, scope="AGENT", subject="agent-1")
    accepted, refused = [], []
    began = time.time()
    for _ in range(14):
        run_id = await c.start_run()
        body = await c.create_document(run_id)
        (refused if body.get("errors") else accepted).append(body)
    ended = time.time()
    assert len(accepted) == 10 and len(refused) == 4
    # The writes count by the minute for an hour: room again once the first write's minute has left the
    # hour, 3,540 to 3,660 s after a refusal depending on the minute boundaries the writes straddled.
    soonest = (began // 60 + 61) * 60 - ended - 1
    latest = (ended // 60 + 61) * 60 - began + 1
    for body in refused:
        error = body["errors"][0]
        _budget_refusal(error, "maxAgentWritesPerHour", 10)
        assert soonest <= error["extensions"]["retryAfterS"] <= latest
        assert body["data"] is None
    # Another agent has its own budget (none here): agent-2 writes on.
    other = await c.start_run(key=OTHER_AGENT_KEY)
    assert not (await c.create_document(other, key=OTHER_AGENT_KEY)).get("errors")
    # Four refusals, one breach: one alert saying which agent, which budget, its limit and count.
    alerts = (await c.data(BUDGET_ALERTS, key=OPERATOR_KEY))["alerts"]
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert["agentId"] == "agent-1" and alert["entryPoint"] == "test"
    assert alert["threshold"] == {"name": "maxAgentWritesPerHour", "count": 10.0, "limit": 10.0}
    assert soonest <= alert["details"]["retry_after_s"] <= latest
    # Refused writes created nothing.
    async with harness.gateway.engine.connect() as conn:
        stored = (
            await conn.execute(
                select(func.count())
                .select_from(commands.join(runs, commands.c.run_id == runs.c.run_id))
                .where(runs.c.agent_id == "agent-1")
            )
        ).scalar_one()
    assert stored == 10


async def test_run_budgets_refuse_start_run(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"maxConcurrentRuns": 2, "maxRunsPerHour": 3}, scope="AGENT", subject="agent-1")
    began = time.time()
    first, second = await c.start_run(), await c.start_run()
    refused = await c.error(START, {"e": "test"})
    _budget_refusal(refused, "maxConcurrentRuns", 2)
    assert refused["extensions"]["retryAfterS"] is None and "finishRun" in refused["message"]
    await c.data("mutation($r: ID!) { finishRun(runId: $r) { status } }", {"r": first})
    third = await c.start_run()
    assert third not in (first, second)
    await c.data("mutation($r: ID!) { finishRun(runId: $r) { status } }", {"r": second})
    # Two running no more, but three started this hour.
    refused = await c.error(START, {"e": "test"})
    _budget_refusal(refused, "maxRunsPerHour", 3)
    # A sliding hour from the first start.
    assert 3600 - (time.time() - began) - 1 <= refused["extensions"]["retryAfterS"] <= 3600
    alerts = (await c.data(BUDGET_ALERTS, key=OPERATOR_KEY))["alerts"]
    assert sorted(a["threshold"]["name"] for a in alerts) == ["maxConcurrentRuns", "maxRunsPerHour"]
    # Budgets are the agent's: an entry-point layer may not set them.
    bad = await c.error(
        'mutation { setPolicy(scope: ENTRY_POINT, subject: "test", settings: {maxRunsPerHour: 100}, '
        'reason: "x") { version } }',
        key=OPERATOR_KEY,
    )
    assert bad["extensions"]["code"] == "VALIDATION" and "AGENT" in bad["message"]


async def test_a_disallowed_entry_point_is_forbidden(harness: Harness) -> None:
    c = harness.client
    error = await c.error(START, {"e": "nightly-cleanup"}, key=SUPPORT_AGENT_KEY)
    assert error["extensions"]["code"] == "FORBIDDEN"
    assert "support-bot" in error["message"] and "operator" in error["message"]
    started = (await c.data(START, {"e": " support-bot "}, key=SUPPORT_AGENT_KEY))["startRun"]
    assert started["entryPoint"] == "support-bot"
    me = (await c.data("{ me { id entryPoints } }", key=SUPPORT_AGENT_KEY))["me"]
    assert me == {"id": "agent-3", "entryPoints": ["support-bot"]}
    # Without a list an agent may pick any entry point.
    assert (await c.data("{ me { entryPoints } }"))["me"]["entryPoints"] is None
    await c.start_run(entry_point="nightly-cleanup")
    # Nothing was started by the refusal.
    listed = await c.data('{ runs(filter: {agentId: "agent-3"}) { nodes { entryPoint } } }', key=OPERATOR_KEY)
    assert listed["runs"]["nodes"] == [{"entryPoint": "support-bot"}]


async def test_an_entry_point_layer_cannot_loosen_an_agents_limit_without_loosen(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0, "autoRevert": False})
    await c.set_policy({"maxWrites": 2}, scope="AGENT", subject="agent-1")
    await c.set_policy({"maxWrites": 50}, scope="ENTRY_POINT", subject="lenient")
    run_id = await c.start_run(entry_point="lenient")
    codes = []
    for _ in range(4):
        body = await c.create_document(run_id)
        codes.append(body["errors"][0]["extensions"]["code"] if body.get("errors") else "OK")
    assert codes == ["OK", "OK", "BREAKER_OPEN", "BREAKER_OPEN"]

    # The operator says so explicitly: now the entry point's limit replaces the agent's.
    await c.set_policy({"maxWrites": 50}, scope="ENTRY_POINT", subject="lenient", loosen=True)
    run_id = await c.start_run(entry_point="lenient")
    for _ in range(4):
        assert not (await c.create_document(run_id)).get("errors")
    view = (
        await c.data(
            '{ policy(agentId: "agent-1", entryPoint: "lenient") { effective { maxWrites } '
            "layers { scope subject loosen } history { version loosen } } }",
            key=OPERATOR_KEY,
        )
    )["policy"]
    assert view["effective"]["maxWrites"] == 50
    assert {"scope": "ENTRY_POINT", "subject": "lenient", "loosen": True} in view["layers"]
    assert [h["loosen"] for h in view["history"]] == [True, False, False, False]
    # Another entry point still gets the agent's own limit.
    strict = (
        await c.data(
            '{ policy(agentId: "agent-1", entryPoint: "x") { effective { maxWrites } } }', key=OPERATOR_KEY
        )
    )["policy"]
    assert strict["effective"]["maxWrites"] == 2


RUNS_LIMIT = 30
WRITES_LIMIT = 40
WRITERS = 64


@pytest.mark.postgres
async def test_budgets_are_exact_across_two_replicas(
    postgres: Any, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    async with gateway_replicas(
        postgres, kafka.bootstrap, tmp_path, examples_catalogue, PRINCIPALS, [{}, {}]
    ) as gw:
        urls = gw.urls
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
            policy = await post(
                client,
                urls[0],
                OPERATOR_KEY,
                'mutation { setPolicy(scope: AGENT, subject: "agent-1", reason: "exact", settings: '
                f"{{maxRunsPerHour: {RUNS_LIMIT}, maxAgentWritesPerHour: {WRITES_LIMIT}, "
                "maxVelocity: 100000, quarantineWindowS: 0}) { version } }",
            )
            assert not policy.get("errors"), policy
            gate = asyncio.Event()

            async def starter(index: int) -> dict[str, Any]:
                await gate.wait()
                return await post(client, urls[index % 2], AGENT_KEY, START, {"e": f"e{index % 3}"})

            tasks = [asyncio.create_task(starter(i)) for i in range(WRITERS)]
            gate.set()
            started = await asyncio.gather(*tasks)
            run_ids = [b["data"]["startRun"]["id"] for b in started if not b.get("errors")]
            assert len(run_ids) == RUNS_LIMIT
            for body in started:
                if body.get("errors"):
                    _budget_refusal(body["errors"][0], "maxRunsPerHour", RUNS_LIMIT)

            # Every writer on a run of its own choosing: the runs do not serialise them, the agent's row does.
            gate = asyncio.Event()

            async def writer(index: int) -> list[dict[str, Any]]:
                await gate.wait()
                run_id = run_ids[index % len(run_ids)]
                return [
                    await post(client, urls[index % 2], AGENT_KEY, CREATE, {"r": run_id}) for _ in range(3)
                ]

            tasks_w = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
            gate.set()
            written = [b for batch in await asyncio.gather(*tasks_w) for b in batch]
            accepted = [b for b in written if not b.get("errors")]
            assert len(accepted) == WRITES_LIMIT
            for body in written:
                if body.get("errors"):
                    _budget_refusal(body["errors"][0], "maxAgentWritesPerHour", WRITES_LIMIT)
            alerts = (await post(client, urls[1], OPERATOR_KEY, BUDGET_ALERTS))["data"]["alerts"]
        # One breach per budget, however many refusals on two replicas.
        assert sorted(a["threshold"]["name"] for a in alerts) == ["maxAgentWritesPerHour", "maxRunsPerHour"]

        engine = create_engine(gw.database_url)
        try:
            async with engine.connect() as conn:
                stored = (await conn.execute(select(func.count()).select_from(commands))).scalar_one()
                started_runs = (await conn.execute(select(func.count()).select_from(runs))).scalar_one()
        finally:
            await engine.dispose()
        assert (stored, started_runs) == (WRITES_LIMIT, RUNS_LIMIT)
