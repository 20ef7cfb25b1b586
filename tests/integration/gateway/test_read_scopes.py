"""Read scopes: an agent reads a service's entities only with `<service>:read` (or `*`); operators read all.

The example declarations in this suite name no read API, so a read that passes the scope check reaches
the backend lookup and answers BACKEND_UNAVAILABLE, while a read without the scope is FORBIDDEN before
any backend is asked: the two codes tell the paths apart.
"""

from __future__ import annotations

from tests.integration.gateway.conftest import (
    AGENT_KEY,
    OPERATOR_KEY,
    OTHER_AGENT_KEY,
    SUPPORT_AGENT_KEY,
    Harness,
)

DOCUMENT = '{ document(id: "d") { id } }'
ENTITY = '{ entity(service: "documents", type: "document", id: "d") { id } }'
ACCOUNT = '{ account(id: "a") { id } }'
LINKS = '{ links(entityId: "d") { id } }'


async def _code(harness: Harness, query: str, key: str) -> str:
    error = await harness.client.error(query, key=key)
    return str(error["extensions"]["code"])


async def test_reads_need_the_services_read_scope(harness: Harness) -> None:
    c = harness.client
    # agent-2 may write documents (`documents.*`) but that is no read scope.
    for query in (DOCUMENT, ENTITY, ACCOUNT, LINKS):
        error = await c.error(query, key=OTHER_AGENT_KEY)
        assert error["extensions"]["code"] == "FORBIDDEN", (query, error)
        assert ":read" in error["message"]
    # agent-3 has `documents:read`: documents, and documents only.
    assert await _code(harness, DOCUMENT, SUPPORT_AGENT_KEY) == "BACKEND_UNAVAILABLE"
    assert await _code(harness, ENTITY, SUPPORT_AGENT_KEY) == "BACKEND_UNAVAILABLE"
    assert await _code(harness, ACCOUNT, SUPPORT_AGENT_KEY) == "FORBIDDEN"
    assert await _code(harness, LINKS, SUPPORT_AGENT_KEY) == "FORBIDDEN"
    # `*` reads everything; so does every operator.
    for key in (AGENT_KEY, OPERATOR_KEY):
        for query in (DOCUMENT, ENTITY, ACCOUNT, LINKS):
            assert await _code(harness, query, key) == "BACKEND_UNAVAILABLE", (key, query)


async def test_a_list_read_by_run_needs_the_scope_before_the_run_is_looked_at(harness: Harness) -> None:
    c = harness.client
    run_id = await c.start_run(key=OTHER_AGENT_KEY)
    emails = f'{{ emails(runId: "{run_id}") {{ id }} }}'
    assert await _code(harness, emails, OTHER_AGENT_KEY) == "FORBIDDEN"
    assert await _code(harness, emails, OPERATOR_KEY) == "BACKEND_UNAVAILABLE"
