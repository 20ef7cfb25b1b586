"""The API the operator's console stands on: approvals across runs, paged commands, the breaker filter, and
the operator-only subscriptions over graphql-transport-ws, against a real gateway served over a socket."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
import websockets
from websockets.exceptions import ConnectionClosed

from kinshasa.gateway.app import MAX_SUBSCRIPTIONS_PER_CONNECTION
from kinshasa.gateway.fairness import Limits
from kinshasa.gateway.live import AlertFeed
from kinshasa.gateway.loaders import DatabaseReads
from kinshasa.infra.process import free_port
from kinshasa.kernel.component import QuietServer
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, OTHER_AGENT_KEY, Harness

EMAIL = (
    "mutation($r: ID!, $to: String!, $s: String!) { sendEmail(runId: $r, input: {to: $to, subject: $s, "
    'body: "hello"}) { commandId status } }'
)
APPROVALS = """query($first: Int!, $after: String) { approvals(first: $first, after: $after) {
  nodes { runId agentId entryPoint payload command { commandId status operation } }
  pageInfo { hasNextPage endCursor } } }"""


async def _email(harness: Harness, run_id: str, subject: str, key: str = AGENT_KEY) -> str:
    data = await harness.client.data(EMAIL, {"r": run_id, "to": "cfo@example.org", "s": subject}, key)
    assert data["sendEmail"]["status"] == "AWAITING_APPROVAL"
    return str(data["sendEmail"]["commandId"])


async def test_approvals_list_every_waiting_email_across_runs_oldest_first_a_page_at_a_time(
    harness: Harness,
) -> None:
    c = harness.client
    first_run = await c.start_run(entry_point="approvals-a")
    other_run = await c.start_run(key=OTHER_AGENT_KEY, entry_point="approvals-b")
    one = await _email(harness, first_run, "one")
    two = await _email(harness, first_run, "two")
    # agent-2 has no scope for email: its run holds a document instead, which needs no approval.
    await c.create_document(other_run, key=OTHER_AGENT_KEY)
    three = await _email(harness, first_run, "three")

    page = (await c.data(APPROVALS, {"first": 2}, OPERATOR_KEY))["approvals"]
    assert [n["command"]["commandId"] for n in page["nodes"]] == [one, two]
    assert page["pageInfo"]["hasNextPage"] is True
    node = page["nodes"][0]
    assert node["runId"] == first_run and node["agentId"] == "agent-1" and node["entryPoint"] == "approvals-a"
    assert node["payload"] == {"to": "cfo@example.org", "subject": "one", "body": "hello"}
    assert node["command"]["status"] == "AWAITING_APPROVAL" and node["command"]["operation"].endswith(
        ".send_email"
    )

    rest = (await c.data(APPROVALS, {"first": 2, "after": page["pageInfo"]["endCursor"]}, OPERATOR_KEY))[
        "approvals"
    ]
    assert [n["command"]["commandId"] for n in rest["nodes"]] == [three]
    assert rest["pageInfo"]["hasNextPage"] is False

    # Decided, it leaves the list: what is left is what still waits.
    await c.data(
        'mutation($id: ID!) { denyEgress(commandId: $id, reason: "not today") { status } }', {"id": two},
        OPERATOR_KEY,
    )
    await c.data("mutation($id: ID!) { approveEgress(commandId: $id) { status } }", {"id": one}, OPERATOR_KEY)
    left = (await c.data(APPROVALS, {"first": 50}, OPERATOR_KEY))["approvals"]["nodes"]
    assert [n["command"]["commandId"] for n in left] == [three]


async def test_approvals_are_the_operators_and_a_bad_cursor_is_refused(harness: Harness) -> None:
    c = harness.client
    error = await c.error(APPROVALS, {"first": 5}, AGENT_KEY)
    assert error["extensions"]["code"] == "FORBIDDEN"
    for after in ("not-a-cursor", "W10=", "x" * 2000):
        error = await c.error(APPROVALS, {"first": 5, "after": after}, OPERATOR_KEY)
        assert error["extensions"]["code"] == "VALIDATION", after
    error = await c.error(APPROVALS, {"first": 0}, OPERATOR_KEY)
    assert error["extensions"]["code"] == "VALIDATION"


async def test_a_runs_commands_page_by_the_last_command_id(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 600})
    run_id = await c.start_run(entry_point="commands-pages")
    written = [(await c.create_document(run_id, title=f"t{i}"))["data"]["createDocument"]["commandId"]
               for i in range(5)]
    query = """query($id: ID!, $after: String) { run(id: $id) {
      commands(first: 2, after: $after) { commandId } } }"""
    seen: list[str] = []
    after = None
    while True:
        page = (await c.data(query, {"id": run_id, "after": after}, OPERATOR_KEY))["run"]["commands"]
        seen += [p["commandId"] for p in page]
        if len(page) < 2:
            break
        after = page[-1]["commandId"]
    assert seen == written

    # A command of another run, or no command at all, is not a cursor of this run's commands.
    other = await c.start_run(entry_point="commands-pages")
    foreign = (await c.create_document(other))["data"]["createDocument"]["commandId"]
    for bad in (foreign, str(uuid.uuid4()), "nope"):
        error = await c.error(query, {"id": run_id, "after": bad}, OPERATOR_KEY)
        assert error["extensions"]["code"] == "VALIDATION", bad


async def test_runs_filter_by_breaker_state(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"maxWrites": 1, "quarantineWindowS": 600, "autoRevert": False}, scope="ENTRY_POINT",
                       subject="breaker-filter", loosen=True)
    tripped = await c.start_run(entry_point="breaker-filter")
    calm = await c.start_run(entry_point="breaker-filter")
    await c.create_document(tripped)
    assert (await c.create_document(tripped))["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"
    await c.create_document(calm)
    query = """query($s: BreakerState!) { runs(filter: {entryPoint: "breaker-filter", breakerState: $s}) {
      nodes { id breaker { state } } } }"""
    open_runs = (await c.data(query, {"s": "OPEN"}, OPERATOR_KEY))["runs"]["nodes"]
    closed_runs = (await c.data(query, {"s": "CLOSED"}, OPERATOR_KEY))["runs"]["nodes"]
    assert [r["id"] for r in open_runs] == [tripped] and [r["id"] for r in closed_runs] == [calm]


# --- subscriptions over a real socket ------------------------------------------------------------------


@pytest.fixture
async def served(harness: Harness) -> AsyncIterator[str]:
    """The harness's gateway app on a real port: WebSockets need one. Yields its ws:// URL of /graphql."""
    port = free_port()
    server = QuietServer(uvicorn.Config(harness.gateway.app, host="127.0.0.1", port=port, log_config=None,
                                        access_log=False, lifespan="off"))
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.02)
    assert server.started, "the gateway did not start serving"
    try:
        yield f"ws://127.0.0.1:{port}/graphql"
    finally:
        server.should_exit = True
        await serving


