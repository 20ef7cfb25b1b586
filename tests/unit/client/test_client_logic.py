"""The async client over a scripted transport: retries, idempotency keys, receipts and the run scope.

The transport here stands in for the network only, so the client's own decisions can be checked one by
one; tests/e2e/test_sdk.py checks the same behaviour against the real gateway.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kinshasa.client import (
    Backoff,
    BreakerOpen,
    Discarded,
    Kinshasa,
    RateLimited,
    Rejected,
    SyncKinshasa,
    Unreachable,
    Validation,
)

URL = "http://gateway.test/graphql"
FAST = Backoff(attempts=4, first_s=0.0, cap_s=0.0)

RENAME = {
    "service": "documents", "operation": "documents.rename", "mutation": "renameDocument",
    "description": "Rename.", "egress": False, "creates": False, "entityType": "document",
    "entityIdField": "document_id",
    "inputSchema": json.dumps({"properties": {"document_id": {}, "title": {}},
                               "required": ["document_id", "title"]}),
    "inputObject": False, "allowed": True,
    "arguments": [{"name": "documentId", "type": "ID!"}, {"name": "title", "type": "String!"}],
}


def receipt(status: str = "PUBLISHED", **extra: Any) -> dict[str, Any]:
    return {"commandId": "cmd-1", "runId": "run-1", "operation": "documents.rename",
            "mutation": "renameDocument", "entityId": "doc-1", "status": status,
            "acceptedAt": "2025-01-01T00:00:00+00:00", "releaseAt": None, "appliedAt": None,
            "rejectedReason": None, "compensatedAt": None, "result": None, "reason": None, **extra}


class Script:
    """A fake network: answers each request with the next step (a body, a status or an exception)."""

    def __init__(self, answer: Callable[[dict[str, Any], int], Any]) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        step = self.answer(body, len(self.requests))
        if isinstance(step, Exception):
            raise step
        if isinstance(step, int):
            return httpx.Response(step, text="bad gateway")
        return httpx.Response(200, json=step)

    def client(self, **options: Any) -> Kinshasa:
        return Kinshasa(URL, "key", transport=httpx.MockTransport(self), backoff=FAST, **options)


def catalogue_or(answer: Callable[[dict[str, Any], int], Any]) -> Callable[[dict[str, Any], int], Any]:
    def route(body: dict[str, Any], n: int) -> Any:
        if "operations {" in body["query"]:
            return {"data": {"operations": [RENAME]}}
        return answer(body, n)
    return route


async def test_a_write_lost_in_transit_is_sent_again_with_the_same_key() -> None:
    failures = iter([httpx.ReadTimeout("lost"), 502])

    def answer(body: dict[str, Any], n: int) -> Any:
        return next(failures, None) or {"data": {"renameDocument": receipt()}}

    script = Script(catalogue_or(answer))
    async with script.client() as client:
        got = await client.call("run-1", "rename_document", {"document_id": "doc-1", "title": "Q4"})
    writes = [r for r in script.requests if "renameDocument(" in r["query"]]
    assert len(writes) == 3 and got.status == "PUBLISHED" and got.command_id == "cmd-1"
    keys = {w["variables"]["idempotencyKey"] for w in writes}
    assert len(keys) == 1 and None not in keys


async def test_after_the_last_retry_the_error_names_the_key_to_retry_with() -> None:
    script = Script(catalogue_or(lambda body, n: httpx.ConnectError("refused")))
    async with script.client() as client:
        with pytest.raises(Unreachable) as lost:
            await client.call("run-1", "renameDocument", {"document_id": "d", "title": "t"},
                              idempotency_key="mine")
    assert lost.value.idempotency_key == "mine" and "idempotency_key='mine'" in lost.value.message
    assert len([r for r in script.requests if "renameDocument(" in r["query"]]) == FAST.attempts


async def test_a_raw_mutation_is_not_retried_but_a_query_is() -> None:
    script = Script(lambda body, n: httpx.ReadTimeout("lost") if n == 1 else {"data": {"me": {"id": "a"}}})
    async with script.client() as client:
        assert await client.query("query { me { id } }") == {"me": {"id": "a"}}
    script = Script(lambda body, n: httpx.ReadTimeout("lost"))
    async with script.client() as client:
        with pytest.raises(Unreachable):
            await client.query("mutation { finishRun(runId: \"r\") { id } }")
    assert len(script.requests) == 1


async def test_graphql_errors_are_answers_and_never_retried() -> None:
    refusal = {"data": None, "errors": [{"message": "open", "extensions": {
        "code": "BREAKER_OPEN", "breaker": {"state": "OPEN"}}}]}
    script = Script(catalogue_or(lambda body, n: refusal))
    async with script.client() as client:
        with pytest.raises(BreakerOpen) as refused:
            await client.call("run-1", "renameDocument", {"document_id": "d", "title": "t"})
    assert refused.value.breaker == {"state": "OPEN"}
    assert len([r for r in script.requests if "renameDocument(" in r["query"]]) == 1


async def test_rate_limited_is_waited_out_only_when_asked() -> None:
    limited = {"data": None, "errors": [{"message": "slow", "extensions": {
        "code": "RATE_LIMITED", "retryAfterS": 0.01}}]}
    script = Script(lambda body, n: limited if n == 1 else {"data": {"me": {"id": "a"}}})
    async with script.client() as client:
        with pytest.raises(RateLimited) as raised:
            await client.query("query { me { id } }")
    assert raised.value.retry_after == 0.01
    script = Script(lambda body, n: limited if n == 1 else {"data": {"me": {"id": "a"}}})
    async with script.client(retry_rate_limited=True) as client:
        assert await client.query("query { me { id } }") == {"me": {"id": "a"}}
    assert len(script.requests) == 2


def test_a_retry_after_longer_than_the_caller_allows_is_raised_not_waited() -> None:
    backoff = Backoff(attempts=3, max_retry_after_s=5.0)
    assert backoff.rate_limited_wait(1, 2.0) == 2.0
    assert backoff.rate_limited_wait(1, 60.0) is None
    assert backoff.rate_limited_wait(3, 1.0) is None


def test_backoff_grows_and_stops_at_its_cap() -> None:
    backoff = Backoff(first_s=0.2, cap_s=1.0)
    assert 0.1 <= backoff.delay(1) <= 0.2 and 0.2 <= backoff.delay(2) <= 0.4
    assert 0.5 <= backoff.delay(9) <= 1.0
    assert backoff.may_retry(backoff.attempts - 1) and not backoff.may_retry(backoff.attempts)


async def test_applied_polls_until_the_service_applied_the_write() -> None:
    statuses = iter(["PUBLISHED", "PUBLISHED", "APPLIED"])

    def answer(body: dict[str, Any], n: int) -> Any:
        status = next(statuses)
        extra = {"appliedAt": "2025-01-01T00:00:01+00:00"} if status == "APPLIED" else {}
        return {"data": {"command": receipt(status, **extra)}}

    script = Script(answer)
    async with script.client() as client:
        first = await client.command("cmd-1")
        done = await first.applied(timeout=5)
    assert done.status == "APPLIED" and done.applied_at is not None


@pytest.mark.parametrize(("status", "error"), [("REJECTED", Rejected), ("DISCARDED", Discarded)])
async def test_applied_raises_when_the_write_will_never_apply(status: str, error: type[Exception]) -> None:
    script = Script(lambda body, n: {"data": {"command": receipt(
        status, rejectedReason="DOCUMENT_NOT_FOUND: no such document", reason="gone")}})
    async with script.client() as client:
        with pytest.raises(error) as raised:
            await (await client.command("cmd-1")).applied(timeout=5)
    if status == "REJECTED":
        assert "DOCUMENT_NOT_FOUND" in str(raised.value)


async def test_applied_gives_up_after_its_timeout_saying_where_the_write_is() -> None:
    script = Script(lambda body, n: {"data": {"command": receipt(
        "HELD", releaseAt="2099-01-01T00:00:00+00:00")}})
    async with script.client() as client:
        with pytest.raises(TimeoutError, match=r"still HELD .* held until 2099"):
            await (await client.command("cmd-1")).applied(timeout=0.3)


def lifecycle(calls: list[str]) -> Callable[[dict[str, Any], int], Any]:
    def answer(body: dict[str, Any], n: int) -> Any:
        query = body["query"]
        for verb in ("startRun", "finishRun", "renameDocument"):
            if f"{verb}(" in query:
                calls.append(verb)
        if "startRun(" in query:
            return {"data": {"startRun": {"id": "run-1"}}}
        if "finishRun(" in query:
            return {"data": {"finishRun": {"id": "run-1", "status": "FINISHED"}}}
        return {"data": {"renameDocument": receipt()}}
    return catalogue_or(answer)


async def test_the_run_scope_starts_and_finishes_the_run_with_typed_methods() -> None:
    calls: list[str] = []
    async with Script(lifecycle(calls)).client() as client:
        async with client.run("support-bot", purpose="tidy") as run:
            got = await run.rename_document("doc-1", title="Q4")
            assert "rename_document" in dir(run)
            with pytest.raises(Validation):
                await run.rename_document("doc-1", titel="Q4")
            with pytest.raises(AttributeError, match=r"run.call\('delete_document'"):
                run.delete_document  # noqa: B018
    assert got.command_id == "cmd-1" and calls == ["startRun", "renameDocument", "finishRun"]


async def test_an_exception_in_the_block_leaves_the_run_open_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    async with Script(lifecycle(calls)).client() as client:
        with caplog.at_level(logging.WARNING), pytest.raises(ZeroDivisionError):
            async with client.run("support-bot"):
                raise ZeroDivisionError("agent bug")
    assert calls == ["startRun"]
    assert "run run-1 (support-bot) left open" in caplog.text and "ZeroDivisionError" in caplog.text


async def test_a_run_on_a_client_nobody_entered_closes_the_client_when_the_block_ends() -> None:
    calls: list[str] = []
    client = Script(lifecycle(calls)).client()
    async with client.run("support-bot") as run:
        await run.rename_document("doc-1", title="Q4")
        assert not client.closed
    assert client.closed and calls == ["startRun", "renameDocument", "finishRun"]

    raising = Script(lifecycle([])).client()
    with pytest.raises(ZeroDivisionError):
        async with raising.run("support-bot"):
            raise ZeroDivisionError("agent bug")
    assert raising.closed


async def test_a_run_on_a_client_nobody_entered_closes_it_when_the_run_cannot_start() -> None:
    client = Script(catalogue_or(lambda body, n: httpx.ConnectError("refused"))).client()
    with pytest.raises(Unreachable):
        async with client.run("support-bot"):
            pass
    assert client.closed


async def test_a_run_leaves_an_entered_client_open_for_whoever_entered_it() -> None:
    async with Script(lifecycle([])).client() as client:
        async with client.run("support-bot"):
            pass
        assert not client.closed
        with pytest.raises(ZeroDivisionError):
            async with client.run("support-bot"):
                raise ZeroDivisionError("agent bug")
        assert not client.closed
    assert client.closed



    calls: list[str] = []
    script = Script(lifecycle(calls))
    with SyncKinshasa(URL, "key", transport=httpx.MockTransport(script), backoff=FAST) as client:
        with client.run("support-bot") as run:
            got = run.rename_document("doc-1", title="Q4")
            assert got.status == "PUBLISHED" and got.command_id == "cmd-1"
    assert calls == ["startRun", "renameDocument", "finishRun"]
