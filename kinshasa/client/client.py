"""Kinshasa: the async Python client of the gateway's GraphQL API, for agents (and operators' reads).

One httpx.AsyncClient per Kinshasa; every request goes through `_send`, which maps GraphQL errors to
typed exceptions and retries what is safe to retry (kinshasa/client/retries.py says what and why).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx
from graphql import GraphQLError, OperationType, get_operation_ast, parse

from kinshasa.client.acknowledgements import Receipt
from kinshasa.client.errors import (
    BadResponse,
    RateLimited,
    RunClosed,
    UnknownOperation,
    Unreachable,
    error_from,
)
from kinshasa.client.operations import OPERATIONS_QUERY, RECEIPT_FIELDS, Operation, find
from kinshasa.client.retries import RETRIED_STATUSES, Backoff
from kinshasa.client.runs import Run, RunScope

log = logging.getLogger(__name__)

RUN_FIELDS = """id agentId entryPoint purpose status startedAt finishedAt revertReason
  breaker { state writes errors servicesTouched velocity trippedReason probesLeft tripCount }
  counts { held awaitingApproval published applied compensated discarded rejected }"""


def graphql_url(url: str) -> str:
    """The gateway's GraphQL endpoint: `http://host:8000` and `http://host:8000/graphql` both work."""
    trimmed = url.rstrip("/")
    return trimmed if trimmed.endswith("/graphql") else f"{trimmed}/graphql"


def new_idempotency_key() -> str:
    """A key naming one intended write; every retry of that write sends it again."""
    return str(uuid.uuid4())