class Subscriber:
    """A graphql-transport-ws client: connection_init with the key, then one subscription."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket

    async def receive(self, within_s: float = 20.0) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(self.socket.recv(), within_s))
        return message

    async def subscribe(self, query: str, variables: dict[str, Any] | None = None) -> None:
        await self.socket.send(json.dumps(
            {"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables or {}}}))

    async def next(self, within_s: float = 20.0) -> dict[str, Any]:
        message = await self.receive(within_s)
        assert message["type"] == "next", message
        assert not message["payload"].get("errors"), message
        data: dict[str, Any] = message["payload"]["data"]
        return data


async def _connect(url: str, key: str | None) -> tuple[Any, dict[str, Any] | None]:
    socket = await websockets.connect(url, subprotocols=[websockets.Subprotocol("graphql-transport-ws")])
    payload = {"authorization": f"Bearer {key}"} if key else {}
    await socket.send(json.dumps({"type": "connection_init", "payload": payload}))
    try:
        return socket, json.loads(await asyncio.wait_for(socket.recv(), 10))
    except ConnectionClosed:
        return socket, None


async def test_an_operator_sees_an_alert_the_moment_a_run_trips(harness: Harness, served: str) -> None:
    c = harness.client
    await c.set_policy({"maxWrites": 1, "quarantineWindowS": 600, "autoRevert": False}, scope="ENTRY_POINT",
                       subject="live-alerts", loosen=True)
    socket, ack = await _connect(served, OPERATOR_KEY)
    try:
        assert ack == {"type": "connection_ack"}
        live = Subscriber(socket)
        await live.subscribe(
            "subscription { alertRaised { id kind runId agentId threshold { name count limit } held } }"
        )
        run_id = await c.start_run(entry_point="live-alerts")
        await c.create_document(run_id)
        await c.create_document(run_id)  # the second write trips the breaker
        alert = (await live.next())["alertRaised"]
        assert alert["kind"] == "run_tripped" and alert["runId"] == run_id and alert["agentId"] == "agent-1"
        assert alert["threshold"] == {"name": "writes", "count": 2.0, "limit": 1.0} and alert["held"] == 1
        stored = (await c.data("query($r: ID) { alerts(runId: $r) { id } }", {"r": run_id}, OPERATOR_KEY))
        assert [a["id"] for a in stored["alerts"]] == [alert["id"]]
    finally:
        await socket.close()

    # A client that listed alerts a moment ago and subscribes now is sent what was raised meanwhile.
    socket, _ = await _connect(served, OPERATOR_KEY)
    try:
        late = Subscriber(socket)
        await late.subscribe("subscription { alertRaised { id } }")
        assert (await late.next())["alertRaised"] == {"id": alert["id"]}
    finally:
        await socket.close()


async def test_a_run_is_sent_now_and_again_when_it_changes(harness: Harness, served: str) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 600}, scope="ENTRY_POINT", subject="live-run", loosen=True)
    run_id = await c.start_run(entry_point="live-run")
    socket, ack = await _connect(served, OPERATOR_KEY)
    try:
        assert ack == {"type": "connection_ack"}
        live = Subscriber(socket)
        await live.subscribe("subscription($id: ID!) { runChanged(id: $id) { id status counts { held } "
                             "breaker { writes } } }", {"id": run_id})
        now = (await live.next())["runChanged"]
        assert now == {"id": run_id, "status": "RUNNING", "counts": {"held": 0}, "breaker": {"writes": 0}}
        await c.create_document(run_id)
        changed = (await live.next())["runChanged"]
        assert changed["counts"] == {"held": 1} and changed["breaker"] == {"writes": 1}
        await c.data("mutation($id: ID!) { discardRun(runId: $id) { count } }", {"id": run_id}, OPERATOR_KEY)
        assert (await live.next())["runChanged"]["counts"] == {"held": 0}
    finally:
        await socket.close()

    # A run that does not exist is an error on the subscription, not a silent wait.
    socket, _ = await _connect(served, OPERATOR_KEY)
    try:
        live = Subscriber(socket)
        await live.subscribe("subscription { runChanged(id: \"no-such-run\") { id } }")
        message = await live.receive()
        assert message["type"] in ("error", "next"), message
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "RUN_NOT_FOUND"
    finally:
        await socket.close()


@pytest.mark.parametrize("key", [AGENT_KEY, None, "not-a-key"], ids=["agent", "no key", "unknown key"])
async def test_only_an_operator_may_subscribe(harness: Harness, served: str, key: str | None) -> None:
    socket, ack = await _connect(served, key)
    try:
        assert ack is None, ack
        assert socket.close_code == 4403
    finally:
        await socket.close()


async def test_release_discard_and_hold_record_the_operators_reason(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 600}, scope="ENTRY_POINT", subject="reasons", loosen=True)
    run_id = await c.start_run(entry_point="reasons")
    await c.create_document(run_id)
    commands = 'query($id: ID!) { run(id: $id) { commands { status reason } } }'
    action = "mutation($id: ID!, $why: String) {{ {name}(runId: $id, reason: $why) {{ count }} }}"

    # Too long a reason is refused and changes nothing.
    error = await c.error(action.format(name="holdRun"), {"id": run_id, "why": "x" * 2001}, OPERATOR_KEY)
    assert error["extensions"]["code"] == "VALIDATION"
    assert (await c.data(commands, {"id": run_id}, OPERATOR_KEY))["run"]["commands"] == [
        {"status": "HELD", "reason": None}]

    held = await c.data(action.format(name="holdRun"), {"id": run_id, "why": "looking into it"}, OPERATOR_KEY)
    assert held["holdRun"]["count"] == 1
    assert (await c.data(commands, {"id": run_id}, OPERATOR_KEY))["run"]["commands"] == [
        {"status": "HELD", "reason": "looking into it"}]
    discarded = await c.data(action.format(name="discardRun"), {"id": run_id, "why": "duplicate work"},
                             OPERATOR_KEY)
    assert discarded["discardRun"]["count"] == 1
    assert (await c.data(commands, {"id": run_id}, OPERATOR_KEY))["run"]["commands"] == [
        {"status": "DISCARDED", "reason": "duplicate work"}]

    other = await c.start_run(entry_point="reasons")
    await c.create_document(other)
    released = await c.data(action.format(name="releaseRun"), {"id": other, "why": "checked, fine"},
                            OPERATOR_KEY)
    assert released["releaseRun"]["count"] == 1
    statuses = (await c.data(commands, {"id": other}, OPERATOR_KEY))["run"]["commands"]
    assert statuses[0]["status"] in ("PUBLISHED", "APPLIED", "REJECTED")


async def test_a_watching_operator_is_not_counted_in_flight(harness: Harness, served: str) -> None:
    """Subscriptions last as long as a console is open: they pay their cost once, like a request, but do
    not hold the operator's in-flight slots, so queries and decisions still pass beside them."""
    harness.gateway.fairness.overrides["op-1"] = Limits(rate_per_s=1e9, burst=1e9, max_in_flight=1)
    run_id = await harness.client.start_run(entry_point="in-flight")
    socket, ack = await _connect(served, OPERATOR_KEY)
    try:
        assert ack == {"type": "connection_ack"}
        live = Subscriber(socket)
        await live.subscribe("subscription($id: ID!) { runChanged(id: $id) { id } }", {"id": run_id})
        assert (await live.next())["runChanged"] == {"id": run_id}
        await socket.send(json.dumps({"id": "2", "type": "subscribe",
                                      "payload": {"query": "subscription { alertRaised { id } }"}}))
        for _ in range(3):
            data = await harness.client.data("{ me { kind } }", key=OPERATOR_KEY)
            assert data == {"me": {"kind": "operator"}}
    finally:
        await socket.close()


