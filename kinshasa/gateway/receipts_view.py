"""The operator's view of every receipt chain: the gateway's checked here, the others over admin HTTP.

`receipt_chain_report(component, ...)` answers the `receipts(component)` query: the gateway's own chain
is verified in-process on its database (`kinshasa.kernel.receipts.verify_chain`, with `gateway_sources`
checking that each receipt's command, run or alert is still in the gateway's store); any other
component's is verified by that component, which answers `GET /admin/receipts/verify`
(`kinshasa.kernel.admin_api`), because the gateway never reads another component's database. A component
that keeps no chain is reported as not verified, saying so, never as a valid chain of length 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import strawberry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway.alerts import GATEWAY_SOURCE
from kinshasa.gateway.errors import BackendUnavailable
from kinshasa.gateway.store import alerts, commands, runs
from kinshasa.kernel.receipts import ChainReport, NoChainError, Receipt, no_chain_message, verify_chain
from kinshasa.topics.catalogue import ALERTS, RUNS

if TYPE_CHECKING:
    from kinshasa.gateway.context import GatewayContext
    from kinshasa.gateway.reads import Backends

Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
_LOOKUP_CHUNK = 500


async def _present(conn: AsyncConnection, column: Any, wanted: set[str]) -> set[str]:
    found: set[str] = set()
    values = sorted(wanted)
    for start in range(0, len(values), _LOOKUP_CHUNK):
        rows = await conn.execute(select(column).where(column.in_(values[start:start + _LOOKUP_CHUNK])))
        found.update(str(row[0]) for row in rows)
    return found


async def gateway_sources(conn: AsyncConnection, receipts: Sequence[Receipt]) -> list[str]:
    """One problem per receipt whose source the gateway's store no longer holds.

    A command's receipt names its run and command id (`kinshasa.gateway.uow.receipt_source`): the
    command row must be there, in that run. A run fact names its run, an alert its alert row.
    """
    def parts(receipt: Receipt) -> tuple[str, str, str] | None:
        source = receipt.source
        return (str(source[0]), str(source[1]), str(source[2])) if len(source) == 3 else None

    sourced = [(r, p) for r in receipts if (p := parts(r)) is not None]
    command_rows: set[tuple[str, str]] = set()
    wanted_commands = {message_id for _, (kind, _, message_id) in sourced if kind == "command"}
    values = sorted(wanted_commands)
    for start in range(0, len(values), _LOOKUP_CHUNK):
        rows = await conn.execute(select(commands.c.command_id, commands.c.run_id).where(
            commands.c.command_id.in_(values[start:start + _LOOKUP_CHUNK])))
        command_rows.update((row.run_id, row.command_id) for row in rows)
    found_runs = await _present(conn, runs.c.run_id, {run for _, (kind, run, _) in sourced
                                                      if kind != "command" and run})
    found_alerts = await _present(conn, alerts.c.alert_id, {m for _, (kind, _, m) in sourced
                                                            if kind == ALERTS})
    problems = []
    for receipt in receipts:
        found = parts(receipt)
        if found is None:
            problems.append(f"missing source: receipt seq {receipt.seq} names no command, run or alert "
                            f"({list(receipt.source)}): it was not written by the gateway")
            continue
        kind, run_id, message_id = found
        if kind == "command" and (run_id, message_id) not in command_rows:
            problems.append(f"missing source: receipt seq {receipt.seq} records command {message_id} of "
                            f"run {run_id}, which the gateway's store does not hold")
        elif kind == ALERTS and message_id not in found_alerts:
            problems.append(f"missing source: receipt seq {receipt.seq} records alert {message_id}, "
                            "which the gateway's store does not hold")
        elif kind not in ("command", ALERTS) and run_id and run_id not in found_runs:
            what = "run fact" if kind == RUNS else f"{kind} message"
            problems.append(f"missing source: receipt seq {receipt.seq} records a {what} of run {run_id}, "
                            "which the gateway's store does not hold")
    return problems


async def local_report(component: str, connect: Connect) -> ChainReport:
    """The gateway's own chain, verified on its database; a database keeping none says so."""
    async with connect() as conn:
        try:
            return await verify_chain(conn, component, gateway_sources)
        except NoChainError as exc:
            return ChainReport(component=component, length=0, verified=False, problems=[str(exc)])
        finally:
            await conn.rollback()


def from_admin(component: str, body: Any) -> ChainReport:
    """A component's `GET /admin/receipts/verify` answer (None: it keeps no chain)."""
    if body is None:
        return ChainReport(component=component, length=0, verified=False,
                           problems=[no_chain_message(component)])
    problems = body.get("problems") if isinstance(body, dict) else None
    length, verified = (body.get("length"), body.get("verified")) if isinstance(body, dict) else (None, None)
    if (not isinstance(length, int) or isinstance(length, bool) or not isinstance(verified, bool)
            or not isinstance(problems, list) or not all(isinstance(p, str) for p in problems)):
        raise BackendUnavailable(f"{component} answered a receipt check this gateway cannot read: are the "
                                 f"gateway and {component} the same version?", backend=component)
    return ChainReport(component=component, length=length, verified=verified, problems=list(problems))


async def receipt_chain_report(component: str, *, connect: Connect, backends: Backends,
                               timeout_s: float | None = None) -> ChainReport:
    """One component's chain, verified: the gateway's here, any other by itself over its admin API.

    An unknown component is a VALIDATION error naming the known ones; one that does not answer is
    BACKEND_UNAVAILABLE naming it.
    """
    if component == GATEWAY_SOURCE:
        # Bounded like a backend's answer: a long chain must not hold the request past its deadline.
        try:
            async with asyncio.timeout(timeout_s):
                return await local_report(component, connect)
        except TimeoutError:
            return ChainReport(component=component, length=0, verified=False, problems=[
                f"not verified: the check did not finish within {timeout_s:.1f} s; run "
                "`kinshasa receipts verify -c gateway` to check the whole chain"])
    return from_admin(component, await backends.receipts(component, timeout_s))


@strawberry.type(description="One component's receipt chain as verified now: every emission it made leaves "
                             "a hash-chained receipt; `problems` names each missing, unchained or "
                             "altered receipt, each emission without a receipt and each receipt "
                             "without a source.")
class ReceiptChainReport:
    component: str
    length: int = strawberry.field(description="receipts in the chain")
    verified: bool = strawberry.field(
        description="true when the chain is intact and every emission and source is linked; false too "
                    "for a component that keeps no chain")
    problems: list[str] = strawberry.field(description="one line per problem; empty when verified")

    @classmethod
    def of(cls, report: ChainReport) -> ReceiptChainReport:
        return cls(component=report.component, length=report.length, verified=report.verified,
                   problems=list(report.problems))


async def receipt_chain_query(info: strawberry.Info, component: str) -> ReceiptChainReport:
    """Resolver of `receipts(component)` (operators only: schema.py attaches the permission)."""
    context: GatewayContext = info.context
    settings = context.services.settings
    remaining = settings.backend_deadline_s - (time.monotonic() - context.started)
    timeout_s = max(min(settings.http_timeout_s, remaining), 0.001)
    report = await receipt_chain_report(component.strip(), connect=context.reads.database,
                                        backends=context.services.backends, timeout_s=timeout_s)
    return ReceiptChainReport.of(report)
