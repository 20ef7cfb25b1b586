"""Hostile GraphQL: refused cleanly (never a 500) before any resolver runs, and no command reaches Kafka."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from kinshasa.gateway.store import commands
from kinshasa.topics.catalogue import commands_topic
from tests.integration.gateway.conftest import AGENT_KEY, Harness, TopicReader, outbox_drained


def _create(run_id: str, alias: str = "") -> str:
    prefix = f"{alias}: " if alias else ""
    return f'{prefix}createDocument(runId: "{run_id}", input: {{title: "x"}}) {{ status }}'


async def test_hostile_requests_are_refused_without_effect(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0, "maxWrites": 100_000, "maxVelocity": 100_000})
    run_id = await c.start_run(entry_point="hostile")
    depth_bomb = 'query {{ run(id: "{}") {{ {} }} }}'.format(
        run_id, "commands { " * 30 + "status" + " }" * 30
    )
    aliases = "mutation { " + " ".join(_create(run_id, f"a{i}") for i in range(1000)) + " }"
    tokens = "mutation { " + _create(run_id) + " " + " ".join(f"x{i}: __typename" for i in range(5000)) + " }"
    # Under the alias limit but mixing one real write with a depth bomb: validation fails as a whole.
    mixed = "mutation { " + _create(run_id) + ' }  query Q { run(id: "x") { ' + "commands { " * 30 + " }"
    hostile = {
        "depth bomb": {"query": depth_bomb},
        "1000 aliases": {"query": aliases},
        "40 aliases": {"query": "mutation { " + " ".join(_create(run_id, f"a{i}") for i in range(40)) + " }"},
        "token stream": {"query": tokens},
        "mixed documents": {"query": mixed},
        "introspection": {"query": "{ __schema { types { name } } }"},
        "type introspection": {"query": '{ __type(name: "Run") { fields { name } } }'},
        "wrong types": {
            "query": "mutation($r: ID!) { createDocument(runId: $r, input: {title: 5}) { status } }",
            "variables": {"r": run_id},
        },
        "wrong variable types": {
            "query": f'mutation($i: CreateDocumentInput!) {{ createDocument(runId: "{run_id}", '
            "input: $i) { status } }",
            "variables": {"i": {"title": [1]}},
        },
        "missing arguments": {"query": "mutation { createDocument { status } }"},
        "not a string query": {"query": 12},
        "no query": {"variables": {}},
        "subscription": {"query": "subscription { x }"},
    }
    for name, body in hostile.items():
        response = await c.raw(body)
        assert response.status_code < 500, (name, response.text)
        payload = response.json()
        assert payload.get("errors"), (name, payload)
        assert all(e.get("extensions", {}).get("code") for e in payload["errors"]), (name, payload)
        assert not (payload.get("data") or {}).get("createDocument"), name
    raw_bodies = {
        "malformed JSON": b'{"query": "mutation {',
        "batched operations": json.dumps([{"query": "mutation { " + _create(run_id) + " }"}] * 5).encode(),
        "oversized body": json.dumps({"query": "{ me { id } }", "pad": "x" * 1_000_000}).encode(),
        "not an object": b'"mutation"',
        "binary": bytes(range(256)),
    }
    for name, body in raw_bodies.items():
        response = await c.raw(body)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:200])
        assert response.json()["errors"][0]["extensions"]["code"] == "VALIDATION", name
    introspection_suggestion = await c.raw({"query": "{ rnus { id } }"})
    assert "Did you mean" not in introspection_suggestion.text

    async with harness.gateway.engine.connect() as conn:
        stored = (await conn.execute(select(func.count()).select_from(commands))).scalar_one()
    assert stored == 0
    # The gateway still works after all of it, and its one write is all the run put on Kafka: once it is
    # there, the relay has gone past anything the refused requests could have left.
    ok = await c.data("mutation { " + _create(run_id).replace("{ status }", "{ status commandId }") + " }",
                      key=AGENT_KEY)
    assert ok["createDocument"]["status"] == "PUBLISHED"
    await outbox_drained(harness.gateway.engine)
    on_kafka = await reader.envelopes([commands_topic("documents")], run_id)
    assert [str(e.message_id) for e in on_kafka] == [ok["createDocument"]["commandId"]]
