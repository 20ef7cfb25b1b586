"""What every component process (a service, the coordinator) shares: wiring, its HTTP server, its shutdown.

`wire_dead_letters` puts the DLQ guard around a component's record handler and builds the dead-letter
queue its admin API serves, and points the component's metrics at its outbox backlog and DLQ count.
`database_check` is the health check `/healthz` runs beside the supervisor's roles (`kernel/supervisor.py`).
`run_component` runs a component's main coroutine on uvloop; `http_server`, `wait_started` and
`write_address_file` run the admin/read API and publish where it listens; `drain_outbox` empties the
outbox on a clean stop; `serve_until_signalled` runs a component until SIGTERM or SIGINT, and
`freeze_startup_heap` takes what it built at start out of the garbage collector's full collections.
`verify_topics` is the first step of every start: the topics a component uses, checked against the
stack's minimums, or no start at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.admin_api import HealthCheck
from kinshasa.kernel.dlq import (
    DeadLetterPolicy,
    DeadLetterQueue,
    DlqProducer,
    OutboxDeadLetters,
    SqlDeadLetterStore,
    guarded_handler,
)
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import SqlOutboxStore
from kinshasa.kernel.relay import OutboxRelay
from kinshasa.settings import StackSettings
from kinshasa.topics.catalogue import TopicSpec
from kinshasa.topics.checks import TopicMinimums, check_topics
from kinshasa.topics.consumer import Handler

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class DeadLetterWiring:
    """The guarded handler to give the consumer, and the queue operators inspect and reprocess."""

    guarded: Handler
    queue: DeadLetterQueue


def wire_dead_letters(component: str, engine: AsyncEngine, handler: Handler, *, producer: DlqProducer,
                      group: str, policy: DeadLetterPolicy, metrics: ComponentMetrics) -> DeadLetterWiring:
    """Guard `handler` with the DLQ (its letters in `engine`, copies on `<group>.dlq`) and report the
    outbox backlog and DLQ count through `metrics`."""
    letters = SqlDeadLetterStore(engine)
    guarded = guarded_handler(handler, store=letters, producer=producer, group=group, backoff=policy,
                              metrics=metrics)
    queue = DeadLetterQueue(component, letters, handlers=handler, metrics=metrics,
                            outbox=OutboxDeadLetters(engine))
    outbox = SqlOutboxStore()

    async def outbox_numbers() -> tuple[int, float | None]:
        async with engine.connect() as conn:
            backlog = await outbox.backlog(conn)
        return backlog.pending, backlog.oldest_age_s

    metrics.set_outbox_callback(outbox_numbers)
    metrics.set_dlq_callback(queue.dlq_count)
    return DeadLetterWiring(guarded, queue)


async def verify_topics(component: str, stack: StackSettings, specs: Sequence[TopicSpec]) -> None:
    """Check the topics `component` uses against the stack's minimums before it touches any of them.

    Raises TopicCheckError naming each topic that is missing or falls short (the component's start then
    fails: a service or the coordinator exits non-zero, the gateway's uvicorn never serves); logs the
    differences it can run with. Creating topics is `kinshasa topics ensure`'s job alone.
    """
    minimums = TopicMinimums.from_settings(stack)
    tolerated = await asyncio.to_thread(check_topics, stack.kafka_bootstrap, specs, minimums,
                                        component=component)
    for mismatch in tolerated:
        log.warning("topic differs from the catalogue (the component runs with it): %s", mismatch.line())


def database_check(engine: AsyncEngine) -> HealthCheck:
    """Healthy while the component's database answers a query."""

    async def check() -> bool:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True

    return check


T = TypeVar("T")

# Every component process runs on uvloop (libuv's event loop) and parses HTTP with httptools, where asyncio's
# own loop and uvicorn's pure-Python h11 would serve: at a low rate each write wakes several tasks and
# threads, and the loop's own work per wake-up was a fair share of a lone write. A lone gateway write, 400
# one after another (CPU per write): 5.5 to 5.7 ms on asyncio with h11, 3.8 to 4.9 ms on these; spread 20 ms
# apart, 8.1 to 8.2 against 6.7 to 7.2 ms. Named rather than left to uvicorn's "auto", so an install
# without them fails at start instead of running slower. uvloop does not build on Windows, where the
# package is still installed for its client and its MCP server: asyncio's own loop there.
if sys.platform != "win32":
    import uvloop

    _LOOP, _new_loop = "uvloop", uvloop.new_event_loop
else:
    _LOOP, _new_loop = "asyncio", asyncio.new_event_loop
UVICORN_IMPLEMENTATION: dict[str, Any] = {"loop": _LOOP, "http": "httptools"}


def run_component(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop: a component process's main coroutine, to its end."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(main)


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the component owns SIGTERM/SIGINT and the shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def http_server(app: FastAPI, host: str, port: int) -> QuietServer:
    """A component's HTTP server: no access log, no lifespan, logging left to the component's setup."""
    return QuietServer(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                      lifespan="off", **UVICORN_IMPLEMENTATION))


async def wait_started(server: QuietServer, task: asyncio.Task[Any], failure: str) -> tuple[str, int]:
    """Wait until `server` (running as `task`) listens; returns its (host, port). `failure` is the
    error's message when it could not bind (uvicorn then exits with SystemExit)."""
    while not server.started:
        if task.done():
            raise RuntimeError(failure)
        await asyncio.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return str(host), int(port)


def write_address_file(data_dir: Path, name: str, address: Mapping[str, Any]) -> None:
    """`<data_dir>/run/<name>.json`: how the stack and the gateway find a port picked at random."""
    path = Path(data_dir) / "run" / f"{name}.json"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(address)))


async def drain_outbox(relay: OutboxRelay, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Publish what was committed last, so a clean stop leaves no backlog."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            stats = await relay.run_once()
        except Exception:
            log.exception("outbox drain failed; the rows stay pending and go out after the restart")
            return
        if stats.claimed == 0:
            return


def freeze_startup_heap() -> None:
    """Move everything alive after startup out of the cyclic garbage collector's sight (`gc.freeze`).

    A component process holds 150,000 to 250,000 long-lived objects (the schema, SQLAlchemy, pydantic,
    temporalio, the Kafka client). Every full collection traversed them all, with the process stopped:
    95 to 107 ms in a service and the coordinator, about once in 20 s at 50 writes a second
    (`bench/bench_latency.py`), 1 ms frozen; in the gateway under load, several times a second, 0.1-0.3
    ms of CPU a request (`bench/bench_gateway.py`). Frozen objects are still freed by reference counting;
    only cycles among them would stay, and the startup heap lives as long as the process anyway.
    """
    gc.collect()
    gc.freeze()


async def serve_until_signalled(run: Callable[[asyncio.Event], Awaitable[None]],
                                ready: asyncio.Event | None = None) -> None:
    """`run(stop)` until SIGTERM or SIGINT sets `stop`; the component then shuts down gracefully.

    Once `ready` is set (the component has started), its startup heap is frozen (`freeze_startup_heap`).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    freezing = asyncio.create_task(_freeze_when(ready)) if ready is not None else None
    try:
        await run(stop)
    finally:
        if freezing is not None:
            freezing.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _freeze_when(ready: asyncio.Event) -> None:
    await ready.wait()
    freeze_startup_heap()
