"""Authorization matrix: agents call no operator mutation, write only to their own runs; nothing changes."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select

from kinshasa.gateway.store import alerts, commands, policy_versions, runs
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, OTHER_AGENT_KEY, Harness

OPERATOR_MUTATIONS = {
    "revertRun": 'revertRun(runId: "{run}", reason: "r") {{ id }}',
    "revertRuns": 'revertRuns(selector: {{runIds: ["{run}"]}}, reason: "r") {{ requested {{ id }} }}',
    "releaseRun": 'releaseRun(runId: "{run}") {{ count }}',
    "discardRun": 'discardRun(runId: "{run}") {{ count }}',
    "holdRun": 'holdRun(runId: "{run}") {{ count }}',
    "setBreaker": 'setBreaker(runId: "{run}", state: OPEN) {{ id }}',
    "approveEgress": 'approveEgress(commandId: "{email}") {{ status }}',
    "denyEgress": 'denyEgress(commandId: "{email}", reason: "r") {{ status }}',
    "reprocessDlq": 'reprocessDlq(component: "gateway", messageIds: ["x"]) {{ count }}',
    "setPolicy": 'setPolicy(scope: DEFAULT, settings: {{maxWrites: 1}}, reason: "r") {{ version }}',
    "acceptProposal": 'acceptProposal(id: "{run}", reason: "r") {{ status }}',
    "rejectProposal": 'rejectProposal(id: "{run}", reason: "r") {{ status }}',
}
OPERATOR_QUERIES = [
    "dlq { component }",
    "alerts { id }",
    "policy { version }",
    "incidents { nodes { id } }",
    'incident(id: "00000000-0000-0000-0000-000000000000") { id }',
    'backtestPolicy(scope: DEFAULT, settings: {maxWrites: 1}, since: "2020-01-01T00:00:00Z") '
    "{ runsReplayed }",
]


async def _state(harness: Harness) -> dict[str, Any]:
    async with harness.gateway.engine.connect() as conn:
        snapshot = {
            "runs": [tuple(r) for r in await conn.execute(select(runs).order_by(runs.c.run_id))],
            "commands": [
                tuple(r) for r in await conn.execute(select(commands).order_by(commands.c.command_id))
            ],
            "alerts": (await conn.execute(select(func.count()).select_from(alerts))).scalar_one(),
            "policy": (await conn.execute(select(func.count()).select_from(policy_versions))).scalar_one(),
        }
        await conn.rollback()
    return snapshot


async def test_operator_mutations_refuse_agents(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 600})
    run_id = await c.start_run()
    await c.create_document(run_id)
    email = (
        await c.data(
            f'mutation {{ sendEmail(runId: "{run_id}", input: {{to: "a@example.org", subject: "s"}}) '
            "{ commandId } }"
        )
    )["sendEmail"]["commandId"]
    assert set(OPERATOR_MUTATIONS) == {
        "revertRun",
        "revertRuns",
        "releaseRun",
        "discardRun",
        "holdRun",
        "setBreaker",
        "approveEgress",
        "denyEgress",
        "reprocessDlq",
        "setPolicy",
        "acceptProposal",
        "rejectProposal",
    }
    before = await _state(harness)
    for name, call in OPERATOR_MUTATIONS.items():
        for key in (AGENT_KEY, OTHER_AGENT_KEY):
            error = await c.error("mutation { " + call.format(run=run_id, email=email) + " }", key=key)
            assert error["extensions"]["code"] == "FORBIDDEN", (name, error)
    for query in OPERATOR_QUERIES:
        assert (await c.error("{ " + query + " }"))["extensions"]["code"] == "FORBIDDEN"
    assert await _state(harness) == before
    # The same calls by an operator are accepted: the matrix tests kind, not a broken mutation.
    assert (await c.gql(f'mutation {{ holdRun(runId: "{run_id}") {{ count }} }}', key=OPERATOR_KEY)).get(
        "errors"
    ) is None


async def test_agents_write_only_to_their_own_runs(harness: Harness) -> None:
    c = harness.client
    mine = await c.start_run()
    before = await _state(harness)
    for call in (
        f'createDocument(runId: "{mine}", input: {{title: "x"}}) {{ status }}',
        f'archiveDocument(runId: "{mine}", documentId: "d") {{ status }}',
        f'finishRun(runId: "{mine}") {{ status }}',
    ):
        error = await c.error("mutation { " + call + " }", key=OTHER_AGENT_KEY)
        assert error["extensions"]["code"] == "FORBIDDEN", error
    assert (await c.error(f'{{ run(id: "{mine}") {{ id }} }}', key=OTHER_AGENT_KEY))["extensions"][
        "code"
    ] == "FORBIDDEN"
    # Operators do not write through runs at all.
    error = await c.error(
        f'mutation {{ createDocument(runId: "{mine}", input: {{title: "x"}}) {{ status }} }}',
        key=OPERATOR_KEY,
    )
    assert error["extensions"]["code"] == "FORBIDDEN"
    assert await _state(harness) == before
    unknown = await c.error(f'mutation {{ finishRun(runId: "{uuid.uuid4()}") {{ status }} }}')
    assert unknown["extensions"]["code"] == "RUN_NOT_FOUND"
