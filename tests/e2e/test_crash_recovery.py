"""Crashes in the middle of work: a service SIGKILLed mid-run, the coordinator SIGKILLed mid-revert.

"Exactly once" is checked where it would show: in the services' own version histories and ledger
entries (read from their HTTP read APIs), in the gateway's counts and in the coordinator's ledger.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.e2e.api import Api
from tests.e2e.stack import Stack, wait_for

OPEN = {"quarantineWindowS": 0.0, "maxWrites": 10_000, "maxVelocity": 10_000, "velocityWindowS": 1.0,
        "maxServices": 4, "maxErrors": 10, "autoRevert": False}


def _versions(stack: Stack, service: str, entity_type: str, entity_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.service_url(service)}/entities/{entity_type}/{entity_id}/versions",
                         timeout=10.0)
    response.raise_for_status()
    versions: list[dict[str, Any]] = response.json()["versions"]
    return versions


def _account(stack: Stack, account_id: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.service_url('ledger')}/entities/account/{account_id}", timeout=10.0)
    response.raise_for_status()
    account: dict[str, Any] = response.json()
    return account


def _applied(api: Api, run_id: str, count: int) -> None:
    wait_for(f"{count} applied commands in run {run_id}",
             lambda: api.run(run_id)["counts"]["applied"] >= count, timeout_s=120)


def _no_dead_letters(operator: Api) -> None:
    dlq = operator.call("{ dlq { component count error } }")["dlq"]
    assert [(d["component"], d["count"]) for d in dlq if d["count"]] == [], dlq


def test_a_service_killed_mid_run_loses_nothing_and_applies_nothing_twice(
        stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy("e2e.service-crash", **OPEN)
    run_id = agent.start_run("e2e.service-crash")
    account_id = agent.write(run_id, "openAccount", name="crash test", currency="EUR")["entityId"]
    _applied(agent, run_id, 1)

    accepted: dict[int, str] = {}
    lock = threading.Lock()
    enough_to_kill = threading.Event()

    def post(amount: int) -> None:
        receipt = agent.write(run_id, "postEntry", accountId=account_id, amountCents=amount,
                              memo=f"e2e {amount}")
        assert receipt["status"] == "PUBLISHED"
        with lock:
            accepted[amount] = receipt["commandId"]
            if len(accepted) >= 10:
                enough_to_kill.set()

    # Four writers keep commands flowing while the ledger dies, stays dead, and comes back.
    with ThreadPoolExecutor(4) as pool:
        before = [pool.submit(post, amount) for amount in range(1, 41)]
        assert enough_to_kill.wait(timeout=60)
        stack.kill("ledger")
        for future in before:
            future.result()
        after = [pool.submit(post, amount) for amount in range(41, 61)]
        stack.restart("ledger")
        for future in after:
            future.result()
    assert len(accepted) == 60

    # One more entry on the same account (one partition, so behind every redelivery) proves nothing
    # is still on its way when the counts are read.
    marker = agent.write(run_id, "postEntry", accountId=account_id, amountCents=1_000_000, memo="marker")
    agent.finish_run(run_id)
    _applied(agent, run_id, 62)

    run = agent.run(run_id)
    assert run["counts"]["applied"] == 62 and run["counts"]["published"] == 62
    assert run["counts"]["rejected"] == 0
    results = {c["commandId"]: c["result"] for c in agent.commands(run_id)}
    assert len(results) == 62 and set(results.values()) == {"APPLIED"}

    account = _account(stack, account_id)
    entries = account["entries"]
    assert sorted(e["command_id"] for e in entries) == sorted([*accepted.values(), marker["commandId"]])
    assert account["balance_cents"] == sum(range(1, 61)) + 1_000_000
    steps = operator.steps(run_id)
    assert len(steps) == 62 and len({s["stepId"] for s in steps}) == 62
    _no_dead_letters(operator)


def test_the_coordinator_killed_mid_revert_finishes_it_compensating_each_step_once(
        stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy("e2e.coordinator-crash", **OPEN)
    run_id = agent.start_run("e2e.coordinator-crash")
    documents = [agent.write(run_id, "createDocument", title=f"doc {i}")["entityId"] for i in range(8)]
    account_id = agent.write(run_id, "openAccount", name="revert test", currency="EUR")["entityId"]
    for amount in range(1, 9):
        agent.write(run_id, "postEntry", accountId=account_id, amountCents=amount * 100, memo="e2e")
    links = [agent.write(run_id, "link", fromId=a, toId=b, kind="next")["entityId"]
             for a, b in itertools.pairwise(documents)]
    agent.finish_run(run_id)
    total = len(documents) + 1 + 8 + len(links)
    _applied(agent, run_id, total)

    # With the documents service down, its compensations cannot be acknowledged: the revert is
    # certainly in the middle when the coordinator dies, with ledger and links already undone.
    stack.stop_one("documents")
    reverting = operator.call("mutation($id: ID!) { revertRun(runId: $id, reason: \"e2e\") { status } }",
                              id=run_id)["revertRun"]
    assert reverting["status"] == "REVERTING"
    elsewhere = total - len(documents)
    wait_for("the ledger and links steps to be compensated",
             lambda: operator.run(run_id)["counts"]["compensated"] >= elsewhere, timeout_s=120)
    mid = operator.run(run_id)
    assert mid["status"] == "REVERTING" and mid["counts"]["compensated"] == elsewhere
    stack.kill("coordinator")
    stack.restart("coordinator")
    stack.restart("documents")

    wait_for("the revert to finish after the restart",
             lambda: operator.run(run_id)["status"] in ("REVERTED", "REVERT_FAILED"), timeout_s=180)
    run = operator.run(run_id)
    assert run["status"] == "REVERTED", run
    wait_for("every compensation to reach the gateway",
             lambda: operator.run(run_id)["counts"]["compensated"] >= total, timeout_s=60)
    assert operator.run(run_id)["counts"]["compensated"] == total
    steps = operator.steps(run_id)
    assert len(steps) == total and {s["status"] for s in steps} == {"COMPENSATED"}

    # Each inverse took effect exactly once, whatever was re-emitted: one extra version per entity,
    # one reversal per entry.
    for document_id in documents:
        assert [v["status"] for v in _versions(stack, "documents", "document", document_id)] == [
            "active", "deleted"]
    for link_id in links:
        assert [v["status"] for v in _versions(stack, "links", "link", link_id)] == ["active", "removed"]
    assert [v["status"] for v in _versions(stack, "ledger", "account", account_id)] == ["open", "closed"]
    account = _account(stack, account_id)
    assert account["balance_cents"] == 0
    postings = [e for e in account["entries"] if e["kind"] == "posted"]
    reversals = [e for e in account["entries"] if e["kind"] == "reversal"]
    assert len(postings) == 8 and len(reversals) == 8
    assert sorted(r["reverses"] for r in reversals) == sorted(p["id"] for p in postings)
    _no_dead_letters(operator)
