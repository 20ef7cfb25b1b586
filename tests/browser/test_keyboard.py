"""Keyboard only: every control of the inbox and the approvals page is reached with Tab and pressed with
Enter, the decision dialog included (its reason typed, Tab to its confirm button, Enter)."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import signed_in
from tests.e2e.api import Api, GraphQLError
from tests.e2e.stack import Stack, wait_for

HELD = "browser.keyboard"
EGRESS = "browser.keyboard-egress"
# Tab presses allowed to reach a control: the pages of a shared stack hold earlier tests' alerts too
# (one test alone opens more runs than a request may alias, each card five stops), and a decided card
# moves below every open one. 400 once fell short in CI.
MAX_TABS = 2_000


def focused_name(page: Page) -> str:
    name: str = page.evaluate("""() => {
        const el = document.activeElement;
        if (!el) return "";
        const label = el.getAttribute("aria-label")
            || (el.labels && el.labels[0] && el.labels[0].textContent) || el.textContent || "";
        return label.trim();
    }""")
    return name


def tab_to(page: Page, name: str) -> None:
    """Press Tab until the control called `name` has the focus, as a keyboard user would."""
    for _ in range(MAX_TABS):
        page.keyboard.press("Tab")
        if focused_name(page) == name:
            return
    raise AssertionError(f"{name!r} was never reached with Tab")


def decide_by_keyboard(page: Page, control: str, reason: str | None) -> None:
    tab_to(page, control)
    page.keyboard.press("Enter")
    expect(page.get_by_role("dialog")).to_be_visible()
    if reason is not None:
        # The dialog opens with the focus in its reason.
        page.keyboard.type(reason)
        page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_role("dialog")).to_be_hidden()


def test_the_inbox_by_keyboard_alone(page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(HELD, quarantineWindowS=600.0, maxWrites=1, autoRevert=False)
    signed_in(page, stack, "inbox")
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()
    run_id = agent.start_run(HELD)
    agent.write(run_id, "createDocument", title="held 1", body="b")
    with pytest.raises(GraphQLError):
        agent.write(run_id, "createDocument", title="held 2", body="b")
    card = page.get_by_role("article", name=f"run_tripped alert for run {run_id[:8]}")
    expect(card).to_contain_text("1 held, 0 awaiting approval, 0 escaped")

    page.locator("body").focus()
    decide_by_keyboard(page, f"Hold run {run_id[:8]} (run_tripped alert)", "checking with the team")
    wait_for("the hold's reason on the held command",
             lambda: [c["reason"] for c in operator.commands(run_id)] == ["checking with the team"])

    page.locator("body").focus()
    decide_by_keyboard(page, f"Discard run {run_id[:8]} (run_tripped alert)", "not wanted")
    wait_for("the held command to be discarded",
             lambda: [(c["status"], c["reason"]) for c in operator.commands(run_id)]
             == [("DISCARDED", "not wanted")])


def test_the_approvals_page_by_keyboard_alone(page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(EGRESS, quarantineWindowS=0.0)
    run_id = agent.start_run(EGRESS)
    tag = run_id[:8]
    first = agent.write(run_id, "sendEmail", to="a@example.org", subject=f"keyboard deny {tag}", body=".")
    second = agent.write(run_id, "sendEmail", to="b@example.org", subject=f"keyboard approve {tag}", body=".")
    signed_in(page, stack, "approvals")
    expect(page.get_by_role("table", name="Writes awaiting approval")).to_contain_text(f"keyboard deny {tag}")

    page.locator("body").focus()
    decide_by_keyboard(page, f"Deny notifier.send_email {first['commandId'][:8]}", "typed, not clicked")
    assert operator.command(first["commandId"])["reason"] == "typed, not clicked"

    # Selected by keyboard (Space on its checkbox), approved with the toolbar's button.
    page.locator("body").focus()
    tab_to(page, f"Select notifier.send_email {second['commandId'][:8]}")
    page.keyboard.press("Space")
    page.locator("body").focus()
    decide_by_keyboard(page, "Approve selected (1)", None)
    # Published, then APPLIED once the service sent it: either way it has left.
    wait_for("the approved email to be published",
             lambda: operator.command(second["commandId"])["status"] in ("PUBLISHED", "APPLIED"))
    assert operator.command(first["commandId"])["status"] == "DISCARDED"
