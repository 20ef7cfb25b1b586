"""Egress decided on the approvals page: an approved email reaches the SMTP sink; a denied one never does,
which later approved emails (two selected together) prove by arriving while it stays absent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from tests.browser.conftest import screenshot, signed_in
from tests.e2e.api import Api
from tests.e2e.stack import Stack, wait_for

EGRESS = "browser.egress"


def _mail(mail_dir: Path, subject: str) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in sorted(mail_dir.glob("*.json"))]
    return [m for m in found if m["subject"] == subject]


def _email(agent: Api, run_id: str, to: str, subject: str) -> dict[str, Any]:
    receipt = agent.write(run_id, "sendEmail", to=to, subject=subject, body=f"{subject}.")
    assert receipt["status"] == "AWAITING_APPROVAL"
    return receipt


def test_approved_emails_leave_and_a_denied_one_never_does(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(EGRESS, quarantineWindowS=0.0)
    run_id = agent.start_run(EGRESS)
    tag = run_id[:8]  # subjects of this run only, whatever else the stack has sent
    approved = _email(agent, run_id, "cfo@example.org", f"Q3 numbers ({tag})")
    denied = _email(agent, run_id, "everyone@example.org", f"Refunds for all ({tag})")

    signed_in(page, stack, "approvals")
    table = page.get_by_role("table", name="Writes awaiting approval")
    expect(table).to_contain_text(f"Refunds for all ({tag})")
    expect(table).to_contain_text("everyone@example.org")
    screenshot(page, "console-approvals")

    page.get_by_role("button", name=f"Approve notifier.send_email {approved['commandId'][:8]}").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("can never be called back")
    dialog.get_by_role("button", name="Approve write").click()
    expect(page.get_by_role("status").filter(has_text="Approved 1 write(s).")).to_be_visible()

    page.get_by_role("button", name=f"Deny notifier.send_email {denied['commandId'][:8]}").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("it never leaves")
    dialog.get_by_role("button", name="Deny write").click()
    expect(dialog.get_by_role("alert")).to_contain_text("Give a reason")  # a denial needs one
    dialog.get_by_label("Reason").fill("no blanket refunds")
    dialog.get_by_role("button", name="Deny write").click()
    expect(page.get_by_role("status").filter(has_text="Denied 1 write(s).")).to_be_visible()
    expect(table).not_to_contain_text(f"Refunds for all ({tag})")

    mail = wait_for("the approved email in the SMTP sink",
                    lambda: _mail(stack.mail_dir, f"Q3 numbers ({tag})"))
    assert [m["rcpt_tos"] for m in mail] == [["cfo@example.org"]]
    denied_now = operator.command(denied["commandId"])
    assert denied_now["status"] == "DISCARDED" and denied_now["reason"] == "no blanket refunds"

    # Two later emails, selected and approved together: once both have arrived, the denied one (decided
    # before them) has had every chance to, and is still absent.
    later = [_email(agent, run_id, "board@example.org", f"Board pack {n} ({tag})") for n in (1, 2)]
    page.get_by_role("button", name="Refresh").click()
    for receipt in later:
        page.get_by_label(f"Select notifier.send_email {receipt['commandId'][:8]}").check()
    page.get_by_role("button", name="Approve selected (2)").click()
    page.get_by_role("dialog").get_by_role("button", name="Approve all").click()
    expect(page.get_by_role("status").filter(has_text="Approved 2 write(s).")).to_be_visible()
    for n in (1, 2):
        wait_for(f"board pack {n} in the SMTP sink",
                 lambda n=n: _mail(stack.mail_dir, f"Board pack {n} ({tag})"))
    assert _mail(stack.mail_dir, f"Refunds for all ({tag})") == []
