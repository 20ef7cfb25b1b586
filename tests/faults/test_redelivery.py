"""Fault 6: every command delivered two or three times, entities' streams interleaved in any order (as
partitions are), and delivered one by one or in batches, as a consumer that crashed and replays from its
last committed offset would. The final state equals a clean run's: each command had one effect, and its
one outcome event."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.outbox import outbox
from kinshasa.schemas.envelope import Envelope
from kinshasa.services import documents
from kinshasa.services.kit.dispatcher import CommandDispatcher
from tests.integration.services.helpers import command, dispatchers

OPS = st.sampled_from(["rename", "edit", "archive", "unarchive"])


def _payload(op: str, doc: str, n: int) -> dict[str, Any]:
    changes = {"rename": {"title": f"title {n}"}, "edit": {"body": f"body {n}"}}.get(op, {})
    return {"document_id": doc, **changes}


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Envelope], list[list[Envelope]]]:
    """The commands in their per-entity order, and a delivery: per entity its stream with replays (a
    redelivery starts again from an earlier message), the streams interleaved, cut into batches."""
    docs = [f"doc-{i}" for i in range(draw(st.integers(1, 3)))]
    streams: dict[str, list[Envelope]] = {}
    for doc in docs:
        ops = draw(st.lists(OPS, min_size=1, max_size=6))
        streams[doc] = [command("documents", "create", {"title": "new", "body": ""}, doc)] + [
            command("documents", op, _payload(op, doc, n), doc) for n, op in enumerate(ops)]
    delivered: dict[str, list[Envelope]] = {}
    for doc, stream in streams.items():
        sent: list[Envelope] = []
        position = 0
        while position < len(stream):
            upto = draw(st.integers(position + 1, len(stream)))
            sent += stream[position:upto]
            # A crash before the offset was committed: replay from an earlier message, one to three times.
            if len(sent) < 3 * len(stream) and draw(st.booleans()):
                position = draw(st.integers(0, upto - 1))
            else:
                position = upto
        delivered[doc] = sent
    order: list[Envelope] = []
    queues = {doc: list(sent) for doc, sent in delivered.items()}
    while any(queues.values()):
        doc = draw(st.sampled_from(sorted(d for d, q in queues.items() if q)))
        order.append(queues[doc].pop(0))
    batches: list[list[Envelope]] = []
    while order:
        size = draw(st.integers(1, min(5, len(order))))
        batches.append(order[:size])
        order = order[size:]
    clean = [e for stream in streams.values() for e in stream]
    return clean, batches


async def _state(engine: AsyncEngine, docs: set[str]) -> tuple[dict[str, Any], Counter[str]]:
    async with engine.connect() as conn:
        state = {doc: [(v["version"], v["title"], v["body"], v["status"], v["command_id"])
                       for v in await documents.versions.history(conn, doc)] for doc in sorted(docs)}
        events = Counter(str(row.message_id) for row in await conn.execute(select(outbox.c.message_id)))
    return state, events


async def _run(dispatcher: CommandDispatcher, batches: list[list[Envelope]]) -> None:
    for batch in batches:
        if len(batch) == 1:
            await dispatcher.handle(batch[0])
        else:
            await dispatcher.handle_batch(batch)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=deliveries())
async def test_redelivered_and_reordered_commands_end_as_a_clean_run(
        case: tuple[list[Envelope], list[list[Envelope]]]) -> None:
    clean, batches = case
    docs = {str(e.entity.id) for e in clean if e.entity is not None}
    with tempfile.TemporaryDirectory() as tmp:
        urls = [f"sqlite+aiosqlite:///{Path(tmp) / name}" for name in ("clean.db", "replayed.db")]
        async with dispatchers(*urls) as make:
            once, replayed = await make(documents.documents), await make(documents.documents)
            await _run(once, [[e] for e in clean])
            await _run(replayed, batches)
            expected, clean_events = await _state(once.engine, docs)
            found, events = await _state(replayed.engine, docs)
    assert found == expected
    assert set(events) == set(clean_events) and set(events.values()) == {1}  # one outcome event each
