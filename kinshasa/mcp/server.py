"""The MCP server proper: which tools a caller sees, and each tool call served with the SDK.

Transport-neutral: `stdio.py` and `http.py` say how a request's key is found (`Caller`) and how a
client for that key is had (`ClientFor`). A refusal is never a protocol error: it is a tool result with
`isError` whose text starts with the gateway's error code and says what to do next (refusals.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from kinshasa.client.acknowledgements import Receipt
from kinshasa.client.client import Kinshasa
from kinshasa.client.errors import KinshasaError
from kinshasa.client.operations import RECEIPT_FIELDS, Operation, snake
from kinshasa.mcp.refusals import refusal_text
from kinshasa.mcp.settings import McpSettings
from kinshasa.mcp.tools import OPERATOR_TOOL_NAMES, Role, ToolSpec, tools_for

log = logging.getLogger(__name__)

ClientFor = Callable[[str], AbstractAsyncContextManager[Kinshasa]]

INSTRUCTIONS = (
    "Kinshasa governs every write you make. Start a run (start_run) for a task, pass its run_id to each "
    "write tool, and finish it (finish_run) when done. A write answers a receipt at once; the write may "
    "be held a while (quarantine) or wait for an operator (egress): poll get_command until APPLIED "
    "before reading the effect back. A refused call starts with its error code and says what to do next."
)


class BadArguments(Exception):
    """A tool call whose arguments cannot be sent: the VALIDATION refusal, naming each field."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in problems))


class Refused(Exception):
    """A refusal decided here (an operator tool for an agent key, an unknown tool): code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RunBinding:
    """A session's own run: started by its first write that names no run, finished when the session
    closes (stdio: the process exits; HTTP: the session is deleted, times out or the gateway stops)."""

    def __init__(self, entry_point: str, purpose: str, key: str) -> None:
        self.entry_point = entry_point
        self.purpose = purpose
        self.key = key
        self.run_id: str | None = None
        self._lock = anyio.Lock()

    async def run_for(self, client: Kinshasa) -> str:
        async with self._lock:
            if self.run_id is None:
                self.run_id = await client.start_run(self.entry_point, self.purpose)
                log.info("MCP session started its run %s at %s", self.run_id, self.entry_point)
            return self.run_id

    def forget(self, run_id: str) -> None:
        """The agent finished the bound run itself: a later write starts a new one."""
        if self.run_id == run_id:
            self.run_id = None

    async def close(self, clients: ClientFor) -> None:
        run_id, self.run_id = self.run_id, None
        if run_id is None:
            return
        try:
            async with clients(self.key) as client:
                await client.finish_run(run_id)
            log.info("MCP session closed: finished its run %s", run_id)
        except Exception as exc:
            # A tripped or reverted run stays as it is; the operator sees it in `runs` either way.
            log.warning("MCP session closed; its run %s was not finished: %s", run_id, exc)


@dataclass
class Caller:
    """Who is calling: the key every request of the call is sent with, and the session's run binding.

    `unbound` says why a write must name its run although run binding is configured (the caller has no
    session to bind one to); it becomes the VALIDATION refusal of a write without `run_id`.
    """

    key: str
    binding: RunBinding | None = None
    unbound: str | None = None


@dataclass
class View:
    role: Role
    principal_id: str
    operations: list[Operation]
    read_at: float


@dataclass
class Views:
    """Who each key belongs to and the catalogue it sees, re-read once older than `ttl_s`."""

    ttl_s: float
    limit: int = 1024
    _by_key: OrderedDict[str, View] = field(default_factory=OrderedDict)

    async def get(self, key: str, client: Kinshasa, *, refresh: bool = False) -> View:
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        found = self._by_key.get(digest)
        if found is not None and not refresh and now - found.read_at < self.ttl_s:
            return found
        me = (await client.query("query Me { me { id kind } }"))["me"]
        role: Role = "operator" if me.get("kind") == "operator" else "agent"
        # Operators do not write, so their tools do not depend on the catalogue.
        operations = await client.operations(refresh=True) if role == "agent" else []
        view = View(role, str(me.get("id")), operations, now)
        self._by_key[digest] = view
        self._by_key.move_to_end(digest)
        while len(self._by_key) > self.limit:
            self._by_key.popitem(last=False)
        return view


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    """A receipt in the gateway's own shape (camelCase, as `command(id)` answers it)."""
    names = RECEIPT_FIELDS.split()
    return {name: _plain(getattr(receipt, snake(name), None)) for name in names}


def ok(result: Any) -> types.CallToolResult:
    body = _plain(result)
    structured = body if isinstance(body, dict) else {"result": body}
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(body, indent=2, sort_keys=False))],
        structured_content=structured,
    )


