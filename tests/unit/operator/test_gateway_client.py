"""The operator CLI's selector and readable timeline."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from kinshasa.operator.gateway_client import (
    GatewayClient,
    GatewayError,
    operator_key,
    run_line,
    selector,
    timeline,
)

RUN = {"id": "run-1", "agentId": "agent-7", "entryPoint": "chat", "purpose": "tidy docs",
       "status": "REVERTED", "startedAt": "2025-01-01T12:00:00+00:00", "finishedAt": None,
       "revertReason": "rogue", "revertRequestedAt": "2025-01-01T12:05:00+00:00",
       "counts": {"held": 0, "awaitingApproval": 1, "published": 3, "applied": 3, "rejected": 0,
                  "compensated": 2, "discarded": 4},
       "breaker": {"state": "OPEN", "writes": 7, "errors": 0, "servicesTouched": ["documents", "notifier"],
                   "trippedReason": "writes 7 > 6"},
       "steps": {"nodes": [
           {"stepId": 3, "appliedAt": "2025-01-01T12:00:03+00:00",
            "forwardType": "notifier.send_email.applied", "entityKey": "notifier:e1",
            "status": "IRREVERSIBLE"},
           {"stepId": 2, "appliedAt": "2025-01-01T12:00:02+00:00",
            "forwardType": "documents.rename.applied", "entityKey": "documents:d1",
            "status": "COMPENSATION_FAILED", "failureReason": "title changed"},
           {"stepId": 1, "appliedAt": "2025-01-01T12:00:01+00:00",
            "forwardType": "documents.create.applied", "entityKey": "documents:d1",
            "status": "COMPENSATED"}],
           "pageInfo": {"hasNextPage": False, "endCursor": "1"}}}


def test_selector_maps_options_to_the_graphql_input() -> None:
    since = datetime(2025, 1, 1, tzinfo=UTC)
    assert selector(["r1", "r2"], "a", "chat", since, None) == {
        "runIds": ["r1", "r2"], "agentId": "a", "entryPoint": "chat",
        "startedAfter": "2025-01-01T00:00:00+00:00"}
    with pytest.raises(GatewayError, match="say which runs"):
        selector([], None, None, None, None)


def test_timeline_reads_as_a_story_newest_step_first() -> None:
    lines = timeline(RUN)
    assert lines[0] == "run run-1  (REVERTED)"
    assert "tripped: writes 7 > 6" in lines[3]
    steps = lines[lines.index("  steps, newest first (3 shown):") + 1:]
    assert "#3" in steps[0] and "IRREVERSIBLE (egress)" in steps[0]
    assert "REFUSED" in steps[1] and "(title changed)" in steps[1]
    assert "#1" in steps[2] and "undone" in steps[2]
    assert "revert requested 2025-01-01 12:05:00: rogue" in "\n".join(lines)
    more = timeline({**RUN, "steps": {"nodes": [], "pageInfo": {"hasNextPage": True, "endCursor": "9"}}})
    assert more[-1] == "  steps, newest first (0 shown, older ones not):"


def test_run_line_and_a_missing_ledger() -> None:
    assert run_line(RUN).startswith("run-1") and "comp     2" in run_line(RUN)
    assert "could not be reached" in timeline({**RUN, "steps": None})[-1]


def test_operator_key_comes_from_the_option_or_the_dev_credentials(tmp_path: Path) -> None:
    assert operator_key("explicit", tmp_path) == "explicit"
    with pytest.raises(GatewayError, match="--key"):
        operator_key(None, tmp_path)
    (tmp_path / "credentials.json").write_text(json.dumps({"principals": [
        {"id": "a", "kind": "agent", "key": "agent-key"}, {"id": "o", "kind": "operator", "key": "op-key"}]}))
    assert operator_key(None, tmp_path) == "op-key"


async def test_pages_follow_the_cursor_until_the_limit_or_the_last_page() -> None:
    asked: list[tuple[object, object, object]] = []
    total = 230

    def answer(request: httpx.Request) -> httpx.Response:
        variables = json.loads(request.content)["variables"]
        asked.append((variables["first"], variables["after"], variables.get("kind")))
        start = int(variables["after"] or 0)
        end = min(total, start + int(variables["first"]))
        page = {"nodes": [{"id": i} for i in range(start, end)],
                "pageInfo": {"hasNextPage": end < total, "endCursor": str(end)}}
        return httpx.Response(200, json={"data": {"things": page}})

    client = GatewayClient(url="http://gateway/graphql", key="k", transport=httpx.MockTransport(answer))

    async def sizes(limit: int) -> list[int]:
        return [len(nodes) async for nodes in client.pages("q", {"kind": "X"}, "things", limit)]

    assert await sizes(1000) == [100, 100, 30]  # the last page says there is no next one
    assert asked == [(100, None, "X"), (100, "100", "X"), (100, "200", "X")]
    asked.clear()
    assert await sizes(150) == [100, 50]  # the limit asks for no more than it shows
    assert asked == [(100, None, "X"), (50, "100", "X")]


def _limited(retry_after: float) -> dict[str, object]:
    return {"data": None, "errors": [{"message": "over its rate", "extensions": {
        "code": "RATE_LIMITED", "retryAfterS": retry_after}}]}


async def test_a_rate_limited_request_is_waited_out_and_sent_again() -> None:
    answers = [_limited(0.01), _limited(0.02), {"data": {"me": {"id": "op"}}}]
    sent: list[object] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["query"])
        return httpx.Response(200, json=answers.pop(0))

    client = GatewayClient(url="http://gateway/graphql", key="k", transport=httpx.MockTransport(answer))
    assert await client.call("{ me { id } }", {}) == {"me": {"id": "op"}}
    assert sent == ["{ me { id } }"] * 3


async def test_a_rate_limit_that_does_not_clear_or_asks_too_long_a_wait_is_raised() -> None:
    def always(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_limited(0.0))

    client = GatewayClient(url="http://gateway/graphql", key="k", transport=httpx.MockTransport(always))
    with pytest.raises(GatewayError, match="RATE_LIMITED") as refused:
        await client.call("{ me { id } }", {})
    assert refused.value.code == "RATE_LIMITED"

    sent: list[object] = []

    def too_long(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=_limited(3600.0))

    client = GatewayClient(url="http://gateway/graphql", key="k", transport=httpx.MockTransport(too_long))
    with pytest.raises(GatewayError, match="RATE_LIMITED"):
        await client.call("{ me { id } }", {})
    assert len(sent) == 1  # an hour's wait is the operator's call, not the CLI's
