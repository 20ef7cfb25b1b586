"""Services from outside the package join a running stack: a Python package of its own (examples/tickets)
and a Go program (examples/inventory-go). Their mutations appear in the running gateway without a
restart, an agent writes through them and two example services in one run, and one revertRun undoes
all of it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kinshasa.infra.process import free_port
from tests.e2e.api import RECEIPT, Api
from tests.e2e.stack import REPO, Process, Stack, wait_for

ENTRY = "e2e.your-services"
OPEN = {"quarantineWindowS": 0.0, "maxWrites": 1000, "maxVelocity": 1000, "velocityWindowS": 1.0,
        "maxServices": 10, "maxErrors": 10, "autoRevert": False}


def _go_build() -> Callable[[Path], Path]:
    spec = importlib.util.spec_from_file_location("inventory_go_build",
                                                  REPO / "examples/inventory-go/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build: Callable[[Path], Path] = module.build
    return build


@pytest.fixture(scope="module")
def outside_services(stack: Stack) -> Iterator[dict[str, Process]]:
    """The tickets package and the Go inventory service, started after the stack is up."""
    bootstrap = stack.infra.kafka().bootstrap
    shared = {"KINSHASA_DATA_DIR": str(stack.data_dir), "KINSHASA_KAFKA_BOOTSTRAP": bootstrap,
              "KINSHASA_LOG_FORMAT": "console", "PYTHONUNBUFFERED": "1",
              "PYTHONPATH": str(REPO / "examples" / "tickets")}
    logs = stack.data_dir / "logs"
    binary = _go_build()(stack.data_dir / "bin")
    # A service of one's own joins with its topics made first: Kinshasa's service runtime only checks them.
    ensured = subprocess.run(
        [sys.executable, "-m", "kinshasa.cli", "topics", "ensure", "--service", "tickets"],
        env=os.environ | shared, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ensured.returncode == 0, ensured.stdout + ensured.stderr
    started = {
        "tickets": Process("tickets", [sys.executable, "-m", "kinshasa.cli", "service", "--module",
                                       "tickets.service:tickets"],
                           shared | {"KINSHASA_SVC_TICKETS_ADMIN_PORT": str(free_port())},
                           logs / "tickets.log"),
        "inventory": Process("inventory", [str(binary), "--bootstrap", bootstrap, "--data",
                                           str(stack.data_dir / "inventory"), "--http",
                                           f"127.0.0.1:{free_port()}"],
                             shared, logs / "inventory.log"),
    }
    for process in started.values():
        process.start()
    try:
        yield started
    finally:
        for process in started.values():
            process.stop()


def _mutations(operator: Api) -> set[str]:
    found = operator.call('{ __type(name: "Mutation") { fields { name } } }')["__type"]["fields"]
    return {f["name"] for f in found}


def _entity(api: Api, service: str, entity_type: str, entity_id: str) -> dict[str, Any] | None:
    found = api.call("query($s: String!, $t: String!, $i: ID!) { entity(service: $s, type: $t, id: $i) "
                     "{ version state history { version operation runId } } }",
                     s=service, t=entity_type, i=entity_id)["entity"]
    return found if found is None else dict(found)


def _write(api: Api, run_id: str, mutation: str, arguments: str, **variables: Any) -> dict[str, Any]:
    declared = ", ".join(f"${name}: {kind}" for name, kind in variables.pop("_types").items())
    query = f"mutation($r: ID!, {declared}) {{ {mutation}(runId: $r, {arguments}) {{ {RECEIPT} }} }}"
    receipt: dict[str, Any] = api.call(query, r=run_id, **variables)[mutation]
    return receipt


def test_outside_services_join_a_running_stack_and_one_revert_undoes_all(
        stack: Stack, agent: Api, operator: Api, outside_services: dict[str, Process]) -> None:
    started = time.monotonic()
    wanted = {"openTicket", "assignTicket", "closeTicket", "addItem", "adjustStock", "renameItem"}
    wait_for("the outside services' mutations in the running gateway",
             lambda: wanted <= _mutations(operator), timeout_s=60)
    appeared_s = time.monotonic() - started
    print(f"outside services' mutations live {appeared_s:.1f}s after their processes started")
    assert stack.processes["gateway"].alive()  # the same gateway process: no restart

    operator.set_policy(ENTRY, **OPEN)
    run_id = agent.start_run(ENTRY)
    document = agent.write(run_id, "createDocument", title="Q3 plan", body="draft")["entityId"]
    account = agent.write(run_id, "openAccount", name="Support refunds", currency="EUR")["entityId"]
    agent.write(run_id, "postEntry", accountId=account, amountCents=1500, memo="refund")
    ticket = agent.write(run_id, "openTicket", title="Printer on fire", priority="high")["entityId"]
    _write(agent, run_id, "assignTicket", "ticketId: $t, assignee: $a", t=ticket, a="alice",
           _types={"t": "ID!", "a": "String!"})
    item = agent.write(run_id, "addItem", sku="TONER-9", name="Toner", quantity=5)["entityId"]
    agent.write(run_id, "adjustStock", itemId=item, delta=3, reason="restock")
    wait_for("7 applied commands", lambda: agent.run(run_id)["counts"]["applied"] >= 7, timeout_s=120)

    assigned = _entity(agent, "tickets", "ticket", ticket)
    assert assigned is not None and assigned["state"]["assignee"] == "alice"
    assert [v["operation"] for v in assigned["history"]] == ["tickets.open", "tickets.assign"]
    stocked = _entity(agent, "inventory", "item", item)
    assert stocked is not None and stocked["state"]["quantity"] == 8

    operator.call('mutation($r: ID!) { revertRun(runId: $r, reason: "e2e: undo a run across services") '
                  "{ status } }", r=run_id)
    wait_for("the run REVERTED", lambda: agent.run(run_id)["status"] == "REVERTED", timeout_s=120)
    steps = agent.steps(run_id)
    assert len(steps) == 7 and {s["status"] for s in steps} == {"COMPENSATED"}, steps
    assert {s["entityKey"].split(":")[0] for s in steps} == {"documents", "ledger", "tickets", "inventory"}

    assert _entity(agent, "tickets", "ticket", ticket) is None
    assert _entity(agent, "inventory", "item", item) is None
    assert agent.call("query($i: ID!) { document(id: $i) { id } }", i=document)["document"] is None
    closed = agent.call("query($i: ID!) { account(id: $i) { status balanceCents } }", i=account)["account"]
    assert closed == {"status": "closed", "balanceCents": 0}