class Kinshasa:
    """An agent's (or operator's) connection to one gateway, `url` ending in /graphql.

    `transport` replaces the network (httpx.ASGITransport(app=...) calls an in-process gateway).
    `retry_rate_limited=True` waits out RATE_LIMITED answers (up to `backoff.max_retry_after_s` each)
    instead of raising them.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_rate_limited: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        self.url = url
        self.retry_rate_limited = retry_rate_limited
        self.backoff = backoff or Backoff()
        self._http = httpx.AsyncClient(
            transport=transport, timeout=timeout, headers={"Authorization": f"Bearer {key}"}
        )
        self._operations: list[Operation] | None = None
        # Entered with `async with`: whoever entered it closes it, so a run scope never does.
        self._entered = False

    async def __aenter__(self) -> Kinshasa:
        self._entered = True
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def closed(self) -> bool:
        return self._http.is_closed

    # --- raw GraphQL ---------------------------------------------------------------------------------

    async def query(
        self, document: str, variables: Mapping[str, Any] | None = None, *, retry: bool | None = None
    ) -> dict[str, Any]:
        """Send one GraphQL document; its `data`, or the typed exception of its first error.

        Network failures are retried for queries; a mutation sent this way is not retried unless
        `retry=True` (say so only when it carries an idempotencyKey, or is harmless twice).
        """
        if retry is None:
            retry = not _is_mutation(document)
        data, _ = await self._send(document, variables, retry_network=retry)
        return data

    async def _send(
        self,
        document: str,
        variables: Mapping[str, Any] | None,
        *,
        retry_network: bool,
        idempotency_key: str | None = None,
    ) -> tuple[dict[str, Any], int]:
        """(data, attempts it took). Raises the typed error of the first GraphQL error, or Unreachable."""
        body = {"query": document, "variables": dict(variables or {})}
        failures = 0
        while True:
            lost: str | None = None
            cause: Exception | None = None
            try:
                response = await self._http.post(self.url, json=body)
            except httpx.TransportError as exc:
                lost, cause = f"{type(exc).__name__}: {exc}", exc
            else:
                if response.status_code in RETRIED_STATUSES:
                    lost = f"HTTP {response.status_code}"
            if lost is not None:
                failures += 1
                if retry_network and self.backoff.may_retry(failures):
                    wait = self.backoff.delay(failures)
                    log.info("gateway request failed (%s); retry %d in %.2f s", lost, failures, wait)
                    await asyncio.sleep(wait)
                    continue
                extensions: dict[str, Any] = {"code": Unreachable.code, "attempts": failures}
                if idempotency_key is not None:
                    extensions["idempotencyKey"] = idempotency_key
                again = (
                    f"; retry with idempotency_key={idempotency_key!r}: it cannot write twice"
                    if idempotency_key
                    else ""
                )
                message = f"the gateway at {self.url} failed {failures} time(s), last: {lost}{again}"
                raise Unreachable(Unreachable.code, message, extensions) from cause
            answer = _json(response)
            errors = answer.get("errors")
            if errors:
                error = error_from(errors, answer.get("data"))
                if isinstance(error, RateLimited) and self.retry_rate_limited:
                    failures += 1
                    wait_s = self.backoff.rate_limited_wait(failures, error.retry_after)
                    if wait_s is not None:
                        log.info("gateway rate-limited the request; retry %d in %.2f s", failures, wait_s)
                        await asyncio.sleep(wait_s)
                        continue
                error.attempts = failures + 1
                raise error
            data = answer.get("data")
            if not isinstance(data, dict):
                raise BadResponse(BadResponse.code, "the gateway answered neither data nor errors")
            return data, failures + 1

    # --- the catalogue -------------------------------------------------------------------------------

    async def operations(self, refresh: bool = False) -> list[Operation]:
        """Every agent operation the gateway offers now (read once, then cached until `refresh`)."""
        if self._operations is None or refresh:
            data = await self.query(OPERATIONS_QUERY)
            self._operations = [Operation.from_graphql(entry) for entry in data["operations"]]
        return list(self._operations)

    @property
    def cached_operations(self) -> list[Operation] | None:
        """The catalogue as last read, without asking the gateway; None before the first read."""
        return None if self._operations is None else list(self._operations)

    async def operation(self, name: str) -> Operation:
        """The operation called `name` (command type, mutation or snake_case); re-reads the catalogue
        once when it is not there, for a service registered since."""
        try:
            return find(await self.operations(), name)
        except UnknownOperation:
            return find(await self.operations(refresh=True), name)

    # --- runs and writes -----------------------------------------------------------------------------

    async def start_run(
        self, entry_point: str, purpose: str | None = None, *, idempotency_key: str | None = None
    ) -> str:
        """Start a run at `entry_point`; its id. Retried on network failures under one idempotency key."""
        key = idempotency_key or new_idempotency_key()
        data, _ = await self._send(
            "mutation StartRun($entryPoint: String!, $purpose: String, $idempotencyKey: String) {"
            " startRun(entryPoint: $entryPoint, purpose: $purpose, idempotencyKey: $idempotencyKey) { id } }",
            {"entryPoint": entry_point, "purpose": purpose, "idempotencyKey": key},
            retry_network=True,
            idempotency_key=key,
        )
        return str(data["startRun"]["id"])

    async def finish_run(self, run_id: str) -> dict[str, Any]:
        """Finish the run; the run as it is then. Retried on network failures: finishing twice is
        harmless, and a retry told RUN_CLOSED because the lost attempt finished it returns the run."""
        document = f"mutation FinishRun($runId: ID!) {{ finishRun(runId: $runId) {{ {RUN_FIELDS} }} }}"
        try:
            data, _ = await self._send(document, {"runId": run_id}, retry_network=True)
        except RunClosed as closed:
            if closed.attempts > 1:
                run = await self.get_run(run_id)
                if run.get("status") == "FINISHED":
                    return run
            raise
        found: dict[str, Any] = data["finishRun"]
        return found

    async def call(
        self,
        run_id: str,
        operation: str,
        fields: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """Ask for one write in a run: `operation` is a command type (`documents.rename`), a mutation
        (`renameDocument`) or its snake_case (`rename_document`); `fields` its snake_case payload.

        Fields are checked against the operation's schema before sending (Validation). The write is
        retried on network failures with one idempotency key (yours, or one made here), so it happens
        at most once.
        """
        op = await self.operation(operation)
        payload = dict(fields or {})
        key = (idempotency_key or new_idempotency_key()) if op.keyed else None
        variables = op.variables(run_id, payload, key)
        data, _ = await self._send(
            op.document(), variables, retry_network=key is not None, idempotency_key=key
        )
        return Receipt.from_graphql(data[op.mutation], self)

    # --- reads ---------------------------------------------------------------------------------------

    async def command(self, command_id: str) -> Receipt:
        data = await self.query(
            f"query Command($id: ID!) {{ command(id: $id) {{ {RECEIPT_FIELDS} }} }}", {"id": command_id}
        )
        return Receipt.from_graphql(data["command"], self)

    async def get_run(self, run_id: str) -> dict[str, Any]:
        """The run: status, breaker and command counts (camelCase keys, as the gateway answers)."""
        data = await self.query(f"query Run($id: ID!) {{ run(id: $id) {{ {RUN_FIELDS} }} }}", {"id": run_id})
        found: dict[str, Any] = data["run"]
        return found

    async def commands(self, run_id: str, first: int = 100) -> list[Receipt]:
        """The run's commands in acceptance order."""
        data = await self.query(
            f"query Commands($id: ID!, $first: Int!) {{ run(id: $id) {{ commands(first: $first) "
            f"{{ {RECEIPT_FIELDS} }} }} }}",
            {"id": run_id, "first": first},
        )
        return [Receipt.from_graphql(c, self) for c in data["run"]["commands"]]

    async def entity(self, service: str, type: str, id: str) -> dict[str, Any] | None:
        """The entity's current state as its service answers it; None if it does not exist."""
        data = await self.query(
            "query Entity($service: String!, $type: String!, $id: ID!) {"
            " entity(service: $service, type: $type, id: $id) { state } }",
            {"service": service, "type": type, "id": id},
        )
        found = data["entity"]
        return None if found is None else dict(found["state"])

    # --- runs as objects -----------------------------------------------------------------------------

    def run(self, entry_point: str, purpose: str | None = None) -> RunScope:
        """`async with client.run("support-bot", purpose=...) as run:` starts the run and finishes it
        when the block ends; an exception leaves it open (logged with the run id) and propagates.

        On a client not entered with `async with` (`Kinshasa(url, key).run(...)`), the scope owns the
        client and closes it when the block ends, either way: nothing else would.
        """
        owns_client = not self._entered and not self.closed
        return RunScope(self, entry_point, purpose, owns_client=owns_client)

    async def attach(self, run_id: str) -> Run:
        """A Run for a run already started (its methods need the catalogue, read here); not finished
        by the SDK."""
        await self.operations()
        return Run(self, run_id)


def _is_mutation(document: str) -> bool:
    try:
        parsed = get_operation_ast(parse(document))
    except GraphQLError:
        return True  # unparsable: the gateway refuses it without effect, but do not guess
    return parsed is not None and parsed.operation is OperationType.MUTATION


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise BadResponse(
            BadResponse.code,
            f"the gateway answered HTTP {response.status_code} that is not GraphQL JSON: "
            f"{response.text[:200]!r}; is {response.request.url} the gateway's /graphql?",
            {"code": BadResponse.code, "status": response.status_code},
        )
    return answer
