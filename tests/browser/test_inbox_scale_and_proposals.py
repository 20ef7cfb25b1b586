"""The inbox past the gateway's alias limit and when runs cannot be read, its open incidents, and a trip's
proposal accepted from the Policy page."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, Route, WebSocketRoute, expect

from tests.browser.conftest import signed_in
from tests.e2e.api import Api, GraphQLError
from tests.e2e.stack import Stack, wait_for

CROWD = "browser.crowd"
UNREAD = "browser.unread"
LESSON = "browser.lesson"


def _trip(agent: Api, entry_point: str) -> str:
    """A run whose second write trips a maxWrites: 1 breaker (the first stays held)."""
    run_id = agent.start_run(entry_point)
    agent.write(run_id, "createDocument", title=f"draft {run_id[:8]}", body="b")
    with pytest.raises(GraphQLError) as refused:
        agent.write(run_id, "createDocument", title="one too many", body="x")
    assert refused.value.code == "BREAKER_OPEN"
    return run_id


def _card(page: Page, run_id: str) -> Any:
    return page.get_by_role("article", name=f"run_tripped alert for run {run_id[:8]}")


def test_more_alerted_runs_than_one_request_may_alias_are_all_listed_open(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(CROWD, quarantineWindowS=600.0, maxWrites=1, autoRevert=False)
    tripped = [_trip(agent, CROWD) for _ in range(31)]  # the gateway allows 30 aliases a document

    signed_in(page, stack, "inbox")
    open_alerts = page.get_by_role("list", name="Open alerts")
    decided = page.get_by_role("list", name="Decided alerts")
    for run_id in tripped:
        card = open_alerts.get_by_role("article", name=f"run_tripped alert for run {run_id[:8]}")
        expect(card.locator(".run-status")).to_have_text("TRIPPED")
        name = f"run_tripped alert for run {run_id[:8]}"
        expect(decided.get_by_role("article", name=name)).to_have_count(0)
    expect(page.locator(".problems")).to_be_empty()

    # Each trip opened an incident, listed self-contained beside the alerts.
    incident = page.get_by_role("list", name="Open incidents").get_by_role(
        "article", name=re.compile(rf"^TRIP incident \w+ for run {tripped[-1][:8]}$"))
    expect(incident).to_contain_text("writes: 2 against a limit of 1")
    expect(incident).to_contain_text(CROWD)
    expect(incident).to_contain_text("1 held")


def test_a_run_that_cannot_be_read_leaves_its_alert_open_and_says_why(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(UNREAD, quarantineWindowS=600.0, maxWrites=1, autoRevert=False)
    run_id = _trip(agent, UNREAD)

    def refuse_run_reads(route: Route) -> None:
        if "a0: run(" in (route.request.post_data or ""):
            route.fulfill(status=503, body="the gateway is busy")
        else:
            route.continue_()

    page.route("**/graphql", refuse_run_reads)
    # No live feed either (a socket that never answers), or runChanged would read the run in its place.
    page.route_web_socket(re.compile(r".*/graphql$"), lambda socket: None)
    signed_in(page, stack, "inbox")
    card = page.get_by_role("list", name="Open alerts").get_by_role(
        "article", name=f"run_tripped alert for run {run_id[:8]}")
    expect(card).to_contain_text("run could not be read")
    expect(page.locator(".problems").get_by_role("alert")).to_contain_text("listed as open")
    expect(page.get_by_role("list", name="Decided alerts").get_by_role(
        "article", name=f"run_tripped alert for run {run_id[:8]}")).to_have_count(0)


def test_a_trips_proposal_is_accepted_on_the_policy_page_and_linked_to_its_incident(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(LESSON, quarantineWindowS=0.0, maxWrites=2, autoRevert=False)
    run_id = agent.start_run(LESSON)
    for n in range(2):
        receipt = agent.write(run_id, "createDocument", title=f"escaped {n}", body="b")
        wait_for("the write to be applied",
                 lambda r=receipt: agent.command(r["commandId"])["result"] == "APPLIED")
    with pytest.raises(GraphQLError):
        agent.write(run_id, "createDocument", title="one too many", body="x")
    found = operator.call(
        "{ incidents(first: 20, kind: TRIP) { nodes { id runId proposals { id status } } } }")
    [incident] = [i for i in found["incidents"]["nodes"] if i["runId"] == run_id]
    assert incident["proposals"], "a trip after escaped writes should teach something"
    proposal = incident["proposals"][0]

    signed_in(page, stack, "policy")
    card = page.get_by_role("article",
                            name=f"Proposal {proposal['id'][:8]} for incident {incident['id'][:8]}")
    expect(card).to_contain_text("Runs replayed")
    expect(card).to_contain_text("Escaped writes")
    card.get_by_role("button", name=f"Accept proposal {proposal['id'][:8]}").click()
    dialog = page.get_by_role("dialog", name=f"Accept proposal {proposal['id'][:8]}")
    dialog.get_by_label("Reason").fill("the replay shows it stops this run sooner")
    dialog.get_by_role("button", name="Accept proposal").click()
    accepted = page.get_by_role("status").filter(has_text=re.compile(r"accepted: policy version \d+"))
    expect(accepted).to_be_visible()

    row = page.get_by_role("table", name="Policy versions").get_by_role("row").filter(has_text=incident["id"])
    expect(row).to_contain_text("the replay shows it stops this run sooner")
    expect(row).to_contain_text(LESSON)
    history = operator.call("{ policy { history { incidentId reason subject } } }")["policy"]["history"]
    [linked] = [v for v in history if v["incidentId"] == incident["id"]]
    assert linked["subject"] == LESSON
    assert linked["reason"].startswith("the replay shows it stops this run sooner")


def test_a_bulk_approval_goes_on_past_a_failed_command_and_reports_each(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy("browser.bulk", quarantineWindowS=0.0)
    run_id = agent.start_run("browser.bulk")
    tag = run_id[:8]
    receipts = [agent.write(run_id, "sendEmail", to="board@example.org", subject=f"Pack {n} ({tag})",
                            body="b") for n in (1, 2, 3)]
    signed_in(page, stack, "approvals")
    for receipt in receipts:
        page.get_by_label(f"Select notifier.send_email {receipt['commandId'][:8]}").check()
    # Another operator denies the second meanwhile: approving it now fails, the other two still go.
    operator.call('mutation($id: ID!) { denyEgress(commandId: $id, reason: "not this one") { status } }',
                  id=receipts[1]["commandId"])
    page.get_by_role("button", name="Approve selected (3)").click()
    page.get_by_role("dialog").get_by_role("button", name="Approve all").click()
    outcome = page.get_by_role("status").filter(has_text="Approved 2 write(s); 1 failed")
    expect(outcome).to_contain_text(f"notifier.send_email {receipts[1]['commandId'][:8]}: ")
    # The list is read again: none of the three waits any more.
    table = page.get_by_role("table", name="Writes awaiting approval")
    expect(table).not_to_contain_text(f"({tag})")
    for n in (1, 3):
        wait_for(f"pack {n} approved",
                 lambda r=receipts[n - 1]: operator.command(r["commandId"])["status"] != "AWAITING_APPROVAL")


class Gate:
    """Stands between the page and the gateway's WebSocket: passes connections through, refuses them with a
    close code, or closes the one open (a gateway restart, seen from the browser)."""

    def __init__(self, page: Page) -> None:
        self.refuse_with: int | None = None
        self.open: list[WebSocketRoute] = []
        self.attempts = 0
        page.route_web_socket(re.compile(r".*/graphql$"), self.handle)

    def handle(self, socket: WebSocketRoute) -> None:
        self.attempts += 1
        if self.refuse_with is not None:
            socket.close(code=self.refuse_with, reason="refused by the test")
            return
        socket.connect_to_server()
        self.open.append(socket)

    def drop(self) -> None:
        self.open.pop().close(code=1012, reason="restarting")


def test_live_updates_come_back_with_back_off_and_list_what_was_raised_meanwhile(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy("browser.outage", quarantineWindowS=600.0, maxWrites=1, autoRevert=False)
    gate = Gate(page)
    signed_in(page, stack, "inbox")
    live_state = page.locator("span.live")
    expect(live_state).to_have_text("live")

    gate.refuse_with = 1013
    gate.drop()
    expect(live_state).to_contain_text("live updates stopped (1012 restarting); trying again in 1 s")
    run_id = _trip(agent, "browser.outage")  # raised while the console is not listening
    expect(live_state).to_contain_text("trying again in 2 s")  # the next attempt was refused: it waits longer
    gate.refuse_with = None
    expect(live_state).to_have_text("live")
    expect(page.get_by_role("list", name="Open alerts").get_by_role(
        "article", name=f"run_tripped alert for run {run_id[:8]}")).to_be_visible()


def test_a_key_refused_for_live_updates_goes_back_to_sign_in(page: Page, stack: Stack) -> None:
    gate = Gate(page)
    signed_in(page, stack, "inbox")
    expect(page.locator("span.live")).to_have_text("live")
    gate.refuse_with = 4403
    gate.drop()
    expect(page.get_by_label("Operator key")).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("refused this key for live updates (4403")
