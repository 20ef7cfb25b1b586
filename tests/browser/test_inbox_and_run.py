"""A rogue run trips, its alert reaches the open inbox without a reload, the operator reverts it from there
and watches it reach REVERTED; the run page then shows each step's before -> after and the state restored."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import ProgressSpoiler, screenshot, signed_in
from tests.e2e.api import Api, GraphQLError
from tests.e2e.stack import Stack, wait_for

GOOD = "browser.good"
ROGUE = "browser.rogue"


def _applied(agent: Api, *receipts: dict[str, str]) -> None:
    for receipt in receipts:
        wait_for(f"{receipt['operation']} to be applied",
                 lambda r=receipt: agent.command(r["commandId"])["result"] == "APPLIED")


def test_a_rogue_runs_alert_arrives_live_and_its_revert_is_watched_to_the_end(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(GOOD, quarantineWindowS=0.0)
    operator.set_policy(ROGUE, quarantineWindowS=0.0, maxWrites=3, autoRevert=False)
    good = agent.start_run(GOOD)
    report = agent.write(good, "createDocument", title="Q3 report", body="Revenue up 4%.")
    _applied(agent, report)

    signed_in(page, stack, "inbox")
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()

    rogue = agent.start_run(ROGUE)
    renamed = agent.rename(rogue, report["entityId"], "Q3 report (rewritten by the agent)")
    spam = agent.write(rogue, "createDocument", title="Buy now", body="Limited offer.")
    more = agent.write(rogue, "createDocument", title="Buy now (2)", body="Limited offer.")
    _applied(agent, renamed, spam, more)
    with pytest.raises(GraphQLError) as refused:
        agent.write(rogue, "createDocument", title="one too many", body="x")
    assert refused.value.code == "BREAKER_OPEN"

    # The alert comes to the open page by the subscription: no reload, no navigation.
    card = page.get_by_role("article", name=f"run_tripped alert for run {rogue[:8]}")
    expect(card).to_be_visible()
    expect(card).to_contain_text("against a limit of 3")
    expect(card).to_contain_text(ROGUE)
    expect(card).to_contain_text("documents")
    expect(card).to_contain_text("0 held, 0 awaiting approval, 3 escaped")
    screenshot(page, "console-inbox")

    card.get_by_role("button", name=re.compile(rf"^Revert run {rogue[:8]}")).click()
    dialog = page.get_by_role("dialog", name=f"Revert run {rogue[:8]}")
    expect(dialog).to_contain_text("compensate the 3 applied steps that escaped")
    dialog.get_by_label("Reason").fill("rogue campaign: rewrote the Q3 report and posted spam")
    dialog.get_by_role("button", name="Revert run").click()
    expect(dialog).to_be_hidden()
    # Progress is pushed to the card as the coordinator compensates, until the run is REVERTED.
    expect(card.get_by_role("status")).to_have_text(
        "Revert REVERTED: 3 of 3 compensated, 0 failing, 0 pending")

    card.get_by_role("link", name=rogue[:8]).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("REVERTED")
    expect(page.locator("#revert-progress")).to_have_text(
        "REVERTED: 3 of 3 compensated, 0 failing, 0 pending")
    rename_step = page.get_by_role("article", name=re.compile(r"^Step \d+: documents\.rename"))
    expect(rename_step).to_contain_text("compensated")
    changed = rename_step.locator("tr.changed").filter(has_text="title")
    expect(changed.locator("td.before")).to_have_text("Q3 report")
    expect(changed.locator("td.after")).to_have_text("Q3 report (rewritten by the agent)")
    created = page.get_by_role("article",
                               name=re.compile(rf"^Step \d+: documents\.create on {spam['entityId']}$"))
    expect(created.locator("tr.changed").filter(has_text="title").locator("td.after")).to_have_text("Buy now")
    # What the revert restored: the good run's report has its title back, the rogue's documents are gone.
    state = page.get_by_role("table", name="State now")
    report_now = state.locator(f"tr[data-entity='documents:document:{report['entityId']}']")
    expect(report_now).to_contain_text('"title":"Q3 report"')
    expect(state.locator(f"tr[data-entity='documents:document:{spam['entityId']}']")).to_contain_text("absent")
    screenshot(page, "console-run")


def test_an_alerts_card_shows_where_its_revert_ended_even_when_the_last_event_failed(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    entry = "browser.spoiled-card"
    operator.set_policy(entry, quarantineWindowS=0.0, maxWrites=1, autoRevert=False)
    spoiler = ProgressSpoiler(page)
    signed_in(page, stack, "inbox")
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()

    run_id = spoiler.run_id = agent.start_run(entry)
    _applied(agent, agent.write(run_id, "createDocument", title="draft", body="b"))
    with pytest.raises(GraphQLError) as refused:
        agent.write(run_id, "createDocument", title="one too many", body="x")
    assert refused.value.code == "BREAKER_OPEN"

    card = page.get_by_role("article", name=f"run_tripped alert for run {run_id[:8]}")
    card.get_by_role("button", name=re.compile(rf"^Revert run {run_id[:8]}")).click()
    dialog = page.get_by_role("dialog", name=f"Revert run {run_id[:8]}")
    dialog.get_by_label("Reason").fill("a spoiled event")
    dialog.get_by_role("button", name="Revert run").click()
    # The event that said REVERTED came without its progress and ended the feed: the card asks again.
    spoiler.wait_until_asked_again(page)
    expect(card.get_by_role("status")).to_have_text(
        "Revert REVERTED: 1 of 1 compensated, 0 failing, 0 pending")
