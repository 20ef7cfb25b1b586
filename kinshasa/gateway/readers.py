"""Costly reads in processes of their own, so one principal's big reads cannot slow everyone's writes.

Cost and fairness bound how much of the gateway one principal may take, but within its share a
principal firing the costliest reads it is allowed still keeps this process's CPU busy for a quarter
of a second at a time (`bench/bench_isolation.py`): every write arriving meanwhile waits behind it, on
the same event loop. So a query estimated at `read_offload_cost` or more runs elsewhere: in one of
`readers` child processes of this gateway, at a lower CPU priority (`reader_nice`). This process
still authenticates the request, estimates its cost and charges the principal's bucket (it stays in
flight here until answered); the reader only executes it and hands back the answer, byte for byte.

* A reader is a gateway of its own on the same database and catalogue topic, serving /graphql to this
  process alone: it listens on 127.0.0.1, answers nothing but /healthz without the secret its gateway
  gave it (one per pool, on stdin; not the stack's internal token, which other components hold),
  runs queries only, and takes the principal this process authenticated from a header
  (`PRINCIPAL_HEADER`). It runs no background role but the catalogue follower, which decides in
  memory only (the gateway records what it accepts), has no rate limits of its own, never offloads,
  and exits if its follower fails for good, to be started afresh.
* Readers start at the first costly read (a gateway that never sees one never starts them) and run as
  supervisor roles (`reader-1`, ...): one that dies is restarted with backoff. Until one is ready, or
  if it fails a request before answering, the read runs here as it would without readers.
* A reader is the child of its gateway: it gets its settings on stdin, and exits when that pipe
  closes, so a gateway that dies (even SIGKILLed) takes its readers with it.
* Mutations, subscriptions and reads under the threshold never leave this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

import httpx
from graphql import GraphQLSchema, OperationType, get_operation_ast
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kinshasa.gateway.errors import RateLimited
from kinshasa.gateway.fairness import Fairness
from kinshasa.gateway.hardening import DocumentCache, error_body
from kinshasa.gateway.principals import Principal
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.kernel.supervisor import RestartPolicy, Supervisor
from kinshasa.mcp.http import bearer_key
from kinshasa.settings import StackSettings

log = logging.getLogger(__name__)

# Headers from the gateway to its reader: the pool's secret, and the principal it authenticated.
SECRET_HEADER = "x-kinshasa-reader-secret"
PRINCIPAL_HEADER = "x-kinshasa-principal"
# Request headers passed on to a reader as they came (the caller's trace goes on in the reader).
PASSED_ON = (b"content-type", b"traceparent", b"tracestate")
# How long a started reader may take to answer /healthz before it counts as failed (and is restarted).
READY_WITHIN_S = 60.0
# How long a stopping reader may take to finish what it serves before it is killed.
STOP_WITHIN_S = 10.0


def principal_header(principal: Principal) -> str:
    return json.dumps({
        "id": principal.id, "kind": principal.kind, "scopes": sorted(principal.scopes),
        "entryPoints": None if principal.entry_points is None else sorted(principal.entry_points),
    })


def principal_from_header(value: str) -> Principal:
    given = json.loads(value)
    entry_points = given.get("entryPoints")
    return Principal(
        id=given["id"], kind=given["kind"], scopes=frozenset(given["scopes"]),
        entry_points=None if entry_points is None else frozenset(entry_points),
    )


def trusted_principal(headers: Any, secret: str) -> Principal | None:
    """In a reader: the principal its gateway sent, if the request carries the pool's secret."""
    value = headers.get(PRINCIPAL_HEADER)
    if value is None or not _same(headers.get(SECRET_HEADER), secret):
        return None
    return principal_from_header(value)


def _same(given: str | bytes | None, secret: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given if isinstance(given, bytes) else given.encode(), secret.encode())


@dataclass(frozen=True)
class Offload:
    """A read to run in a reader: who asked, what its estimated cost charged them, and which reader."""

    principal: Principal
    cost: float
    url: str


def is_one_query(cache: DocumentCache, body: Any) -> bool:
    """Is `body` a request for one query (not a mutation or subscription), whether valid or not?"""
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        return False
    name = body.get("operationName")
    if name is not None and not isinstance(name, str):
        return False
    try:
        operation = get_operation_ast(cache.parse(body["query"]), name)
    except Exception:  # a document that does not parse is no query
        return False
    return operation is not None and operation.operation is OperationType.QUERY