def _alert_pollers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "alert-feed" and not t.done()]


async def _until(condition: Any, what: str, within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting: {what}")


async def test_a_subscriber_cancelled_while_the_feed_primes_leaves_no_poller_behind(harness: Harness) -> None:
    """The alert feed's poller runs only while someone listens, including a listener that leaves before the
    poller's first read is done (a console closed while connecting)."""
    reads = DatabaseReads(harness.gateway.engine, 1)
    gate = asyncio.Event()
    reading = asyncio.Event()

    @asynccontextmanager
    async def slow_connect() -> AsyncIterator[Any]:
        reading.set()
        await gate.wait()  # the first read hangs until the test lets it through
        async with reads.connect() as conn:
            yield conn

    feed = AlertFeed(slow_connect, poll_s=0.05)
    entered: list[str] = []

    async def listen(name: str, stay: asyncio.Event) -> None:
        async with feed.subscribe():
            entered.append(name)
            await stay.wait()

    before = set(_alert_pollers())
    leaving = asyncio.create_task(listen("leaving", asyncio.Event()))
    await asyncio.wait_for(reading.wait(), 10)
    [poller] = set(_alert_pollers()) - before
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await _until(poller.done, "the poller to stop once its only subscriber left while priming")
    assert poller.cancelled() and not feed.polling and entered == []

    # Two wait for priming and one leaves: the other is still served, and the poller stops when it goes.
    reading.clear()
    staying_done = asyncio.Event()
    staying = asyncio.create_task(listen("staying", staying_done))
    leaving = asyncio.create_task(listen("leaving", asyncio.Event()))
    await asyncio.wait_for(reading.wait(), 10)
    [poller] = set(_alert_pollers()) - before
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    gate.set()
    await _until(lambda: entered == ["staying"], "the remaining subscriber to be served")
    assert feed.polling and not poller.done()
    staying_done.set()
    await staying
    await _until(poller.done, "the poller to stop once the last subscriber left")
    assert not feed.polling


async def test_run_changed_ends_once_the_run_settles(harness: Harness, served: str) -> None:
    """A console left open on a run costs nothing once the run can no longer change: the last state is sent,
    then the subscription completes. A finished run still holding writes is still watched."""
    c = harness.client
    await c.set_policy({"quarantineWindowS": 600}, scope="ENTRY_POINT", subject="settles", loosen=True)
    run_id = await c.start_run(entry_point="settles")
    await c.create_document(run_id)
    socket, ack = await _connect(served, OPERATOR_KEY)
    try:
        assert ack == {"type": "connection_ack"}
        live = Subscriber(socket)
        await live.subscribe("subscription($id: ID!) { runChanged(id: $id) { status counts { held } } }",
                             {"id": run_id})
        assert (await live.next())["runChanged"] == {"status": "RUNNING", "counts": {"held": 1}}
        await c.data("mutation($id: ID!) { finishRun(runId: $id) { id } }", {"id": run_id})
        assert (await live.next())["runChanged"] == {"status": "FINISHED", "counts": {"held": 1}}
        await c.data("mutation($id: ID!) { discardRun(runId: $id) { count } }", {"id": run_id}, OPERATOR_KEY)
        assert (await live.next())["runChanged"] == {"status": "FINISHED", "counts": {"held": 0}}
        assert await live.receive() == {"id": "1", "type": "complete"}
    finally:
        await socket.close()


async def test_a_connection_holds_at_most_its_subscription_limit(harness: Harness, served: str) -> None:
    socket, ack = await _connect(served, OPERATOR_KEY)
    try:
        assert ack == {"type": "connection_ack"}
        for n in range(1, MAX_SUBSCRIPTIONS_PER_CONNECTION + 2):
            await socket.send(json.dumps({"id": str(n), "type": "subscribe",
                                          "payload": {"query": "subscription { alertRaised { id } }"}}))
        past = str(MAX_SUBSCRIPTIONS_PER_CONNECTION + 1)
        while True:  # alerts replayed to the others may come first
            message = json.loads(await asyncio.wait_for(socket.recv(), 20))
            if message.get("id") == past:
                break
            assert message["type"] == "next", message
        assert message["type"] == "error" and "limit" in message["payload"][0]["message"]
        # The others still stand: the connection stays open and answers a ping.
        await socket.send(json.dumps({"type": "ping"}))
        while (message := json.loads(await asyncio.wait_for(socket.recv(), 20)))["type"] != "pong":
            assert message["type"] == "next", message
    finally:
        await socket.close()
