"""Tracing with export off (the default): nothing is built, and the caller's traceparent still passes on."""

from __future__ import annotations

import asyncio
import threading
import timeit
from typing import Any

import pytest

from kinshasa.kernel import tracing
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, new_id, utcnow
from kinshasa.topics.consumer import Record

AGENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PUBLISH = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"


@pytest.fixture(autouse=True)
def _export_off() -> None:
    assert not tracing.enabled(), "a test in this process turned export on; these tests need it off"


def command(traceparent: str | None = AGENT) -> Envelope:
    return Envelope(message_id=new_id(), type="documents.rename", run_id="run-1",
                    actor=Actor(kind="agent", id="a"), entity=EntityRef(service="documents", type="document",
                                                                        id="d1"),
                    occurred_at=utcnow(), payload={"title": "t"}, traceparent=traceparent)


def test_without_the_endpoint_setup_builds_nothing_and_starts_no_thread() -> None:
    threads = threading.active_count()
    assert tracing.setup("gateway", {}) is False
    assert tracing.setup("gateway", {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}) is False
    assert not tracing.enabled() and threading.active_count() == threads
    assert tracing.temporal_interceptors() == []
    assert tracing.start_span("x", parent=AGENT) is None


def test_a_span_with_export_off_passes_its_parent_on_and_restores_what_was_before() -> None:
    assert tracing.current_traceparent() is None
    with tracing.span("handle", parent=AGENT) as traceparent:
        assert traceparent == AGENT and tracing.current_traceparent() == AGENT
        with tracing.span("inner") as inner:
            assert inner == AGENT
    assert tracing.current_traceparent() is None


def test_only_well_formed_traceparents_are_taken() -> None:
    assert tracing.valid(AGENT) == AGENT and tracing.valid(AGENT.encode()) == AGENT
    for bad in ("00-abc-def-01", AGENT.upper(), "00-" + "0" * 32 + "-b7ad6b7169203331-01", "", None):
        assert tracing.valid(bad) is None


def test_a_consumer_continues_the_kafka_header_over_the_body() -> None:
    envelope = command()
    record = Record("kinshasa.commands.documents", 0, 0, b"k", envelope.to_bytes(),
                    (("traceparent", PUBLISH.encode()),))
    assert record.envelope().traceparent == PUBLISH
    # No header, the same header, or a malformed one: the body's stands.
    assert Record("t", 0, 0, b"k", envelope.to_bytes()).envelope().traceparent == AGENT
    assert tracing.continued(envelope, AGENT.encode()) is envelope
    assert tracing.continued(envelope, b"garbage").traceparent == AGENT
    assert tracing.continued(command(None), PUBLISH.encode()).traceparent == PUBLISH


def test_the_relay_leaves_headers_alone_with_export_off() -> None:
    headers = (("type", "documents.rename"), ("traceparent", AGENT))
    publishing = tracing.Publishing([("kinshasa.commands.documents", headers), ("t", ())])
    assert publishing.headers(0, headers) == list(headers)
    assert publishing.headers(1, ()) is None
    publishing.end()


async def asgi_call(headers: list[tuple[bytes, bytes]], method: str = "POST") -> str | None:
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(tracing.current_traceparent())

    await tracing.TraceRequests(app)({"type": "http", "method": method, "path": "/graphql",
                                      "headers": headers}, None, None)
    return seen[0]


async def test_the_gateway_takes_the_agents_traceparent_header_and_ignores_a_bad_one() -> None:
    assert await asgi_call([(b"traceparent", AGENT.encode())]) == AGENT
    assert await asgi_call([(b"traceparent", AGENT.encode())], method="GET") == AGENT
    with tracing.continued_from(PUBLISH):
        assert tracing.current_traceparent() == PUBLISH
    assert await asgi_call([(b"traceparent", b"not-a-trace")]) is None
    assert await asgi_call([]) is None
    assert tracing.current_traceparent() is None


def test_the_write_paths_span_costs_well_under_a_microsecond_or_two_with_export_off() -> None:
    def write_span() -> None:
        with tracing.span("write documents.rename", attributes={"kinshasa.run_id": "run-1"}):
            pass

    runs = 20_000
    best = min(timeit.repeat(write_span, number=runs, repeat=5)) / runs
    # Measured about 1.2 microseconds on the 2-core dev box; a group-committed write costs hundreds.
    assert best < 10e-6, f"{best * 1e6:.2f} microseconds per span with export off"


def test_a_span_does_not_leak_into_other_tasks() -> None:
    async def main() -> list[str | None]:
        async def other() -> str | None:
            await asyncio.sleep(0)
            return tracing.current_traceparent()

        task = asyncio.create_task(other())
        with tracing.span("handle", parent=AGENT):
            await asyncio.sleep(0)
        return [await task, tracing.current_traceparent()]

    assert asyncio.run(main()) == [None, None]