def refused(code: str, message: str, extensions: Mapping[str, Any] | None = None) -> types.CallToolResult:
    details = {k: v for k, v in (extensions or {}).items() if k != "code"}
    return types.CallToolResult(
        content=[types.TextContent(text=refusal_text(code, message, details))],
        structured_content={"code": code, "message": message, "extensions": _plain(details)},
        is_error=True,
    )


def _text(args: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = args.get(name)
    if value is None or value == "":
        if required:
            raise BadArguments([(name, "required")])
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise BadArguments([(name, "must be a string")])
    return str(value)


def _limit(args: Mapping[str, Any], default: int, most: int = 200) -> int:
    value = args.get("limit", default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise BadArguments([("limit", f"must be a whole number from 1 to {most}")])
    return value


RUN_ACTION = "count run { id status }"
ALERT_FIELDS = ("id runId kind source createdAt summary agentId entryPoint servicesTouched held "
                "awaitingApproval")


class KinshasaMcp:
    """The tools of one gateway for any caller; `caller_of` reads the caller off a request's context."""

    def __init__(self, clients: ClientFor, settings: McpSettings,
                 caller_of: Callable[[ServerRequestContext[Any, Any]], Caller | None]) -> None:
        self.clients = clients
        self.settings = settings
        self.caller_of = caller_of
        self.views = Views(settings.catalogue_ttl_s)

    def server(self) -> Server[Any]:
        return Server("kinshasa", version=_version(), instructions=INSTRUCTIONS,
                      on_list_tools=self.list_tools, on_call_tool=self.call_tool)

    def _caller(self, ctx: ServerRequestContext[Any, Any]) -> Caller:
        caller = self.caller_of(ctx)
        if caller is None:
            text = refusal_text("UNAUTHENTICATED", "no key came with the request")
            raise MCPError(types.INVALID_REQUEST, text)
        return caller

    async def list_tools(self, ctx: ServerRequestContext[Any, Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        caller = self._caller(ctx)
        try:
            async with self.clients(caller.key) as client:
                view = await self.views.get(caller.key, client)
        except KinshasaError as exc:
            # Without knowing who the key is there is no tool list to give: say why, as the protocol error.
            raise MCPError(types.INTERNAL_ERROR, refusal_text(exc.code, exc.message, exc.extensions)) from exc
        return types.ListToolsResult(tools=[_tool(t) for t in self._tools(view, caller)])

    def _tools(self, view: View, caller: Caller) -> list[ToolSpec]:
        return tools_for(view.role, view.operations, bound=caller.binding is not None)

    async def call_tool(self, ctx: ServerRequestContext[Any, Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        caller = self._caller(ctx)
        args = dict(params.arguments or {})
        try:
            async with self.clients(caller.key) as client:
                spec = await self._find(params.name, caller, client)
                return ok(await self._serve(spec, args, caller, client))
        except KinshasaError as exc:
            return refused(exc.code, exc.message, exc.extensions)
        except Refused as exc:
            return refused(exc.code, exc.message)
        except BadArguments as exc:
            fields = [{"path": name, "message": problem} for name, problem in exc.problems]
            return refused("VALIDATION", f"invalid arguments for {params.name}: {exc}", {"fields": fields})
        except Exception:
            log.exception("MCP tool %s failed", params.name)
            return refused("INTERNAL", f"the MCP server failed while serving {params.name}")

    async def _find(self, name: str, caller: Caller, client: Kinshasa) -> ToolSpec:
        view = await self.views.get(caller.key, client)
        found = {t.name: t for t in self._tools(view, caller)}
        if name not in found and view.role == "agent" and name not in OPERATOR_TOOL_NAMES:
            # Perhaps a service registered since the catalogue was read: read it again, once.
            view = await self.views.get(caller.key, client, refresh=True)
            found = {t.name: t for t in self._tools(view, caller)}
        if name in found:
            return found[name]
        if name in OPERATOR_TOOL_NAMES:
            raise Refused("FORBIDDEN", f"{name} is an operator tool: key {view.principal_id} is an agent's")
        raise Refused("UNKNOWN_TOOL", f"no tool named {name!r} for {view.principal_id}")

    async def _serve(self, spec: ToolSpec, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        if spec.operation is not None:
            return await self._write(spec.operation, args, caller, client)
        handler = getattr(self, f"_tool_{spec.name}")
        return await handler(args, caller, client)

    async def _write(self, op: Operation, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        run_id = _text(args, "run_id", required=False)
        args.pop("run_id", None)
        if run_id is None:
            if caller.binding is None:
                problem = f"required, {caller.unbound}" if caller.unbound else "required"
                raise BadArguments([("run_id", problem)])
            run_id = await caller.binding.run_for(client)
        key = _text(args, "idempotency_key", required=False) if op.keyed else None
        if op.keyed:
            args.pop("idempotency_key", None)
        receipt = await client.call(run_id, op.mutation, args, idempotency_key=key)
        return receipt_json(receipt)

    # --- runs and reads ------------------------------------------------------------------------------

    async def _tool_start_run(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        entry_point = _text(args, "entry_point")
        assert entry_point is not None
        run_id = await client.start_run(entry_point, _text(args, "purpose", required=False))
        return {"runId": run_id, "entryPoint": entry_point}

    async def _tool_finish_run(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        run_id = _text(args, "run_id")
        assert run_id is not None
        run = await client.finish_run(run_id)
        if caller.binding is not None:
            caller.binding.forget(run_id)
        return run

    async def _tool_get_command(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        return receipt_json(await client.command(str(_text(args, "command_id"))))

    async def _tool_get_run(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        return await client.get_run(str(_text(args, "run_id")))

    async def _tool_get_entity(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        service, kind, entity_id = (str(_text(args, name)) for name in ("service", "type", "id"))
        state = await client.entity(service, kind, entity_id)
        if state is None:
            raise Refused("NOT_FOUND", f"{service} has no {kind} {entity_id}")
        return {"service": service, "type": kind, "id": entity_id, "state": state}

    # --- operator tools ------------------------------------------------------------------------------

    async def _tool_list_alerts(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            f"query Alerts($runId: ID, $kind: String, $first: Int!) {{ alerts(runId: $runId, kind: $kind, "
            f"first: $first) {{ {ALERT_FIELDS} }} }}",
            {"runId": _text(args, "run_id", required=False), "kind": _text(args, "kind", required=False),
             "first": _limit(args, 50)})
        return {"alerts": data["alerts"]}

    async def _tool_revert_run(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            "mutation Revert($runId: ID!, $reason: String!) { revertRun(runId: $runId, reason: $reason) "
            "{ id status revertReason } }",
            {"runId": _text(args, "run_id"), "reason": _text(args, "reason")})
        return data["revertRun"]

    async def _tool_release_run(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            f"mutation Release($runId: ID!) {{ releaseRun(runId: $runId) {{ {RUN_ACTION} }} }}",
            {"runId": _text(args, "run_id")})
        return data["releaseRun"]

    async def _tool_discard_run(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            f"mutation Discard($runId: ID!) {{ discardRun(runId: $runId) {{ {RUN_ACTION} }} }}",
            {"runId": _text(args, "run_id")})
        return data["discardRun"]

    async def _tool_approve_egress(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            f"mutation Approve($id: ID!) {{ approveEgress(commandId: $id) {{ {RECEIPT_FIELDS} }} }}",
            {"id": _text(args, "command_id")})
        return data["approveEgress"]

    async def _tool_deny_egress(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            f"mutation Deny($id: ID!, $reason: String!) {{ denyEgress(commandId: $id, reason: $reason) "
            f"{{ {RECEIPT_FIELDS} }} }}",
            {"id": _text(args, "command_id"), "reason": _text(args, "reason")})
        return data["denyEgress"]

    async def _tool_dlq_count(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query("query DlqCount { dlq(first: 1) { component count error } }")
        components = data["dlq"]
        return {"total": sum(c["count"] or 0 for c in components), "components": components}

    async def _tool_dlq_inspect(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            "query DlqInspect($first: Int!, $component: String!) { "
            "dlq(first: $first, component: $component) { component count entries error } }",
            {"first": _limit(args, 20), "component": _text(args, "component")})
        found: dict[str, Any] = data["dlq"][0]
        return found

    async def _tool_dlq_reprocess(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        ids = args.get("message_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise BadArguments([("message_ids", "a non-empty list of message ids from dlq_inspect")])
        data = await client.query(
            "mutation Reprocess($component: String!, $ids: [String!]!) { reprocessDlq(component: $component, "
            "messageIds: $ids) { component results count } }",
            {"component": _text(args, "component"), "ids": ids})
        return data["reprocessDlq"]

    async def _tool_outbox_status(self, args: dict[str, Any], caller: Caller, client: Kinshasa) -> Any:
        data = await client.query(
            "query OutboxStatus { outboxStatus { component pending oldestPendingAgeS dead dlqCount error } }")
        return {"components": data["outboxStatus"]}


def _tool(spec: ToolSpec) -> types.Tool:
    hints = types.ToolAnnotations(
        read_only_hint=spec.read_only,
        destructive_hint=False if spec.read_only else None,
        open_world_hint=bool(spec.operation.egress) if spec.operation is not None else False,
    )
    return types.Tool(name=spec.name, description=spec.description, input_schema=spec.input_schema,
                      annotations=hints)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kinshasa")
    except PackageNotFoundError:
        return "0"
