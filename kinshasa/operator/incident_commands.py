"""`kinshasa incidents`, `incident`, `policy backtest` and `proposal accept|reject`, via the gateway.

Like `revert` and `runs`, these speak only the gateway's public GraphQL with an operator key.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import typer

from kinshasa.operator.gateway_client import GatewayError
from kinshasa.operator.options import GATEWAY_OPT, KEY_OPT, connect, echo_pages, fail
from kinshasa.schemas.clock import as_utc

app = typer.Typer(add_completion=False)
policy_app = typer.Typer(help="The breaker and quarantine policy: try a layer on the recorded runs.",
                         no_args_is_help=True, add_completion=False)
proposal_app = typer.Typer(help="Decide on a policy change an incident proposed.", no_args_is_help=True,
                           add_completion=False)
app.add_typer(policy_app, name="policy")
app.add_typer(proposal_app, name="proposal")

INCIDENT_FIELDS = """id kind runId agentId entryPoint policyVersion trigger { threshold count limit }
  writeIndexAtTrip escaped { operation count } held servicesTouched openedAt decidedAt decision"""
BACKTEST_FIELDS = """runsReplayed incidentRunsReplayed incidentRunsCaught incidentRunsCaughtEarlier
  escapedWritesBefore escapedWritesAfter goodRunsReplayed goodRunsTripped"""
PROPOSAL_FIELDS = f"""id scope subject rationale status reason policyVersion
  settings {{ maxWrites maxErrors maxServices maxVelocity operationWindows operationGates }}
  backtest {{ {BACKTEST_FIELDS} }}"""
INCIDENTS = f"""query($first: Int!, $after: String, $kind: IncidentKind) {{
  incidents(first: $first, after: $after, kind: $kind) {{ nodes {{ {INCIDENT_FIELDS} }}
    pageInfo {{ hasNextPage endCursor }} }} }}"""
INCIDENT = f"""query($id: ID!) {{ incident(id: $id) {{ {INCIDENT_FIELDS}
  proposals {{ {PROPOSAL_FIELDS} }} }} }}"""
BACKTEST = f"""query($scope: PolicyScope!, $subject: String, $settings: PolicyInput!, $since: DateTime!,
  $loosen: Boolean!) {{ backtestPolicy(scope: $scope, subject: $subject, settings: $settings, since: $since,
  loosen: $loosen) {{ {BACKTEST_FIELDS} }} }}"""
DECIDE = "mutation($id: ID!, $reason: String!) {{ {verb}(id: $id, reason: $reason) {{ {fields} }} }}"
INCIDENTS_HEADER = f"{'INCIDENT':<38} {'KIND':<14} {'OPENED (UTC)':<19} {'RUN':<38} WHAT"


def _when(value: Any) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")


def _trigger(incident: dict[str, Any]) -> str:
    t = incident.get("trigger")
    if not t:
        return ""
    if t.get("count") is None:
        return str(t["threshold"])
    return f"{t['threshold']} {t['count']:g} > {t['limit']:g}"


def incident_line(incident: dict[str, Any]) -> str:
    escaped = sum(e["count"] for e in incident.get("escaped") or [])
    what = _trigger(incident)
    if incident["kind"] == "TRIP":
        what += f" at write {incident['writeIndexAtTrip']}: {escaped} escaped, {incident['held']} held"
    elif escaped:
        what += f" {escaped} escaped"
    return (f"{incident['id']:<38} {incident['kind']:<14} {_when(incident['openedAt']):<19} "
            f"{incident.get('runId') or '-':<38} {what.strip()}")


def incident_detail(incident: dict[str, Any]) -> list[str]:
    lines = [
        f"incident {incident['id']}  ({incident['kind']})",
        f"  run {incident.get('runId') or '-'}  agent {incident.get('agentId') or '-'}  "
        f"entry point {incident.get('entryPoint') or '-'}  policy version {incident.get('policyVersion')}",
        f"  opened {_when(incident['openedAt'])}"
        + (f"  trigger {_trigger(incident)}" if incident.get("trigger") else ""),
    ]
    if incident["kind"] == "TRIP":
        lines.append(f"  tripped at write {incident['writeIndexAtTrip']}; held {incident['held']}")
    for e in incident.get("escaped") or []:
        lines.append(f"  escaped: {e['count']} x {e['operation']}")
    if incident.get("servicesTouched"):
        lines.append(f"  services touched: {', '.join(incident['servicesTouched'])}")
    if incident.get("decidedAt"):
        lines.append(f"  decided {_when(incident['decidedAt'])}: {incident.get('decision')}")
    proposals = incident.get("proposals") or []
    lines.append(f"  proposals ({len(proposals)}):")
    for p in proposals:
        changed = {k: v for k, v in (p.get("settings") or {}).items() if v is not None}
        b = p["backtest"]
        lines += [
            f"    {p['id']}  {p['status']}  {p['scope']} {p['subject'] or ''}  {json.dumps(changed)}",
            f"      {p['rationale']}",
            f"      backtest: {b['runsReplayed']} runs; incident runs {b['incidentRunsCaught']}/"
            f"{b['incidentRunsReplayed']} caught ({b['incidentRunsCaughtEarlier']} earlier), escaped "
            f"{b['escapedWritesBefore']} -> {b['escapedWritesAfter']}; good runs tripped "
            f"{b['goodRunsTripped']}/{b['goodRunsReplayed']}",
        ]
        if p.get("reason"):
            lines.append(f"      decided: {p['reason']}")
    return lines


@app.command("incidents")
def incidents(
    kind: str | None = typer.Option(None, "--kind", help="TRIP, REVERT, REVERT_FAILED, AGENT_BUDGET, "
                                    "EGRESS_DENIED or DEAD_LETTER"),
    limit: int = typer.Option(50, "--limit", min=1, max=1000),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """List incidents newest first: trips, reverts, budget breaches, denied egress, dead letters."""
    try:
        client = connect(gateway, key)
        typer.echo(INCIDENTS_HEADER)
        echo_pages(client, INCIDENTS, {"kind": kind.upper() if kind else None}, "incidents", limit,
                   incident_line)
    except GatewayError as exc:
        fail(exc)


@app.command("incident")
def incident(
    incident_id: str = typer.Argument(..., help="The incident id."),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """One incident with the policy changes it proposes, each with its backtest."""
    try:
        found = asyncio.run(connect(gateway, key).call(INCIDENT, {"id": incident_id}))["incident"]
    except GatewayError as exc:
        fail(exc)
    for line in incident_detail(found):
        typer.echo(line)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`--set maxVelocity=6 --set operationWindows='{"orders.cancel": 60}'`: values read as JSON when they
    parse, as text otherwise."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise GatewayError(f"--set {pair!r}: write it as field=value, e.g. --set maxVelocity=6")
        try:
            settings[name.strip()] = json.loads(raw)
        except ValueError:
            settings[name.strip()] = raw
    if not settings:
        raise GatewayError("say what to try: --set field=value (repeatable), e.g. --set maxVelocity=6")
    return settings


@policy_app.command("backtest")
def backtest(
    scope: str = typer.Option("DEFAULT", "--scope", help="DEFAULT, AGENT or ENTRY_POINT"),
    subject: str | None = typer.Option(None, "--subject", help="the agent id or entry point of the layer"),
    setting: list[str] = typer.Option([], "--set", help="field=value of the candidate layer (repeatable)"),
    since: datetime = typer.Option(..., "--since", help="replay the runs started since (UTC)"),
    loosen: bool = typer.Option(False, "--loosen",
                                help="the layer replaces the ones below (setPolicy's loosen)"),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """Replay the recorded runs under a candidate layer: what it would have caught, whom it would stop."""
    try:
        variables = {"scope": scope.upper(), "subject": subject, "settings": parse_settings(setting),
                     "since": as_utc(since).isoformat(), "loosen": loosen}
        b = asyncio.run(connect(gateway, key).call(BACKTEST, variables))["backtestPolicy"]
    except GatewayError as exc:
        fail(exc)
    typer.echo(f"runs replayed:           {b['runsReplayed']}")
    typer.echo(f"incident runs caught:    {b['incidentRunsCaught']} of {b['incidentRunsReplayed']} "
               f"({b['incidentRunsCaughtEarlier']} earlier)")
    typer.echo(f"escaped writes:          {b['escapedWritesBefore']} -> {b['escapedWritesAfter']}")
    typer.echo(f"good runs tripped:       {b['goodRunsTripped']} of {b['goodRunsReplayed']}")


def _decide(verb: str, proposal_id: str, reason: str, gateway: str | None, key: str | None) -> None:
    query = DECIDE.format(verb=verb, fields="id status policyVersion rationale")
    try:
        p = asyncio.run(connect(gateway, key).call(query, {"id": proposal_id, "reason": reason}))[verb]
    except GatewayError as exc:
        fail(exc)
    version = f": policy version {p['policyVersion']}" if p.get("policyVersion") else ""
    typer.echo(f"proposal {p['id']} {p['status']}{version}")


@proposal_app.command("accept")
def accept(
    proposal_id: str = typer.Argument(..., help="The proposal id (kinshasa incident ID lists them)."),
    reason: str = typer.Option(..., "--reason", help="why you accept it (kept with the policy version)"),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """Accept a proposal: its policy version is appended, linked to the incident."""
    _decide("acceptProposal", proposal_id, reason, gateway, key)


@proposal_app.command("reject")
def reject(
    proposal_id: str = typer.Argument(..., help="The proposal id."),
    reason: str = typer.Option(..., "--reason", help="why you reject it"),
    gateway: str | None = GATEWAY_OPT,
    key: str | None = KEY_OPT,
) -> None:
    """Reject a proposal, saying why."""
    _decide("rejectProposal", proposal_id, reason, gateway, key)
