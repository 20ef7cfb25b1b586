"""The operator's client of the gateway: GraphQL calls with an operator key, run selection, progress and the
readable run lines. It talks to the gateway's public GraphQL alone, never to a component directly."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from kinshasa.schemas.rate_limits import rate_limited_wait
from kinshasa.schemas.run_selection import MAX_SELECTED, RunSelection, SelectionError
from kinshasa.schemas.run_status import REVERT_SETTLED, RunStatus

RUN_FIELDS = """id agentId entryPoint purpose status startedAt finishedAt revertReason revertRequestedAt
  counts { held awaitingApproval published applied rejected compensated discarded }"""
REVERT_RUNS = f"""mutation($selector: RunSelector!, $reason: String!) {{
  revertRuns(selector: $selector, reason: $reason) {{
    requested {{ {RUN_FIELDS} }}
    unchanged {{ {RUN_FIELDS} }}
  }}
}}"""
RUNS = f"""query($filter: RunFilter, $first: Int!, $after: String) {{
  runs(filter: $filter, first: $first, after: $after) {{
    nodes {{ {RUN_FIELDS} }}
    pageInfo {{ hasNextPage endCursor }}
  }}
}}"""
STEP_FIELDS = """nodes { stepId forwardType operation entityKey appliedAt status attempts failureReason }
      pageInfo { hasNextPage endCursor }"""
RUN = f"""query($id: ID!, $first: Int!) {{
  run(id: $id) {{
    {RUN_FIELDS}
    breaker {{ state writes errors servicesTouched velocity trippedReason trippedAt }}
    steps(first: $first) {{ {STEP_FIELDS} }}
  }}
}}"""
RUN_STEPS = f"""query($id: ID!, $first: Int!, $after: String) {{
  run(id: $id) {{ steps(first: $first, after: $after) {{ {STEP_FIELDS} }} }}
}}"""
# The most steps the gateway gives in one page.
STEPS_PAGE = 200
RUN_PROGRESS = f"""query($id: ID!) {{ run(id: $id) {{ {RUN_FIELDS} }} }}"""


# A RATE_LIMITED answer (the operator's bucket is shared with its console pages and scripts) is refused
# before anything ran, so it is waited out and sent again, up to this many tries, each wait at most
# RATE_LIMITED_MAX_WAIT_S; past either the refusal is raised.
RATE_LIMITED_ATTEMPTS = 8
RATE_LIMITED_MAX_WAIT_S = 30.0


class GatewayError(RuntimeError):
    """The gateway refused or failed a request; `code` is its `extensions.code` when it gave one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def operator_key(explicit: str | None, data_dir: Path) -> str:
    """The key given, else the first operator key in the dev stack's `<data_dir>/credentials.json`."""
    if explicit:
        return explicit
    path = data_dir / "credentials.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GatewayError(f"no operator key: pass --key (or KINSHASA_OPERATOR_KEY); the dev stack's "
                           f"{path} could not be read ({exc})") from exc
    for principal in document.get("principals", []):
        if principal.get("kind") == "operator" and isinstance(principal.get("key"), str):
            return str(principal["key"])
    raise GatewayError(f"no operator key in {path}: pass --key with an operator's key")


