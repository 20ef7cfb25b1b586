"""The Python SDK against the real stack: receipts that follow the write, typed errors, the run scope,
retries that never write twice, and the sync facade."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from kinshasa.client import (
    AgentBudgetExceeded,
    BackendUnavailable,
    BreakerOpen,
    Forbidden,
    Kinshasa,
    KinshasaError,
    NotFound,
    QueryTooCostly,
    RateLimited,
    Rejected,
    RunClosed,
    RunNotFound,
    SyncKinshasa,
    Unauthenticated,
    Validation,
)
from tests.e2e.api import Api
from tests.e2e.stack import REPO, Stack, wait_for

# Big enough to be refused before it runs: 200 runs x 200 steps x 200 commands.
COSTLY = ("{ runs(first: 200) { nodes { steps(first: 200) { nodes { stepId } } "
          "commands(first: 200) { commandId } } } }")


def entry_point(name: str, operator: Api, **policy: Any) -> str:
    """A fresh entry point for one test, with no quarantine window (writes publish at once)."""
    chosen = f"e2e.sdk.{name}.{uuid.uuid4().hex[:8]}"
    operator.set_policy(chosen, quarantineWindowS=0.0, **policy)
    return chosen


def runs_at(operator: Api, chosen: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = operator.call(
        "query($e: String!) { runs(filter: {entryPoint: $e}, first: 20) { nodes { id status } } }",
        e=chosen)["runs"]["nodes"]
    return found


async def test_applied_returns_once_the_service_applied_and_the_read_after_sees_it(
        stack: Stack, operator: Api) -> None:
    chosen = entry_point("applied", operator)
    async with Kinshasa(stack.gateway_url, stack.key("agent")) as client:
        async with client.run(chosen, purpose="sdk e2e") as run:
            created = await run.create_document(title="SDK plan", body="draft")
            assert created.status == "PUBLISHED" and created.operation == "documents.create"
            done = await created.applied(timeout=60)
            assert done.status == "APPLIED" and done.applied_at is not None
            document_id = done.entity_id

            renamed = await run.rename_document(document_id, title="SDK plan v2")
            await renamed.applied(timeout=60)
            state = await client.entity("documents", "document", document_id)
            assert state is not None and state["title"] == "SDK plan v2" and state["body"] == "draft"

            # The generic call reaches the same operation by its command type.
            edited = await run.call("documents.edit", document_id=document_id, body="final")
            await edited.applied(timeout=60)
            state = await client.entity("documents", "document", document_id)
            assert state is not None and state["body"] == "final"

        # A clean exit finished the run.
        finished = await client.get_run(run.id)
        assert finished["status"] == "FINISHED" and finished["counts"]["applied"] == 3


async def test_a_service_refusal_surfaces_as_rejected_with_the_reason(stack: Stack, operator: Api) -> None:
    chosen = entry_point("rejected", operator)
    missing = str(uuid.uuid4())
    async with Kinshasa(stack.gateway_url, stack.key("agent")) as client, client.run(chosen) as run:
        refused = await run.rename_document(missing, title="nobody here")
        with pytest.raises(Rejected) as rejected:
            await refused.applied(timeout=60)
    receipt = rejected.value.receipt
    assert receipt.status == "REJECTED" and receipt.applied_at is None
    assert receipt.rejected_reason and missing in receipt.rejected_reason
    assert rejected.value.code == "REJECTED" and missing in str(rejected.value)


async def test_an_exception_in_the_block_leaves_the_run_open_and_logs_its_id(
        stack: Stack, operator: Api, caplog: pytest.LogCaptureFixture) -> None:
    chosen = entry_point("crash", operator)
    async with Kinshasa(stack.gateway_url, stack.key("agent")) as client:
        with caplog.at_level(logging.WARNING, logger="kinshasa.client"), pytest.raises(LookupError):
            async with client.run(chosen) as run:
                await run.create_document(title="before the crash")
                raise LookupError("the agent's own bug")
        assert (await client.get_run(run.id))["status"] == "RUNNING"
        assert f"run {run.id} ({chosen}) left open" in caplog.text and "LookupError" in caplog.text
        await client.finish_run(run.id)


async def test_real_refusals_raise_their_typed_exceptions(stack: Stack, operator: Api) -> None:
    chosen = entry_point("errors", operator)
    url = stack.gateway_url
    async with Kinshasa(url, "not-a-key") as stranger:
        with pytest.raises(Unauthenticated):
            await stranger.operations()

    async with Kinshasa(url, stack.key("agent")) as client, Kinshasa(url, stack.key("operator")) as ops:
        with pytest.raises(RunNotFound):
            await client.call("no-such-run", "rename_document", {"document_id": "d-1", "title": "t"})

        run_id = await client.start_run(chosen)
        # Checked before sending: a misspelt field never reaches the gateway.
        with pytest.raises(Validation) as misspelt:
            await client.call(run_id, "rename_document", {"document_id": "d-1", "titel": "t"})
        assert misspelt.value.extensions["clientSide"] is True
        # Checked by the gateway with the service's own model: a blank title.
        with pytest.raises(Validation) as blank:
            await client.call(run_id, "rename_document", {"document_id": "d-1", "title": ""})
        assert [f.path for f in blank.value.fields] == ["title"]
        assert "clientSide" not in blank.value.extensions

        # An operator does not write through runs.
        with pytest.raises(Forbidden):
            await ops.call(run_id, "rename_document", {"document_id": "d-1", "title": "t"})
        with pytest.raises(NotFound):
            await client.entity("no_such_service", "thing", "x")
        with pytest.raises(QueryTooCostly) as costly:
            await ops.query(COSTLY)
        assert costly.value.cost is not None and costly.value.limit is not None
        assert costly.value.cost > costly.value.limit

        await client.finish_run(run_id)
        with pytest.raises(RunClosed):
            await client.call(run_id, "create_document", {"title": "too late"})
        with pytest.raises(RunClosed):
            await client.finish_run(run_id)


# Near the cost limit (50 runs x 100 commands): a few at once spend more than a principal's burst.
HEAVY = "{ runs(first: 50) { nodes { commands(first: 100) { commandId } } } }"
STEPS = "query($id: ID!) { run(id: $id) { steps(first: 5) { nodes { stepId } } } }"
AGENT_LAYER = """mutation($s: String!, $p: PolicyInput!) {
    setPolicy(scope: AGENT, subject: $s, settings: $p, reason: "e2e sdk", loosen: true) { version } }"""


async def test_refusals_that_push_the_stack_raise_their_typed_exceptions(stack: Stack, operator: Api) -> None:
    url = stack.gateway_url
    async with Kinshasa(url, stack.key("agent")) as client:
        chosen = entry_point("pushed", operator)
        run_id = await client.start_run(chosen)

        # The coordinator down: a run's steps cannot be read; the error names the backend, not its URL.
        stack.kill("coordinator")
        try:
            with pytest.raises(BackendUnavailable) as down:
                await client.query(STEPS, {"id": run_id})
            assert down.value.backend == "coordinator" and "http" not in down.value.message
        finally:
            stack.restart("coordinator")

        # An agent budget: at most one run an hour, and this agent has started many.
        agent_id = (await client.query("{ me { id } }"))["me"]["id"]
        operator.call(AGENT_LAYER, s=agent_id, p={"maxRunsPerHour": 1})
        try:
            with pytest.raises(AgentBudgetExceeded) as budget:
                await client.start_run(chosen)
            assert budget.value.budget == "maxRunsPerHour" and budget.value.limit == 1
        finally:
            operator.call(AGENT_LAYER, s=agent_id, p={})
        assert await client.start_run(chosen)  # the budget is gone with the layer that set it

        # Its costliest reads faster than its bucket refills: RATE_LIMITED with when to come back.
        limited: list[RateLimited] = []
        for _ in range(10):
            answers = await asyncio.gather(*(client.query(HEAVY) for _ in range(6)), return_exceptions=True)
            limited = [a for a in answers if isinstance(a, RateLimited)]
            if limited:
                break
        assert limited, "six heavy reads at once, ten times over, were never rate limited"
        assert limited[0].retry_after is not None and limited[0].retry_after > 0
        # Come back later as told: the agent is served again (the next test starts with a full bucket).
        await asyncio.sleep(limited[0].retry_after)
        wait_for("the agent to be served again", lambda: Api(url, stack.key("agent")).call("{ me { id } }"))


async def test_a_tripped_breaker_raises_breaker_open_with_its_snapshot(stack: Stack, operator: Api) -> None:
    chosen = entry_point("breaker", operator, maxWrites=1)
    async with Kinshasa(stack.gateway_url, stack.key("agent")) as client:
        with pytest.raises(BreakerOpen) as stopped:
            async with client.run(chosen) as run:
                await run.create_document(title="the one allowed write")
                await run.create_document(title="one too many")
        assert isinstance(stopped.value, KinshasaError) and stopped.value.code == "BREAKER_OPEN"
        breaker = stopped.value.breaker
        assert breaker["state"] == "OPEN" and breaker["writes"] == 1
        assert "writes" in (breaker["trippedReason"] or "")
        # Left open by the scope (the block raised); the gateway closed it for writes.
        assert (await client.get_run(run.id))["status"] != "FINISHED"
        with pytest.raises((BreakerOpen, RunClosed)):
            await run.create_document(title="still refused")


class LoseFirstAnswers(httpx.AsyncBaseTransport):
    """Forwards each request to the real gateway, then loses the answer of the first request of each
    named mutation (a ReadTimeout after the gateway did the work), as a flaky network would."""

    def __init__(self, *mutations: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.mutations = mutations
        self.pending = set(mutations)
        self.sent: list[tuple[str, str | None]] = []  # (mutation, idempotency key) of each one sent

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = json.loads(request.content)
        named = next((m for m in self.mutations if f"{m}(" in body["query"]), None)
        if named is not None:
            self.sent.append((named, body["variables"].get("idempotencyKey")))
            if named in self.pending:
                self.pending.discard(named)
                await response.aread()
                await response.aclose()
                raise httpx.ReadTimeout("the answer was lost on purpose", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_write_retried_after_a_lost_answer_is_written_once(stack: Stack, operator: Api) -> None:
    chosen = entry_point("retry", operator)
    flaky = LoseFirstAnswers("startRun", "createDocument")
    async with Kinshasa(stack.gateway_url, stack.key("agent"), transport=flaky) as client:
        run_id = await client.start_run(chosen)
        receipt = await client.call(run_id, "create_document", {"title": "exactly once"})
        await receipt.applied(timeout=60)
        commands = await client.commands(run_id)
        await client.finish_run(run_id)

    # Each was sent twice with one key: the first answer lost, the retry answered from the key.
    for mutation in ("startRun", "createDocument"):
        keys = [key for name, key in flaky.sent if name == mutation]
        assert len(keys) == 2 and keys[0] is not None and keys[0] == keys[1], flaky.sent
    assert [r["id"] for r in runs_at(operator, chosen)] == [run_id]
    assert [c.command_id for c in commands] == [receipt.command_id]


def test_the_sync_facade_writes_waits_and_reads(stack: Stack, operator: Api) -> None:
    chosen = entry_point("sync", operator)
    with SyncKinshasa(stack.gateway_url, stack.key("agent")) as client:
        with client.run(chosen, purpose="sync e2e") as run:
            created = run.create_document(title="from sync code")
            done = created.applied(timeout=60)
            assert done.status == "APPLIED"
            state = client.entity("documents", "document", done.entity_id)
            assert state is not None and state["title"] == "from sync code"
        assert client.get_run(run.id)["status"] == "FINISHED"
        with pytest.raises(RunClosed):
            client.call(run.id, "create_document", {"title": "too late"})


def test_generated_stubs_type_check_a_call_of_the_real_catalogue(stack: Stack, tmp_path: Path) -> None:
    key_file = tmp_path / "agent.key"
    key_file.write_text(stack.key("agent"))
    stubs = tmp_path / "agent_ops.py"
    made = subprocess.run(
        [sys.executable, "-m", "kinshasa.cli", "client-stubs", "--url", stack.gateway_url,
         "--key-file", str(key_file), "--out", str(stubs)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "async def rename_document(self, document_id: str, *, title: str" in stubs.read_text()

    use = tmp_path / "agent.py"
    use.write_text(
        "from typing import cast\n"
        "from kinshasa.client import Run\n"
        "from agent_ops import TypedRun\n\n"
        "async def work(run: Run) -> None:\n"
        "    typed = cast(TypedRun, run)\n"
        "    await typed.rename_document('doc-1', title='ok')\n"
        "    await typed.rename_document('doc-1', titel='misspelt')\n")
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", str(use), str(stubs)],
        cwd=tmp_path, env={**os.environ, "MYPYPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    problems = [line for line in checked.stdout.splitlines() if ": error:" in line]
    # The correct call passes; the misspelt one is caught before the agent ever runs.
    assert problems and all(line.startswith("agent.py:8:") for line in problems), checked.stdout
    assert any('"titel"' in line for line in problems), checked.stdout
