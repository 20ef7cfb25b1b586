"""The other pages: runs filtered and reverted several at once with live progress (which a failed event
does not leave stale); policy versions with author and reason; each component's dead letters."""

from __future__ import annotations

import json
import re
import uuid

from confluent_kafka import Producer
from playwright.sync_api import Locator, Page, expect

from kinshasa.topics.catalogue import ALERTS
from tests.browser.conftest import ProgressSpoiler, signed_in
from tests.e2e.api import Api
from tests.e2e.stack import Stack, wait_for

MANY = "browser.many"


def _revert_on_the_runs_page(page: Page, stack: Stack, entry: str, runs: list[str], reason: str) -> Locator:
    """List the entry point's running runs, select `runs` and revert them; returns the table."""
    signed_in(page, stack, "runs")
    page.get_by_label("Entry point").fill(entry)
    page.get_by_label("Status").select_option("RUNNING")
    page.get_by_role("button", name="Filter").click()
    table = page.get_by_role("table", name="Runs")
    # The filtered listing is in: selecting from the unfiltered one would race its replacement, which, if
    # read after the revert began, no longer lists the run as RUNNING.
    expect(table).to_have_attribute("aria-busy", "false")
    for run_id in runs:
        expect(table.locator(f"tr[data-run='{run_id}']")).to_be_visible()
        page.get_by_label(f"Select run {run_id[:8]}").check()
    page.get_by_role("button", name=f"Revert selected ({len(runs)})").click()
    title = f"Revert {len(runs)} run{'' if len(runs) == 1 else 's'}"
    dialog = page.get_by_role("dialog", name=title)
    dialog.get_by_label("Reason").fill(reason)
    dialog.get_by_role("button", name=title).click()
    return table


def test_runs_are_filtered_and_several_reverted_together_with_live_progress(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(MANY, quarantineWindowS=0.0)
    runs = [agent.start_run(MANY) for _ in range(2)]
    for run_id in runs:
        receipt = agent.write(run_id, "createDocument", title=f"draft {run_id[:8]}", body="b")
        wait_for("the draft to be applied",
                 lambda r=receipt: agent.command(r["commandId"])["result"] == "APPLIED")

    table = _revert_on_the_runs_page(page, stack, MANY, runs, "drafts from a bad prompt")
    expect(page.get_by_role("status").filter(has_text="Revert requested for 2 run(s)")).to_be_visible()
    for run_id in runs:
        expect(table.locator(f"tr[data-run='{run_id}'] td[role='status']")).to_have_text(
            "REVERTED: 1 of 1 compensated, 0 failing, 0 pending")
        assert operator.run(run_id)["status"] == "REVERTED"


def _run_with_an_applied_draft(agent: Api, operator: Api, entry: str) -> str:
    operator.set_policy(entry, quarantineWindowS=0.0)
    run_id = agent.start_run(entry)
    receipt = agent.write(run_id, "createDocument", title="draft", body="b")
    wait_for("the draft to be applied", lambda: agent.command(receipt["commandId"])["result"] == "APPLIED")
    return run_id


def test_a_reverted_run_whose_last_event_failed_still_shows_its_progress(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    spoiler = ProgressSpoiler(page)
    entry = "browser.spoiled"
    run_id = spoiler.run_id = _run_with_an_applied_draft(agent, operator, entry)

    table = _revert_on_the_runs_page(page, stack, entry, [run_id], "a spoiled event")
    # The failed event said REVERTED without its progress, and the feed ended there: the row asks again.
    spoiler.wait_until_asked_again(page)
    expect(table.locator(f"tr[data-run='{run_id}'] td[role='status']")).to_have_text(
        "REVERTED: 1 of 1 compensated, 0 failing, 0 pending")


def test_the_run_page_reads_its_run_again_when_the_last_event_of_its_revert_failed(
        page: Page, stack: Stack, agent: Api, operator: Api) -> None:
    spoiler = ProgressSpoiler(page)
    entry = "browser.spoiled-page"
    run_id = spoiler.run_id = _run_with_an_applied_draft(agent, operator, entry)

    signed_in(page, stack, f"run/{run_id}")
    page.get_by_role("button", name=f"Revert run {run_id[:8]}").click()
    dialog = page.get_by_role("dialog", name=f"Revert run {run_id[:8]}")
    dialog.get_by_label("Reason").fill("a spoiled event")
    dialog.get_by_role("button", name="Revert run").click()
    spoiler.wait_until_asked_again(page)
    expect(page.locator("#revert-progress")).to_have_text(
        "REVERTED: 1 of 1 compensated, 0 failing, 0 pending")


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


def test_a_failing_feed_is_asked_again_ever_later_up_to_half_a_minute(page: Page, stack: Stack) -> None:
    # Each failure in a row doubles the wait before a run's feed is opened again, from 2 s up to 30 s: a
    # feed that keeps failing (the coordinator down) is not asked for every 2 s for as long as it lasts.
    signed_in(page, stack, "runs")
    delays = page.evaluate(
        "import('/console/ui.js').then((ui) => [1, 2, 3, 4, 5, 6, 20].map((n) => ui.feedRetryDelay(n)))")
    assert delays == [2000, 4000, 8000, 16000, 30000, 30000, 30000]
