"""`kinshasa demo` against the running stack, then everything it claims checked through the public API."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Any

from kinshasa.demo import GOOD_ENTRY_POINT, ROGUE_ENTRY_POINT
from kinshasa.infra.process import free_port
from tests.e2e.api import Api
from tests.e2e.stack import REPO, Stack


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    """`kinshasa demo` once the top-level CLI mounts it; the module's own entry point until then."""
    from typer.main import get_command

    from kinshasa.cli import app

    mounted = "demo" in getattr(get_command(app), "commands", {})
    command = ["kinshasa.cli", "demo"] if mounted else ["kinshasa.demo"]
    return subprocess.run([sys.executable, "-m", *command, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _typed(story: str, verb: str) -> subprocess.CompletedProcess[str]:
    """Run an operator command exactly as the demo printed it (`$ [VAR=value ...] kinshasa <verb> ...`)."""
    line = next(ln for ln in story.splitlines() if ln.strip().startswith("$") and f"kinshasa {verb} " in ln)
    words = shlex.split(line.strip()[1:])
    env = dict(os.environ)
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "kinshasa", line
    return subprocess.run([sys.executable, "-m", "kinshasa.cli", *words[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _only_run(operator: Api, entry_point: str) -> dict[str, Any]:
    nodes = operator.call("""query($e: String!) { runs(filter: {entryPoint: $e}, first: 5) {
        nodes { id status } } }""", e=entry_point)["runs"]["nodes"]
    assert len(nodes) == 1, nodes
    return operator.run(nodes[0]["id"])


def test_demo_tells_the_story_and_the_state_agrees(stack: Stack, operator: Api) -> None:
    done = _demo("--gateway", stack.gateway_url, "--credentials", str(stack.credentials_path))
    assert done.returncode == 0, f"demo failed:\n{done.stdout}\n{done.stderr}"
    story = done.stdout
    for beat in ("An agent run that behaves", "REFUSED (BREAKER_OPEN)", "Escaped (6)", "Held (4)",
                 "The operator's alert", "revertRun -> REVERTING", "REVERTED after",
                 "kinshasa revert --run", "kinshasa runs", "kinshasa run "):
        assert beat in story, f"{beat!r} missing from the demo's output:\n{story}"

    # The commands the story tells an operator to type work as printed.
    shown = _typed(story, "run")
    assert shown.returncode == 0 and "(REVERTED)" in shown.stdout, shown.stdout + shown.stderr
    listed = _typed(story, "runs")
    assert listed.returncode == 0 and "REVERTED" in listed.stdout, listed.stdout + listed.stderr
    # Typed again after the fact, the revert is a no-op that reports the run as it is.
    again = _typed(story, "revert")
    assert again.returncode == 0 and "REVERTED" in again.stdout, again.stdout + again.stderr

    good = _only_run(operator, GOOD_ENTRY_POINT)
    assert good["status"] == "FINISHED"
    assert good["counts"]["applied"] == 4 and good["counts"]["compensated"] == 0

    rogue = _only_run(operator, ROGUE_ENTRY_POINT)
    assert rogue["status"] == "REVERTED"
    assert rogue["breaker"]["state"] == "OPEN"
    assert "velocity 11 exceeded the limit of 10" in rogue["breaker"]["trippedReason"]
    assert sorted(rogue["breaker"]["servicesTouched"]) == ["documents", "ledger", "links"]
    counts = rogue["counts"]
    # Escaped: published and applied, then compensated. Held: discarded, never published.
    assert counts["published"] == 6 and counts["applied"] == 6 and counts["compensated"] == 6
    assert counts["discarded"] == 4 and counts["held"] == 0 and counts["rejected"] == 0

    commands = operator.commands(rogue["id"])
    by_status: dict[str, list[str]] = {}
    for c in commands:
        by_status.setdefault(c["status"], []).append(c["operation"])
    assert sorted(by_status["DISCARDED"]) == ["ledger.post_entry", "ledger.post_entry", "links.link",
                                              "links.link"]
    assert sorted(by_status["COMPENSATED"]) == ["documents.create", "documents.create", "documents.edit",
                                              "documents.rename", "ledger.open_account", "links.unlink"]
    steps = operator.steps(rogue["id"])
    assert len(steps) == 6 and {s["status"] for s in steps} == {"COMPENSATED"}

    alerts = operator.call("""query($id: ID!) { alerts(runId: $id) {
        kind held propagated servicesTouched threshold { name count limit } } }""", id=rogue["id"])["alerts"]
    assert len(alerts) == 1
    assert alerts[0]["kind"] == "run_tripped" and alerts[0]["held"] == 4 and alerts[0]["propagated"] == 6
    assert alerts[0]["threshold"] == {"name": "velocity", "count": 11, "limit": 10}

    # The restored state, entity by entity: the good run's work is as it left it, the rogue's is gone.
    report_id = next(c["entityId"] for c in operator.commands(good["id"])
                     if c["operation"] == "documents.create")
    marketing_id = next(c["entityId"] for c in operator.commands(good["id"])
                        if c["operation"] == "ledger.open_account")
    report = operator.call("query($id: ID!) { document(id: $id) { title body status } }",
                           id=report_id)["document"]
    assert report == {"title": "Q3 report", "body": "Revenue up 4%; churn flat.", "status": "active"}
    marketing = operator.call("query($id: ID!) { account(id: $id) { balanceCents status } }",
                              id=marketing_id)["account"]
    assert marketing == {"balanceCents": 250_000, "status": "open"}
    links = operator.call("query($id: ID!) { links(entityId: $id) { kind toId } }", id=report_id)["links"]
    assert links == [{"kind": "funded-by", "toId": marketing_id}]
    for c in commands:
        if c["operation"] == "documents.create":
            assert operator.call("query($id: ID!) { document(id: $id) { id } }",
                                 id=c["entityId"])["document"] is None
        if c["operation"] == "ledger.open_account":
            # Opened by the rogue run, closed by the revert before any money moved (its entry was held and
            # discarded): it reads as absent, its history stays in the ledger service.
            refunds = operator.call("query($id: ID!) { account(id: $id) { balanceCents status } }",
                                    id=c["entityId"])["account"]
            assert refunds is None
            history = operator.call('query($id: ID!) { entity(service: "ledger", type: "account", id: $id) '
                                    "{ id } }", id=c["entityId"])["entity"]
            assert history is None


def test_demo_says_what_to_do_when_the_stack_is_not_there(stack: Stack) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/graphql"
    done = _demo("--gateway", nowhere, "--credentials", str(stack.credentials_path))
    assert done.returncode != 0
    assert f"the gateway at {nowhere} did not answer" in done.stderr
    assert "kinshasa up" in done.stderr
