"""With trace export off, the agent's `traceparent` HTTP header still reaches the command on Kafka and the
run facts its requests record; a malformed one is ignored and the write goes through."""

from __future__ import annotations

from kinshasa.kernel import tracing
from kinshasa.topics.catalogue import RUNS, commands_topic
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, Harness, TopicReader

AGENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OPERATOR = "00-5cf92f3577b34da6a3ce929d0e0e4737-11f067aa0ba902b8-01"
CREATE = ('mutation($r: ID!) { createDocument(runId: $r, input: {title: "t", body: "b"}) '
          "{ commandId status } }")


async def call(h: Harness, query: str, variables: dict[str, str], traceparent: str,
               key: str = AGENT_KEY) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}", "traceparent": traceparent}
    response = await h.client.http.post("/graphql", json={"query": query, "variables": variables},
                                        headers=headers)
    body: dict[str, object] = response.json()
    assert not body.get("errors"), body
    return body


async def test_the_agents_traceparent_reaches_the_command_and_a_revert_request_with_export_off(
        harness: Harness, reader: TopicReader) -> None:
    assert not tracing.enabled()
    h = harness
    await h.client.set_policy({"quarantineWindowS": 0.0})
    run_id = await h.client.start_run()
    await call(h, CREATE, {"r": run_id}, AGENT)
    await call(h, CREATE, {"r": run_id}, "00-not-a-trace-01")
    await call(h, 'mutation($r: ID!) { revertRun(runId: $r, reason: "traced") { id } }', {"r": run_id},
               OPERATOR, key=OPERATOR_KEY)

    commands = await reader.wait_for([commands_topic("documents")], run_id, 2)
    assert sorted(str(c.traceparent) for c in commands) == sorted([AGENT, "None"])
    [requested] = await reader.wait_for([RUNS], run_id, 1, type_prefix="run.revert_requested")
    assert requested.traceparent == OPERATOR


async def test_a_released_command_goes_out_as_the_agent_sent_it_not_in_the_operators_trace(
        harness: Harness, reader: TopicReader) -> None:
    h = harness
    await h.client.set_policy({"quarantineWindowS": 3600.0})
    run_id = await h.client.start_run()
    await call(h, CREATE, {"r": run_id}, AGENT)
    untraced = await h.client.gql(CREATE, {"r": run_id})
    assert untraced["data"]["createDocument"]["status"] == "HELD"
    await call(h, 'mutation($r: ID!) { releaseRun(runId: $r) { count } }', {"r": run_id}, OPERATOR,
               key=OPERATOR_KEY)

    commands = await reader.wait_for([commands_topic("documents")], run_id, 2)
    # Each keeps the trace it was written in: the agent's, or none; the releasing operator's joins neither.
    assert sorted(str(c.traceparent) for c in commands) == sorted([AGENT, "None"])
