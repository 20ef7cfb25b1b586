"""Distributed tracing: one W3C trace per agent write, carried by envelopes and Kafka headers, exported over
OTLP/HTTP only when OTEL_EXPORTER_OTLP_ENDPOINT is set.

The trace of a write: the gateway's request span (continuing the agent's own `traceparent` HTTP header
when it sends one), the relay's publish span per outbox row, the service's handle span, the relay's
publish of its event, the coordinator's projection of that event. A revert continues the trace of the
`revert_requested` fact through Temporal (temporalio's TracingInterceptor carries it into the workflow and
its activities) to the compensate commands and their handlers.

The envelope's `traceparent` is the span that emitted the message; the Kafka `traceparent` header is the
relay's publish span, so a consumer that continues the header (`continued`) is a child of the publish.

Export off (the variable unset, the default): no SDK, no exporter, no thread is ever built, and the helpers
cost a context-variable read and write. The trace context is still passed on: an agent's `traceparent`
reaches the command envelope, every event derived from it and every Kafka header, so a collector behind
the agent (or a later process that does export) can still join the pieces.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

from kinshasa.schemas.envelope import continued, valid_traceparent

# The contract's rules for a traceparent (well-formed, the Kafka header over the body) live with the
# envelope; re-exported here beside the spans that use them.
valid = valid_traceparent
__all__ = ["continued", "valid"]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
HEADER = "traceparent"
SpanKind = Literal["internal", "server", "client", "producer", "consumer"]

_tracer: Tracer | None = None
# With export off, the traceparent in force (the agent's, or the message being handled): what new
# messages carry. With export on, OpenTelemetry's own context plays that part.
_inherited: ContextVar[str | None] = ContextVar("kinshasa_traceparent", default=None)


def setup(component: str, environ: Mapping[str, str] | None = None) -> bool:
    """Export this process's spans as `service.name=kinshasa-<component>` when OTEL_EXPORTER_OTLP_ENDPOINT
    is set; True if it is. Called once from each process's start-up; a second call changes nothing.

    The variable is OpenTelemetry's own, read here rather than from a Settings class because the
    exporter reads its companions itself (OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_SCHEDULE_DELAY, ...).
    """
    global _tracer
    env = os.environ if environ is None else environ
    if _tracer is not None:
        return True
    if not env.get(ENDPOINT_VARIABLE):
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"kinshasa-{component}"}))
    # The exporter appends /v1/traces to the endpoint, as the OTLP specification says.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    # A process that stops cleanly (SIGTERM included) sends what it still holds.
    atexit.register(provider.shutdown)
    _tracer = provider.get_tracer("kinshasa")
    return True


def enabled() -> bool:
    return _tracer is not None


def current_traceparent() -> str | None:
    """The traceparent a message emitted now should carry: the current span's, or with export off, the
    one inherited from the request or message being handled."""
    if _tracer is None:
        return _inherited.get()
    from opentelemetry import trace

    return _format(trace.get_current_span())


@contextmanager
def span(name: str, *, parent: str | None = None, kind: SpanKind = "internal",
         attributes: Mapping[str, Any] | None = None) -> Iterator[str | None]:
    """A span made current for the block, child of `parent` (a traceparent) or else of the current span;
    yields its traceparent. With export off it only makes `parent` (if given) the inherited one."""
    if _tracer is None:
        token = _inherited.set(parent) if parent is not None else None
        try:
            yield parent if parent is not None else _inherited.get()
        finally:
            if token is not None:
                _inherited.reset(token)
        return
    context = _context(parent) if parent is not None else None
    with _tracer.start_as_current_span(name, context=context, kind=_kind(kind),
                                       attributes=dict(attributes or {})) as current:
        yield _format(current)


def start_span(name: str, *, parent: str | None, kind: SpanKind = "internal",
               attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span the caller ends (`end`), not made current; None with export off."""
    if _tracer is None:
        return None
    context = _context(parent) if parent is not None else None
    return _tracer.start_span(name, context=context, kind=_kind(kind), attributes=dict(attributes or {}))


def end(spans: Sequence[Span | None], error: BaseException | None = None) -> None:
    for started in spans:
        if started is None:
            continue
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            started.set_status(Status(StatusCode.ERROR, type(error).__name__))
        started.end()


def traceparent_of(started: Span | None) -> str | None:
    return None if started is None else _format(started)


class Publishing:
    """The relay's publish spans of one batch: one per row, child of the row's traceparent header, whose
    own traceparent replaces that header on the way out. With export off the rows go out unchanged."""

    def __init__(self, rows: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> None:
        self.spans: list[Span | None] = []
        if _tracer is None:
            return
        for topic, headers in rows:
            parent = next((value for name, value in reversed(headers) if name == HEADER), None)
            self.spans.append(None if parent is None else start_span(
                f"publish {topic}", parent=parent, kind="producer",
                attributes={"messaging.system": "kafka", "messaging.destination.name": topic}))

    def headers(self, index: int, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]] | None:
        started = self.spans[index] if self.spans else None
        if started is None:
            return list(headers) or None
        traceparent = _format(started)
        return [(name, value) for name, value in headers if name != HEADER] + [(HEADER, traceparent or "")]

    def end(self, error: BaseException | None = None) -> None:
        end(self.spans, error)


def temporal_interceptors() -> list[Any]:
    """temporalio's tracing interceptor, for the client (the worker inherits it), when exporting."""
    if _tracer is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(_tracer)]


class TraceRequests:
    """ASGI middleware: each HTTP request continues the caller's `traceparent` header, so the spans of the
    request (FastAPI's own server span, when its telemetry is there) and the command envelope it writes
    join the caller's trace; with export off the envelope still carries it. A malformed header is
    ignored, never refused: tracing must not fail a write."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        incoming = None
        if scope["type"] == "http":
            for name, value in scope.get("headers") or ():
                if name == b"traceparent":
                    incoming = valid(value)
        if incoming is None:
            await self.app(scope, receive, send)
            return
        with continued_from(incoming):
            await self.app(scope, receive, send)


@contextmanager
def continued_from(traceparent: str) -> Iterator[None]:
    """Make `traceparent` the current trace context for the block, without a span of its own."""
    if _tracer is None:
        token = _inherited.set(traceparent)
        try:
            yield
        finally:
            _inherited.reset(token)
        return
    from opentelemetry import context

    attached = context.attach(_context(traceparent))
    try:
        yield
    finally:
        context.detach(attached)


def _format(current: Span) -> str | None:
    context = current.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _context(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({HEADER: traceparent})


def _kind(kind: SpanKind) -> Any:
    from opentelemetry.trace import SpanKind as Kind

    return Kind[kind.upper()]
