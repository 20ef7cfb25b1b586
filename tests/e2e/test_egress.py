"""Irreversible egress waits for an operator: approved, it reaches the SMTP sink once; denied, never."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.api import Api
from tests.e2e.stack import Stack, wait_for

ENTRY_POINT = "e2e.egress"
MESSAGE = "query($id: ID!) { emails(runId: $id) { id to subject status } }"


def _mail(mail_dir: Path) -> list[dict[str, Any]]:
    """Every delivery the sink stored (one JSON file each, written atomically)."""
    return [json.loads(p.read_text()) for p in sorted(mail_dir.glob("*.json"))]


def _delivered(mail_dir: Path, command_id: str) -> list[dict[str, Any]]:
    return [m for m in _mail(mail_dir) if m["message_id"] == f"<{command_id}@kinshasa.invalid>"]


def test_email_waits_for_approval_then_leaves_once_and_a_denied_one_never(
        stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(ENTRY_POINT, quarantineWindowS=0.0)
    run_id = agent.start_run(ENTRY_POINT)
    approved = agent.write(run_id, "sendEmail", to="cfo@example.org", subject="Q3 numbers",
                           body="Attached, as promised.")
    denied = agent.write(run_id, "sendEmail", to="everyone@example.org", subject="Refunds for all",
                         body="You are all getting a refund.")
    assert approved["status"] == "AWAITING_APPROVAL" and denied["status"] == "AWAITING_APPROVAL"
    assert approved["releaseAt"] is None

    # A write accepted after the emails goes through and is applied: the pipeline is moving, yet the
    # emails stay where they are. This orders the check after real work instead of after a sleep.
    marker = agent.write(run_id, "createDocument", title="egress marker")
    assert marker["status"] == "PUBLISHED"
    wait_for("the marker document to be applied",
             lambda: agent.command(marker["commandId"])["result"] == "APPLIED")
    for receipt in (approved, denied):
        assert agent.command(receipt["commandId"])["status"] == "AWAITING_APPROVAL"
        assert _delivered(stack.mail_dir, receipt["commandId"]) == []
    assert agent.call(MESSAGE, id=run_id)["emails"] == []
    assert agent.run(run_id)["counts"]["awaitingApproval"] == 2

    # Only an operator decides; the agent cannot approve its own email.
    approve = "mutation($id: ID!) { approveEgress(commandId: $id) { status } }"
    assert agent.error_code(approve, id=approved["commandId"]) == "FORBIDDEN"

    deny = "mutation($id: ID!, $why: String!) { denyEgress(commandId: $id, reason: $why) { status reason } }"
    assert operator.call(deny, id=denied["commandId"], why="no blanket refunds")["denyEgress"] == {
        "status": "DISCARDED", "reason": "no blanket refunds"}
    assert operator.call(approve, id=approved["commandId"])["approveEgress"]["status"] == "PUBLISHED"
    # A decision is final: the denied email cannot be approved afterwards.
    assert operator.error_code(approve, id=denied["commandId"]) == "VALIDATION"

    mail = wait_for("the approved email in the SMTP sink",
                    lambda: _delivered(stack.mail_dir, approved["commandId"]))
    assert len(mail) == 1
    assert mail[0]["rcpt_tos"] == ["cfo@example.org"] and mail[0]["subject"] == "Q3 numbers"
    assert mail[0]["headers"]["X-Kinshasa-Run-Id"] == run_id
    assert mail[0]["body"].strip() == "Attached, as promised."
    wait_for("the gateway to learn the email was applied",
             lambda: agent.command(approved["commandId"])["result"] == "APPLIED")

    # The approved email is recorded as sent, exactly once; the denied one never reached Kafka.
    emails = agent.call(MESSAGE, id=run_id)["emails"]
    sent = [(e["to"], e["subject"], e["status"]) for e in emails]
    assert sent == [("cfo@example.org", "Q3 numbers", "sent")]
    assert _delivered(stack.mail_dir, denied["commandId"]) == []
    assert not [m for m in _mail(stack.mail_dir) if m["subject"] == "Refunds for all"]
    assert agent.command(denied["commandId"])["status"] == "DISCARDED"
    counts = agent.run(run_id)["counts"]
    assert counts["awaitingApproval"] == 0 and counts["discarded"] == 1