def costly_read(
    cache: DocumentCache, schema: GraphQLSchema, body: Any, threshold: float,
) -> float | None:
    """The estimated cost of `body` (a parsed /graphql request) if it is one query costing at least
    `threshold` and at most the cost limit; None for anything else, which runs in this process (a
    document that does not parse or cost is refused there, as it is without readers). Validation is
    the reader's: an invalid query it is sent answers the same errors from there."""
    if not is_one_query(cache, body):
        return None
    variables = body.get("variables")
    if variables is not None and not isinstance(variables, dict):
        return None
    try:
        cost = cache.cost(schema, body["query"], body.get("operationName"), variables)
    except Exception:  # any failure is answered by the local path, which says why
        return None
    return cost if threshold <= cost <= cache.max_cost else None


class ReaderProcess:
    """One reader child: started, watched and stopped by `run`, a supervisor role."""

    def __init__(self, name: str, settings: GatewayConfig, stack: StackSettings, secret: str,
                 nice: int) -> None:
        self.name = name
        self.settings = settings
        self.stack = stack
        self.secret = secret
        self.nice = nice
        self.url: str | None = None  # set while the reader answers /healthz
        self.pid: int | None = None

    def handover(self) -> bytes:
        """What the child reads from stdin: its settings (secrets included, hence not in argv or env)."""
        return json.dumps({
            "gateway": self.settings.model_dump(mode="json"),
            "stack": self.stack.model_dump(mode="json"),
            "secret": self.secret,
            "nice": self.nice,
        }).encode() + b"\n"

    async def run(self, stop: asyncio.Event) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kinshasa.gateway", "reader",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        self.pid = process.pid
        drained: asyncio.Task[None] | None = None
        try:
            process.stdin.write(self.handover())
            await process.stdin.drain()
            port = await self._port(process, stop)
            if port is None:
                return
            drained = asyncio.create_task(_drain(process.stdout))
            url = f"http://127.0.0.1:{port}"
            if not await self._ready(url, process, stop):
                return
            self.url = url
            log.info("%s serves costly reads at %s (pid %d)", self.name, url, process.pid)
            exited = asyncio.create_task(process.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not stop.is_set():
                raise RuntimeError(f"{self.name} exited with code {process.returncode}")
        finally:
            self.url = None
            await _end(process)
            if drained is not None:
                drained.cancel()

    async def _port(self, process: asyncio.subprocess.Process, stop: asyncio.Event) -> int | None:
        """The port the child listens on, from its first line of stdout."""
        assert process.stdout is not None
        line = asyncio.create_task(process.stdout.readline())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([line, stopping], timeout=READY_WITHIN_S, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            line.cancel()
            return None
        if not line.done() or not line.result():
            line.cancel()
            raise RuntimeError(f"{self.name} did not start within {READY_WITHIN_S:g} s "
                               f"(exit code {process.returncode})")
        return int(json.loads(line.result())["port"])

    async def _ready(self, url: str, process: asyncio.subprocess.Process, stop: asyncio.Event) -> bool:
        """Wait for /healthz to answer 200: True, or False when asked to stop first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_WITHIN_S
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while not stop.is_set():
                if process.returncode is not None:
                    raise RuntimeError(f"{self.name} exited with code {process.returncode} at start")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{url}/healthz")).status_code == 200:
                        return True
                if loop.time() > deadline:
                    raise RuntimeError(f"{self.name} did not answer /healthz within {READY_WITHIN_S:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)
        return False


async def _drain(stream: asyncio.StreamReader) -> None:
    # The child's stdout carries its port and nothing else, but a full pipe would stall it.
    while await stream.read(65536):
        pass


async def _end(process: asyncio.subprocess.Process) -> None:
    """Close the child's stdin (it stops serving and exits), then kill it if it has not in time."""
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
    if process.returncode is None:
        try:
            await asyncio.wait_for(process.wait(), STOP_WITHIN_S)
        except TimeoutError:
            log.warning("reader pid %d did not stop within %.0f s: killing it", process.pid, STOP_WITHIN_S)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


class ReaderHost(Protocol):
    """What the pool needs of its gateway."""

    settings: GatewayConfig
    stack: StackSettings
    internal_token: str  # the stack's, which a reader needs to read other components
    supervisor: Supervisor
    restart_policy: RestartPolicy
    query_cache: DocumentCache
    fairness: Fairness
    schema: Any

    def authenticate(self, key: str) -> Principal | None: ...


class ReadPool:
    """The gateway's readers, and the routing of /graphql requests to them; see the module docstring."""

    def __init__(self, host: ReaderHost, on_offload: Callable[[], None] | None = None) -> None:
        self.host = host
        settings = host.settings
        # A reader's own settings: no readers of its own, no background roles, the stack's internal token.
        own = settings.model_copy(update={"readers": 0, "background": False,
                                          "internal_token": host.internal_token})
        # What a reader takes requests with: this pool's alone, so no other holder of the stack's internal
        # token can act as a principal through a reader.
        self.secret = secrets.token_urlsafe(32)
        self.readers = [
            ReaderProcess(f"reader-{index}", own, host.stack, self.secret, settings.reader_nice)
            for index in range(1, settings.readers + 1)
        ]
        self.threshold = settings.read_offload_cost
        self._started = False
        self._next = itertools.cycle(self.readers) if self.readers else None
        self._http: httpx.AsyncClient | None = None
        self._on_offload = on_offload
        self._timeout = httpx.Timeout(settings.backend_deadline_s + 2 * settings.http_timeout_s + 5.0)

    def _start(self) -> None:
        self._started = True
        for reader in self.readers:
            self.host.supervisor.add(reader.name, reader.run, self.host.restart_policy)

    def ready(self) -> str | None:
        """The URL of a reader ready to serve (round robin), starting them all at the first ask."""
        if self._next is None:
            return None
        if not self._started:
            self._start()
            return None
        for _ in self.readers:
            url = next(self._next).url
            if url is not None:
                return url
        return None

    def route(self, headers: list[tuple[bytes, bytes]], body: bytes) -> Offload | RateLimited | None:
        """Offload this request? Admitted and in flight if so (`finish` when it has answered); refused
        if its principal is over its rate (answered here, in the shape a refusal has everywhere)."""
        if self._next is None:
            return None
        try:
            parsed = json.loads(body)
        except ValueError:
            return None
        # The cost first (cached per document): a write or a cheap read, most requests, ends here.
        cost = costly_read(self.host.query_cache, self.host.schema._schema, parsed, self.threshold)
        if cost is None:
            return None
        key = _bearer(headers)
        principal = self.host.authenticate(key) if key else None
        if principal is None:
            return None
        url = self.ready()
        if url is None:
            return None
        try:
            self.host.fairness.admit(principal.id, cost)
        except RateLimited as refusal:
            # A principal at its rate retries as often as it is told to, so its refusals cost this
            # process as little as can be: no trip through the GraphQL machinery.
            return refusal
        return Offload(principal, cost, url)

    def finish(self, offload: Offload, refund: bool = False) -> None:
        self.host.fairness.release(offload.principal.id)
        if refund:
            self.host.fairness.refund(offload.principal.id, offload.cost)

    async def forward(self, headers: list[tuple[bytes, bytes]], body: bytes,
                      offload: Offload) -> httpx.Response | None:
        """The reader's answer; None when the reader did not take the request (it runs here then).
        Raises httpx.ReadTimeout when the reader took it but did not answer in time."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout, trust_env=False, limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=64))
        sent = {name.decode(): value.decode("latin-1") for name, value in headers if name in PASSED_ON}
        sent[SECRET_HEADER] = self.secret
        sent[PRINCIPAL_HEADER] = principal_header(offload.principal)
        try:
            answer = await self._http.post(f"{offload.url}/graphql", content=body, headers=sent)
        except httpx.ReadTimeout:
            raise
        except httpx.TransportError as exc:
            # Not answered: the reader went away, or the request never reached it. A read may run again.
            log.warning("a reader did not answer a read (%s): running it in the gateway", type(exc).__name__)
            return None
        if self._on_offload is not None:
            self._on_offload()
        return answer

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            return bearer_key(value.decode("latin-1"))
    return None


async def serve_graphql(pool: ReadPool, local: ASGIApp, scope: Scope, receive: Receive,
                        send: Send) -> None:
    """/graphql: a costly read goes to a reader, anything else (or a read no reader takes) to `local`."""
    if scope["type"] != "http" or scope.get("method") != "POST" or not pool.readers:
        await local(scope, receive, send)
        return
    body, more = await _read_body(receive)
    replay = _replaying(body, more, receive)
    offload = pool.route(scope.get("headers", []), body) if not more else None
    if isinstance(offload, RateLimited):
        await _send(send, 200, refusal_body(offload), "application/json")
        return
    if offload is None:
        await local(scope, replay, send)
        return
    answer: httpx.Response | None = None
    refund = False  # a read the reader may have run stays charged (a cancelled one too)
    try:
        answer = await pool.forward(scope.get("headers", []), body, offload)
        refund = answer is None
    except httpx.ReadTimeout:
        await _send(send, 504, error_body(
            "the read took longer than the gateway waits for one: ask for less (a smaller `first`, fewer "
            "nested lists) or split it into several requests", code="BACKEND_UNAVAILABLE",
            component="gateway"), "application/json")
        return
    finally:
        # Exactly once, whatever happened (a cancelled request too): it is in flight no more, and a read
        # no reader took is given back its charge, to be charged again as it runs here.
        pool.finish(offload, refund=refund)
    if answer is None:
        await local(scope, replay, send)
        return
    await _send(send, answer.status_code, answer.content,
                answer.headers.get("content-type", "application/json"))


def refusal_body(refusal: RateLimited) -> bytes:
    """A refusal before execution, as GraphQL answers it: no data, one error with its extensions."""
    return json.dumps({"data": None, "errors": [{"message": refusal.message,
                                                 "extensions": refusal.extensions}]}).encode()


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request's body; `more` is True if the client disconnected before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks), False


def _replaying(body: bytes, disconnected: bool, receive: Receive) -> Receive:
    """A `receive` that gives the body already read, then whatever the client sends next."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            if disconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send(send: Send, status: int, body: bytes, content_type: str) -> None:
    headers = [(b"content-type", content_type.encode("latin-1")),
               (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ReaderDoor:
    """A reader's front door: /healthz for anyone; a POST to /graphql of one query, carrying the pool's
    secret; nothing else (403)."""

    def __init__(self, app: ASGIApp, secret: str, cache: DocumentCache) -> None:
        self.app = app
        self.secret = secret
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and scope.get("path") == "/healthz"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4403})
            return
        given = dict(scope.get("headers", [])).get(SECRET_HEADER.encode())
        if scope.get("path") != "/graphql" or scope.get("method") != "POST" or not _same(given, self.secret):
            await _forbidden(send, "this is a gateway's reader: send requests to the gateway")
            return
        body, more = await _read_body(receive)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if more or not is_one_query(self.cache, parsed):
            await _forbidden(send, "a gateway's reader runs queries only")
            return
        await self.app(scope, _replaying(body, more, receive), send)


async def _forbidden(send: Send, message: str) -> None:
    await _send(send, 403, error_body(message, code="FORBIDDEN"), "application/json")


@dataclass
class ReaderStart:
    """The reader child's start: its settings from the gateway, and a socket on a free port."""

    settings: GatewayConfig
    stack: StackSettings
    secret: str
    socket: socket.socket

    @classmethod
    def read(cls, stdin: IO[str]) -> ReaderStart:
        """Settings from `stdin`'s first line; lower CPU priority; a listening socket on 127.0.0.1."""
        given = json.loads(stdin.readline())
        with contextlib.suppress(OSError):
            os.nice(int(given["nice"]))
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.bind(("127.0.0.1", 0))
        listening.listen(512)
        return cls(GatewayConfig(**given["gateway"]), StackSettings(**given["stack"]), given["secret"],
                   listening)

    def announce(self, stdout: IO[str]) -> None:
        """Tell the gateway where this reader listens (its only line on stdout)."""
        stdout.write(json.dumps({"port": self.socket.getsockname()[1]}) + "\n")
        stdout.flush()

    @staticmethod
    def on_close(stdin: IO[str], stop: Callable[[], None]) -> None:
        """Call `stop` when stdin closes: the gateway stopped this reader, or died."""

        def watch() -> None:
            stdin.read()
            stop()

        threading.Thread(target=watch, name="reader-stdin", daemon=True).start()
