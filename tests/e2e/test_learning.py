"""The system learns the punch: a rogue run trips and is reverted, its incident proposes a tighter policy
proved on the recorded runs, the operator accepts it, and the same punch lands earlier and escapes less.

The whole stack: gateway, coordinator (the revert), the services applying and compensating.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from typer.testing import CliRunner

from kinshasa.cli import app as cli
from tests.e2e.api import Api, GraphQLError
from tests.e2e.stack import Stack, wait_for

ENTRY_POINT = "e2e.learning"
GOOD_RUNS = 6
INCIDENT = """id kind runId writeIndexAtTrip escaped { operation count } held policyVersion decision
  proposals { id scope subject rationale status settings { maxVelocity operationWindows }
    backtest { runsReplayed incidentRunsReplayed incidentRunsCaught incidentRunsCaughtEarlier
      escapedWritesBefore escapedWritesAfter goodRunsReplayed goodRunsTripped } }"""


def _cli(stack: Stack, *args: str) -> str:
    """The operator's command line against the stack's gateway."""
    result = CliRunner().invoke(cli, [*args, "--gateway", stack.gateway_url, "--key", stack.key("operator")])
    assert result.exit_code == 0, result.output
    return result.output


def _good_run(agent: Api) -> str:
    run_id = agent.start_run(ENTRY_POINT)
    for n in range(3):
        agent.write(run_id, "createDocument", title=f"report {n}", body="fine")
    agent.finish_run(run_id)
    return run_id


def _rogue_run(agent: Api, attempts: int = 12) -> tuple[str, int]:
    """A loop writing as fast as it can; returns the run and how many writes were accepted."""
    run_id = agent.start_run(ENTRY_POINT)
    for n in range(attempts):
        try:
            agent.write(run_id, "createDocument", title=f"spam {n}", body="again")
        except GraphQLError as exc:
            assert exc.code == "BREAKER_OPEN"
            return run_id, n
    raise AssertionError("the rogue run never tripped")


def _trip(operator: Api, run_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        nodes = operator.call(f"{{ incidents(kind: TRIP, first: 50) {{ nodes {{ {INCIDENT} }} }} }}")
        return next((i for i in nodes["incidents"]["nodes"] if i["runId"] == run_id), None)

    incident: dict[str, Any] = wait_for(f"the TRIP incident of run {run_id}", found)
    return incident


def _reverted(operator: Api, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = wait_for(
        f"run {run_id} to be reverted",
        lambda: (r := operator.run(run_id))["status"] in ("REVERTED", "REVERT_FAILED") and r,
    )
    return run


def test_an_accepted_proposal_makes_the_same_rogue_pattern_trip_earlier_with_fewer_escaped_writes(
    stack: Stack, agent: Api, operator: Api
) -> None:
    since = datetime.now(UTC)
    operator.set_policy(ENTRY_POINT, maxVelocity=10, velocityWindowS=120.0, quarantineWindowS=0.0)
    good = [_good_run(agent) for _ in range(GOOD_RUNS)]

    rogue, accepted = _rogue_run(agent)
    assert accepted == 10
    assert _reverted(operator, rogue)["status"] == "REVERTED"
    incident = _trip(operator, rogue)
    assert incident["writeIndexAtTrip"] == 11
    assert incident["escaped"] == [{"operation": "documents.create", "count": 10}]

    by_kind = {p["settings"]["maxVelocity"] is not None: p for p in incident["proposals"]}
    threshold, window = by_kind[True], by_kind[False]
    assert (threshold["scope"], threshold["subject"]) == ("ENTRY_POINT", ENTRY_POINT)
    # Computed from the recorded runs: the good runs write three times, so three is the floor.
    assert threshold["settings"]["maxVelocity"] == 3
    assert threshold["backtest"]["goodRunsReplayed"] == GOOD_RUNS
    assert threshold["backtest"]["goodRunsTripped"] == 0
    assert threshold["backtest"]["incidentRunsReplayed"] == 1
    assert threshold["backtest"]["escapedWritesBefore"] == 10
    assert threshold["backtest"]["escapedWritesAfter"] == 3
    assert threshold["rationale"].startswith("velocity 10 → 3 would have tripped this run at write 4 with 3")
    assert window["settings"]["operationWindows"]["documents.create"] >= 1
    assert window["backtest"]["escapedWritesAfter"] == 0 and window["backtest"]["goodRunsTripped"] == 0

    # The operator reads the incident and accepts both, one through the API, one through the CLI.
    listed = _cli(stack, "incidents", "--kind", "TRIP")
    assert incident["id"] in listed and "at write 11: 10 escaped, 0 held" in listed
    shown = _cli(stack, "incident", incident["id"])
    assert threshold["rationale"] in shown and "good runs tripped 0/6" in shown
    accept = "mutation($p: ID!, $r: String!) { acceptProposal(id: $p, reason: $r) { status policyVersion } }"
    first = operator.call(accept, p=threshold["id"], r="a loop at this entry point is never right")
    assert first["acceptProposal"]["status"] == "ACCEPTED"
    said = _cli(stack, "proposal", "accept", window["id"], "--reason", "hold creates until the breaker spoke")
    assert said.startswith(f"proposal {window['id']} ACCEPTED: policy version ")
    second_version = int(said.rsplit(" ", 1)[1])
    versions = operator.call("{ policy { history { version incidentId } } }")["policy"]["history"]
    linked = {v["version"] for v in versions if v["incidentId"] == incident["id"]}
    assert linked == {first["acceptProposal"]["policyVersion"], second_version}

    again, accepted_again = _rogue_run(agent)
    assert accepted_again == 3
    assert _reverted(operator, again)["status"] == "REVERTED"
    learned = _trip(operator, again)
    assert learned["writeIndexAtTrip"] == 4 < incident["writeIndexAtTrip"]
    assert learned["escaped"] == [] and learned["held"] == 3
    assert learned["policyVersion"] == second_version

    # The recorded good runs, replayed under the version now in force, still pass; and a new one does.
    layer = operator.call(
        "query($e: String!) { policy(entryPoint: $e) { layers { scope subject settings { maxVelocity "
        "velocityWindowS quarantineWindowS operationWindows } } } }",
        e=ENTRY_POINT,
    )["policy"]["layers"]
    settings = next(v["settings"] for v in layer if v["subject"] == ENTRY_POINT)
    backtest = operator.call(
        """query($s: PolicyInput!, $e: String!, $t: DateTime!) { backtestPolicy(scope: ENTRY_POINT,
        subject: $e, settings: $s, since: $t, loosen: true) { goodRunsReplayed goodRunsTripped
        incidentRunsReplayed incidentRunsCaught escapedWritesAfter } }""",
        s=settings, e=ENTRY_POINT, t=since.isoformat(),
    )["backtestPolicy"]
    assert backtest["goodRunsReplayed"] == GOOD_RUNS and backtest["goodRunsTripped"] == 0
    assert backtest["incidentRunsReplayed"] == 2 and backtest["incidentRunsCaught"] == 2
    assert backtest["escapedWritesAfter"] == 0
    # Without the window, from the command line: both rogue runs caught at their fourth write, three
    # writes each escaping.
    figures = _cli(stack, "policy", "backtest", "--scope", "ENTRY_POINT", "--subject", ENTRY_POINT,
                   "--loosen", "--since", since.strftime("%Y-%m-%dT%H:%M:%S"), "--set", "maxVelocity=3",
                   "--set", "velocityWindowS=120", "--set", "quarantineWindowS=0")
    assert "good runs tripped:       0 of 6" in figures and "escaped writes:          10 -> 6" in figures
    fresh = _good_run(agent)
    assert operator.run(fresh)["status"] == "FINISHED" and fresh not in good


def test_a_gated_operation_waits_for_approval_and_a_revert_still_compensates_it(
    stack: Stack, agent: Api, operator: Api
) -> None:
    entry_point = "e2e.gated"
    operator.set_policy(entry_point, quarantineWindowS=0.0, operationGates=["documents.rename"])
    run_id = agent.start_run(entry_point)
    doc = agent.write(run_id, "createDocument", title="Plan", body="first draft")
    renamed = agent.rename(run_id, doc["entityId"], "Plan B")
    assert renamed["status"] == "AWAITING_APPROVAL" and renamed["releaseAt"] is None
    approved = operator.call("mutation($c: ID!) { approveEgress(commandId: $c) { status } }",
                             c=renamed["commandId"])
    assert approved["approveEgress"]["status"] == "PUBLISHED"
    wait_for("the approved rename to be applied",
             lambda: agent.command(renamed["commandId"])["result"] == "APPLIED")

    operator.call('mutation($r: ID!) { revertRun(runId: $r, reason: "undo the gated rename") { id } }',
                  r=run_id)
    assert _reverted(operator, run_id)["status"] == "REVERTED"
    wait_for("the gated rename to be compensated",
             lambda: agent.command(renamed["commandId"])["status"] == "COMPENSATED")
