"""The other pages: runs filtered and reverted several at once with live progress; policy versions with
author and reason; each component's dead letters."""

from __future__ import annotations

import json
import re
import uuid

from confluent_kafka import Producer
from playwright.sync_api import Page, expect

from kinshasa.topics.catalogue import ALERTS
from tests.browser.conftest import signed_in
from tests.e2e.api import Api
from tests.e2e.stack import Stack, wait_for

MANY = "browser.many"


def test_runs_are_filtered_and_several_reverted_together_with_live_progress(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(MANY, quarantineWindowS=0.0)
    runs = [agent.start_run(MANY) for _ in range(2)]
    for run_id in runs:
        receipt = agent.write(run_id, "createDocument", title=f"draft {run_id[:8]}", body="b")
        wait_for("the draft to be applied",
                 lambda r=receipt: agent.command(r["commandId"])["result"] == "APPLIED")

    signed_in(page, stack, "runs")
    page.get_by_label("Entry point").fill(MANY)
    page.get_by_label("Status").select_option("RUNNING")
    page.get_by_role("button", name="Filter").click()
    table = page.get_by_role("table", name="Runs")
    for run_id in runs:
        expect(table.locator(f"tr[data-run='{run_id}']")).to_be_visible()
        page.get_by_label(f"Select run {run_id[:8]}").check()
    page.get_by_role("button", name="Revert selected (2)").click()
    dialog = page.get_by_role("dialog", name="Revert 2 runs")
    dialog.get_by_label("Reason").fill("drafts from a bad prompt")
    dialog.get_by_role("button", name="Revert 2 runs").click()
    expect(page.get_by_role("status").filter(has_text="Revert requested for 2 run(s)")).to_be_visible()
    for run_id in runs:
        expect(table.locator(f"tr[data-run='{run_id}'] td[role='status']")).to_have_text(
            "REVERTED: 1 of 1 compensated, 0 failing, 0 pending")
        assert operator.run(run_id)["status"] == "REVERTED"


def test_policy_versions_and_dead_letters_are_shown(page: Page, stack: Stack, operator: Api) -> None:
    operator.set_policy("browser.policy-page", maxWrites=7)
    signed_in(page, stack, "policy")
    versions = page.get_by_role("table", name="Policy versions")
    row = versions.get_by_role("row").filter(has_text="browser.policy-page")
    expect(row).to_contain_text("maxWrites")
    expect(row).to_contain_text("operator")  # the author
    expect(row).to_contain_text("e2e")  # the reason it was given

    page.get_by_role("link", name="Dead letters").click()
    expect(page.get_by_role("heading", name="Dead letters")).to_be_visible()
    for component in ("gateway", "coordinator"):
        heading = page.get_by_role("heading", name=re.compile(rf"^{component}: \d+ dead letter\(s\)$"))
        expect(heading).to_be_visible()


def test_a_dead_letter_is_inspected_and_reprocessed(page: Page, stack: Stack) -> None:
    # A message no envelope parser accepts, on a topic the gateway consumes: its guard dead-letters it.
    state = json.loads((stack.data_dir / "infra" / "state.json").read_text())
    message_id = str(uuid.uuid4())
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{state['kafka_port']}"})
    producer.produce(ALERTS, key=b"browser-dlq", value=json.dumps({"message_id": message_id}).encode(),
                     headers=[("message_id", message_id.encode())])
    assert producer.flush(30) == 0

    signed_in(page, stack, "dead-letters")
    letter = page.get_by_role("listitem").filter(has_text=message_id)

    def listed() -> bool:
        page.get_by_role("button", name="Refresh").click()
        return letter.count() == 1

    wait_for("the poison message among the gateway's dead letters", listed)
    letter.get_by_text(message_id, exact=True).click()  # opens the letter
    expect(letter.locator("pre")).to_contain_text('"topic": "kinshasa.alerts"')
    letter.get_by_role("button", name=f"Reprocess dead letter {message_id} of gateway").click()
    page.get_by_role("dialog").get_by_role("button", name="Reprocess").click()
    # Still poison: the handler refuses it again, and the page says so.
    outcome = page.get_by_role("status").filter(has_text=f"Reprocessed {message_id} of gateway: failed")
    expect(outcome).to_be_visible()
