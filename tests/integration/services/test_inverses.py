"""Random operations compensated newest first leave every service's domain state exactly as before.

Each example runs two random sequences through the kit's real handler path (`CommandDispatcher.handle`,
real database, no Kafka): a prefix that stays (the world before the run) and the run itself. The run's
applied steps are then compensated newest first, as the coordinator does. Entities that existed
before must be exactly as they were; entities the run created must be in their removed state
(tombstoned, closed, unlinked). Every compensation must succeed, and a second compensate of the same
step must acknowledge again without changing anything.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.schemas.envelope import Envelope
from kinshasa.services import documents, ledger, links
from kinshasa.services.kit import Service
from kinshasa.services.kit.dispatcher import CommandDispatcher
from kinshasa.services.kit.runtime import ServiceTopics
from tests.integration.services.helpers import command, compensate, service_engine

POOL = 4  # entity slots per example: small, so operations collide with each other often
EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Op = tuple[Any, ...]
Snapshot = Callable[[AsyncConnection], Awaitable[dict[str, dict[str, Any]]]]

text = st.text(alphabet="abcxyz ", min_size=1, max_size=6).filter(lambda s: s.strip() != "")
slot = st.integers(min_value=0, max_value=POOL - 1)

document_ops = st.one_of(
    st.tuples(st.just("create"), slot, text, text),
    st.tuples(st.just("rename"), slot, text),
    st.tuples(st.just("edit"), slot, text),
    st.tuples(st.just("archive"), slot),
    st.tuples(st.just("unarchive"), slot),
)
ledger_ops = st.one_of(
    st.tuples(st.just("open_account"), slot, st.sampled_from(["EUR", "USD"])),
    st.tuples(st.just("post_entry"), slot, st.integers(-10_000, 10_000).filter(bool)),
)
link_ops = st.one_of(
    st.tuples(st.just("link"), slot, slot, slot, st.sampled_from(["refs", "owns"])),
    st.tuples(st.just("unlink"), slot),
)


def document_command(op: Op, ids: list[str], run_id: str) -> Envelope:
    kind, i, *args = op
    payloads: dict[str, dict[str, Any]] = {
        "create": {"title": args[0], "body": args[-1]} if kind == "create" else {},
        "rename": {"document_id": ids[i], "title": args[0]} if kind == "rename" else {},
        "edit": {"document_id": ids[i], "body": args[0]} if kind == "edit" else {},
        "archive": {"document_id": ids[i]},
        "unarchive": {"document_id": ids[i]},
    }
    return command("documents", kind, payloads[kind], ids[i], run_id=run_id)


def ledger_command(op: Op, ids: list[str], run_id: str) -> Envelope:
    kind, i, arg = op
    if kind == "open_account":
        return command("ledger", kind, {"name": f"acct {i}", "currency": arg}, ids[i], run_id=run_id)
    return command(
        "ledger", kind, {"account_id": ids[i], "amount_cents": arg, "memo": "m"}, ids[i], run_id=run_id
    )


def link_command(op: Op, ids: list[str], run_id: str) -> Envelope:
    if op[0] == "link":
        _, i, a, b, kind = op
        # Ends are drawn from a small set so duplicate (from, to, kind) links are attempted often.
        payload = {"from_id": f"node-{a}", "to_id": f"node-{(a + b) % POOL + POOL}", "kind": kind}
        return command("links", "link", payload, ids[i], run_id=run_id)
    _, i = op
    return command("links", "unlink", {"link_id": ids[i]}, ids[i], run_id=run_id)


async def _scenario(
    dispatcher: CommandDispatcher,
    engine: AsyncEngine,
    snapshot: Snapshot,
    removed: Callable[[dict[str, Any]], bool],
    build: Callable[[Op, list[str], str], Envelope],
    prefix: list[Op],
    run: list[Op],
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(POOL)]
    for op in prefix:
        await dispatcher.handle(build(op, ids, "run-before"))
    async with engine.connect() as conn:
        before = await snapshot(conn)

    applied: list[Envelope] = []
    for op in run:
        outcome = await dispatcher.handle(build(op, ids, "run-reverted"))
        assert outcome.event is not None
        if outcome.kind == "applied":
            applied.append(outcome.event)
        else:
            assert outcome.kind == "rejected", outcome

    for event in reversed(applied):
        outcome = await dispatcher.handle(compensate(event))
        assert outcome.kind == "compensated", (event.type, outcome.event and outcome.event.payload)
    async with engine.connect() as conn:
        after = await snapshot(conn)
    assert {k: after[k] for k in before} == before
    created = {k: v for k, v in after.items() if k not in before}
    assert all(removed(state) for state in created.values()), created

    # A straggler re-sent by the coordinator (new attempt, new message id) changes nothing and acks again.
    for event in applied[-2:]:
        again = await dispatcher.handle(compensate(event, attempt=1))
        assert again.kind == "compensated"
        assert again.event is not None and again.event.payload["forward_event_id"] == str(event.message_id)
    async with engine.connect() as conn:
        assert await snapshot(conn) == after


def _check(
    database_url: str,
    service: Service,
    snapshot: Snapshot,
    removed: Callable[[dict[str, Any]], bool],
    build: Callable[[Op, list[str], str], Envelope],
    ops: st.SearchStrategy[Op],
) -> None:
    with asyncio.Runner() as runner:
        engine = runner.run(service_engine(database_url, service))
        topics = ServiceTopics.for_service(service.name)
        dispatcher = CommandDispatcher(service, engine, group=topics.group, events_topic=topics.events)
        try:

            @EXAMPLES
            @given(prefix=st.lists(ops, max_size=8), run=st.lists(ops, min_size=1, max_size=12))
            def property_holds(prefix: list[Op], run: list[Op]) -> None:
                runner.run(_scenario(dispatcher, engine, snapshot, removed, build, prefix, run))

            property_holds()
        finally:
            runner.run(engine.dispose())


def test_documents_compensated_newest_first_restore_state(database_url: str) -> None:
    _check(
        database_url,
        documents.documents,
        documents.domain_state,
        documents.removed,
        document_command,
        document_ops,
    )


def test_ledger_compensated_newest_first_restores_state(database_url: str) -> None:
    _check(database_url, ledger.ledger, ledger.domain_state, ledger.removed, ledger_command, ledger_ops)


def test_links_compensated_newest_first_restore_state(database_url: str) -> None:
    _check(database_url, links.links, links.domain_state, links.removed, link_command, link_ops)
