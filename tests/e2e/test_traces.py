"""Traces across real processes: one agent write is one trace from the gateway through Kafka and a service to
the coordinator, and a revert continues the operator's trace through Temporal to the compensations.

The stack runs with OTEL_EXPORTER_OTLP_ENDPOINT pointed at an OTLP/HTTP receiver inside the test, which
decodes each export with opentelemetry-proto's own classes.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.e2e.api import RECEIPT, Api
from tests.e2e.stack import Stack, running_stack, wait_for

ENTRY_POINT = "e2e.traces"
# The agent's own trace: the gateway continues it.
AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
OPERATOR_TRACE = "5cf92f3577b34da6a3ce929d0e0e4737"
OPERATOR_SPAN = "11f067aa0ba902b8"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


class Receiver:
    """An OTLP/HTTP trace receiver on a free local port; `spans` grows as the processes export."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.take(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                with self.lock:
                    self.spans += [ReceivedSpan(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                                s.parent_span_id.hex()) for s in scope_spans.spans]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.thread.start()
    yield running
    running.server.shutdown()


@pytest.fixture(scope="module")
def traced_stack(receiver: Receiver) -> Iterator[Stack]:
    # Every process inherits the environment; a short batch delay makes spans arrive promptly.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        with running_stack() as stack:
            yield stack


def traced_call(api: Api, trace_id: str, span_id: str, query: str, **variables: Any) -> dict[str, Any]:
    """A GraphQL call carrying the caller's own W3C traceparent header."""
    response = httpx.post(api.url, json={"query": query, "variables": variables}, timeout=30.0,
                          headers={"Authorization": f"Bearer {api.key}",
                                   "traceparent": f"00-{trace_id}-{span_id}-01"})
    body = response.json()
    assert not body.get("errors"), body["errors"]
    data: dict[str, Any] = body["data"]
    return data


def one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, f"expected one {name!r} span from {service}, got {found} among {spans}"
    return found[0]


def ancestry(spans: list[ReceivedSpan], start: ReceivedSpan) -> list[ReceivedSpan]:
    """`start` and each parent up to the trace's root (or the first span not received)."""
    by_id = {s.span_id: s for s in spans}
    chain = [start]
    while (parent := by_id.get(chain[-1].parent_id)) is not None:
        chain.append(parent)
    return chain


def linked(receiver: Receiver, trace_id: str, wanted: tuple[str, str],
           caller_span: str) -> list[ReceivedSpan]:
    """The trace's spans once the `wanted` (service, name) span and all its ancestors up to the caller's
    span have arrived. Spans arrive as they end, so the long ones (a revert's activity) come last."""

    def complete() -> list[ReceivedSpan] | None:
        found = receiver.trace(trace_id)
        last = [s for s in found if (s.service, s.name) == wanted]
        return found if last and ancestry(found, last[0])[-1].parent_id == caller_span else None

    what = f"{wanted[1]} from {wanted[0]} linked to the caller's span"
    spans: list[ReceivedSpan] = wait_for(what, complete)
    return spans


@pytest.fixture(scope="module")
def written(traced_stack: Stack) -> dict[str, Any]:
    """One agent run with one create, applied, under the agent's own trace."""
    agent = Api(traced_stack.gateway_url, traced_stack.key("agent"))
    operator = Api(traced_stack.gateway_url, traced_stack.key("operator"))
    operator.set_policy(ENTRY_POINT, quarantineWindowS=0.0)
    run_id = agent.start_run(ENTRY_POINT)
    query = ("mutation($r: ID!, $i: CreateDocumentInput!) "
             f"{{ createDocument(runId: $r, input: $i) {{ {RECEIPT} }} }}")
    created = traced_call(agent, AGENT_TRACE, AGENT_SPAN, query, r=run_id,
                          i={"title": "traced"})["createDocument"]
    assert created["status"] == "PUBLISHED"
    wait_for("the create to be applied", lambda: agent.command(created["commandId"])["status"] == "APPLIED")
    return {"run_id": run_id, "command": created, "agent": agent, "operator": operator}


def test_one_write_is_one_trace_from_the_gateway_through_the_service_to_the_coordinator(
        receiver: Receiver, written: dict[str, Any]) -> None:
    wanted = ("kinshasa-coordinator", "project documents.create.applied")
    spans = linked(receiver, AGENT_TRACE, wanted, AGENT_SPAN)
    assert {s.service for s in spans} >= {"kinshasa-gateway", "kinshasa-documents", "kinshasa-coordinator"}

    write = one(spans, "kinshasa-gateway", "write documents.create")
    publish = one(spans, "kinshasa-gateway", "publish kinshasa.commands.documents")
    handle = one(spans, "kinshasa-documents", "handle documents.create")
    event = one(spans, "kinshasa-documents", "publish kinshasa.events.documents")
    project = one(spans, *wanted)
    # The write runs inside the request (FastAPI's own request spans, where it has them), which continues
    # the agent's span.
    request = ancestry(spans, write)
    assert {s.service for s in request} == {"kinshasa-gateway"} and request[-1].parent_id == AGENT_SPAN
    assert publish.parent_id == write.span_id
    assert handle.parent_id == publish.span_id
    assert event.parent_id == handle.span_id
    assert project.parent_id == event.span_id


def test_a_revert_continues_the_operators_trace_through_temporal_to_the_compensation(
        receiver: Receiver, written: dict[str, Any]) -> None:
    operator, agent = written["operator"], written["agent"]
    command_id = written["command"]["commandId"]
    traced_call(operator, OPERATOR_TRACE, OPERATOR_SPAN,
                'mutation($id: ID!) { revertRun(runId: $id, reason: "traced revert") { id } }',
                id=written["run_id"])
    wait_for("the create to be compensated", lambda: agent.command(command_id)["status"] == "COMPENSATED")

    wanted = ("kinshasa-documents", "handle documents.create.compensate")
    spans = linked(receiver, OPERATOR_TRACE, wanted, OPERATOR_SPAN)
    links = ancestry(spans, one(spans, *wanted))
    chain = [f"{s.service}: {s.name}" for s in links]
    # From the compensation back to the operator's request: these hops, in this order (with FastAPI's
    # request spans at the end). temporalio's activity spans hang off the workflow's start, whose
    # RunWorkflow span is their sibling.
    expected = [
        "kinshasa-documents: handle documents.create.compensate",
        "kinshasa-coordinator: publish kinshasa.commands.documents",
        "kinshasa-coordinator: RunActivity:compensate_pass",
        "kinshasa-coordinator: StartActivity:compensate_pass",
        "kinshasa-coordinator: SignalWithStartWorkflow:RevertRun",
        "kinshasa-coordinator: start revert",
        "kinshasa-coordinator: project run.revert_requested",
        "kinshasa-gateway: publish kinshasa.runs",
    ]
    assert chain[:3] == expected[:3], chain
    remaining = iter(chain)
    assert all(hop in remaining for hop in expected), chain
    assert chain[-1].startswith("kinshasa-gateway: "), chain
    started = one(spans, "kinshasa-coordinator", "SignalWithStartWorkflow:RevertRun")
    assert any(s.name == "RunWorkflow:RevertRun" and s.parent_id == started.span_id for s in spans), spans
    assert links[-1].parent_id == OPERATOR_SPAN