@dataclass
class GatewayClient:
    """A thin GraphQL client: one POST per call, errors raised with the gateway's code and message.

    A field error under data that did come back (the coordinator down, so a run's `steps` is null) is
    not fatal: the data is returned and the messages are kept in `warnings`.
    """

    url: str
    key: str
    timeout_s: float = 30.0
    transport: httpx.AsyncBaseTransport | None = None
    warnings: list[str] = field(default_factory=list)

    async def call(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport) as http:
            for attempt in range(1, RATE_LIMITED_ATTEMPTS + 1):
                response, body = await self._post(http, query, variables)
                wait = rate_limited_wait(body, RATE_LIMITED_MAX_WAIT_S)
                if wait is None or attempt == RATE_LIMITED_ATTEMPTS:
                    break
                await asyncio.sleep(wait)
        errors = body.get("errors") or []
        data = body.get("data")
        if errors and (data is None or not all(e.get("path") for e in errors)):
            first = errors[0]
            code = (first.get("extensions") or {}).get("code")
            raise GatewayError(f"{code or 'ERROR'}: {first.get('message')}", code)
        if response.status_code >= 400 or data is None:
            raise GatewayError(f"the gateway answered {response.status_code}: {str(body)[:300]}")
        self.warnings.extend(f"{'.'.join(map(str, e.get('path', [])))}: {e.get('message')}" for e in errors)
        result: dict[str, Any] = data
        return result

    async def _post(self, http: httpx.AsyncClient, query: str,
                    variables: dict[str, Any]) -> tuple[httpx.Response, dict[str, Any]]:
        try:
            response = await http.post(self.url, json={"query": query, "variables": variables},
                                       headers={"Authorization": f"Bearer {self.key}"})
        except httpx.HTTPError as exc:
            raise GatewayError(f"the gateway at {self.url} did not answer ({type(exc).__name__}): is the "
                               "stack running (`kinshasa up`)? is --gateway right?") from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise GatewayError(f"the gateway answered {response.status_code} without JSON") from exc
        if not isinstance(body, dict):
            raise GatewayError(f"the gateway answered {response.status_code}: {str(body)[:300]}")
        return response, body

    async def revert_runs(self, selector: dict[str, Any], reason: str) -> dict[str, Any]:
        """The operator's one way to revert (`revertRuns`): a single run is a selection of one id."""
        data = await self.call(REVERT_RUNS, {"selector": selector, "reason": reason})
        result: dict[str, Any] = data["revertRuns"]
        return result

    async def pages(self, query: str, variables: dict[str, Any], field: str,
                    limit: int) -> AsyncIterator[list[dict[str, Any]]]:
        """The nodes of a paged connection (`first`/`after`), a page at a time, until `limit` nodes."""
        shown, after = 0, None
        while shown < limit:
            paging = {"first": min(100, limit - shown), "after": after}
            page = (await self.call(query, {**variables, **paging}))[field]
            yield page["nodes"]
            shown += len(page["nodes"])
            if not page["pageInfo"]["hasNextPage"] or not page["nodes"]:
                return
            after = page["pageInfo"]["endCursor"]

    async def runs(self, filter: dict[str, Any], first: int, after: str | None = None) -> dict[str, Any]:
        data = await self.call(RUNS, {"filter": filter, "first": first, "after": after})
        result: dict[str, Any] = data["runs"]
        return result

    async def run(self, run_id: str, steps: int = 50) -> dict[str, Any]:
        """The run with its newest `steps` steps, fetched a page at a time (`steps` stays null if the
        coordinator cannot be reached)."""
        result: dict[str, Any] = (
            await self.call(RUN, {"id": run_id, "first": min(steps, STEPS_PAGE)}))["run"]
        page = result.get("steps")
        while page is not None and page["pageInfo"]["hasNextPage"] and len(page["nodes"]) < steps:
            variables = {"id": run_id, "first": min(steps - len(page["nodes"]), STEPS_PAGE),
                         "after": page["pageInfo"]["endCursor"]}
            more = (await self.call(RUN_STEPS, variables))["run"]["steps"]
            if more is None:
                break
            page = {"nodes": page["nodes"] + more["nodes"], "pageInfo": more["pageInfo"]}
        result["steps"] = page
        return result

    async def run_progress(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = (await self.call(RUN_PROGRESS, {"id": run_id}))["run"]
        return result


def selection(run_ids: Sequence[str], agent: str | None, entry_point: str | None, since: datetime | None,
              until: datetime | None) -> RunSelection:
    """The runs the CLI's options name, checked by the same rule the gateway applies (times without a
    zone are UTC); at least one criterion is required."""
    try:
        return RunSelection(run_ids=tuple(run_ids) or None, agent_id=agent, entry_point=entry_point,
                            started_after=since, started_before=until).checked()
    except SelectionError as exc:
        # The gateway's rule, in the words of the CLI's options.
        words = {"empty": "say which runs: --run ID (repeatable), --agent, --entry-point, --since, --until",
                 "after the end": "--since must be before --until",
                 "too many": f"at most {MAX_SELECTED} --run ids per revert: revert them in parts"}
        raise GatewayError(words.get(exc.reason, str(exc))) from exc


def selector(run_ids: Sequence[str], agent: str | None, entry_point: str | None, since: datetime | None,
             until: datetime | None) -> dict[str, Any]:
    """The GraphQL RunSelector for the CLI's options."""
    return selection(run_ids, agent, entry_point, since, until).to_graphql()


@dataclass(frozen=True)
class Progress:
    """Where a set of reverts stands: runs settled, and compensations done of the steps applied."""

    runs: int
    settled: int
    failed: int
    applied: int
    compensated: int


async def watch(client: GatewayClient, run_ids: Sequence[str], on_progress: Callable[[Progress], None], *,
                interval_s: float = 1.0, timeout_s: float = 3600.0,
                concurrency: int = 8) -> dict[str, dict[str, Any]]:
    """Poll the runs until each is REVERTED or REVERT_FAILED (or the timeout); returns their last state."""
    latest: dict[str, dict[str, Any]] = {}
    gate = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + timeout_s

    async def one(run_id: str) -> None:
        async with gate:
            latest[run_id] = await client.run_progress(run_id)

    def settled(run_id: str) -> bool:
        return latest.get(run_id, {}).get("status") in REVERT_SETTLED

    while True:
        await asyncio.gather(*(one(r) for r in run_ids if not settled(r)))
        states = [latest[r] for r in run_ids if r in latest]
        on_progress(Progress(
            runs=len(run_ids), settled=sum(1 for s in states if s["status"] in REVERT_SETTLED),
            failed=sum(1 for s in states if s["status"] == RunStatus.REVERT_FAILED),
            applied=sum(int(s["counts"]["applied"]) for s in states),
            compensated=sum(int(s["counts"]["compensated"]) for s in states)))
        if all(settled(r) for r in run_ids) or time.monotonic() > deadline:
            return latest
        await asyncio.sleep(interval_s)


def _when(value: Any) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(value)


def run_line(run: dict[str, Any]) -> str:
    c = run.get("counts") or {}
    return (f"{run['id']:<38} {run.get('status', '?'):<13} {str(run.get('agentId', '-'))[:20]:<20} "
            f"{str(run.get('entryPoint', '-'))[:16]:<16} {_when(run.get('startedAt')):<19} "
            f"pub {c.get('published', 0):>5}  app {c.get('applied', 0):>5}  "
            f"comp {c.get('compensated', 0):>5}")


RUNS_HEADER = (f"{'RUN':<38} {'STATUS':<13} {'AGENT':<20} {'ENTRY POINT':<16} {'STARTED (UTC)':<19} "
               "COUNTS")


def timeline(run: dict[str, Any]) -> list[str]:
    """A run as an operator reads it: who, what state, what it touched, and its steps newest first."""
    c = run.get("counts") or {}
    b = run.get("breaker") or {}
    lines = [
        f"run {run['id']}  ({run.get('status')})",
        f"  agent {run.get('agentId')}  entry point {run.get('entryPoint')}"
        + (f"  purpose: {run['purpose']}" if run.get("purpose") else ""),
        f"  started {_when(run.get('startedAt'))}  finished {_when(run.get('finishedAt'))}",
        f"  breaker {b.get('state', '-')}: {b.get('writes', 0)} writes, {b.get('errors', 0)} errors, "
        f"services {', '.join(b.get('servicesTouched') or []) or '-'}"
        + (f"; tripped: {b['trippedReason']}" if b.get("trippedReason") else ""),
        f"  commands: {c.get('published', 0)} published, {c.get('held', 0)} held, "
        f"{c.get('awaitingApproval', 0)} awaiting approval, {c.get('discarded', 0)} discarded, "
        f"{c.get('rejected', 0)} rejected",
        f"  ledger: {c.get('applied', 0)} applied, {c.get('compensated', 0)} compensated",
    ]
    if run.get("revertReason"):
        lines.append(f"  revert requested {_when(run.get('revertRequestedAt'))}: {run['revertReason']}")
    page = run.get("steps")
    if page is None:
        lines.append("  steps: the coordinator's ledger could not be reached")
        return lines
    steps = page.get("nodes") or []
    more = (page.get("pageInfo") or {}).get("hasNextPage")
    lines.append(f"  steps, newest first ({len(steps)} shown{', older ones not' if more else ''}):")
    mark = {"COMPENSATED": "undone", "IRREVERSIBLE": "IRREVERSIBLE (egress)",
            "COMPENSATION_FAILED": "REFUSED", "COMPENSATING": "undoing", "APPLIED": "applied"}
    for step in steps:
        status = str(step.get("status"))
        line = (f"    #{step.get('stepId'):<6} {_when(step.get('appliedAt'))}  "
                f"{step.get('forwardType', ''):<36} {step.get('entityKey', ''):<48} "
                f"{mark.get(status, status)}")
        if step.get("failureReason") and status != "COMPENSATED":
            line += f"  ({step['failureReason']})"
        lines.append(line)
    return lines
