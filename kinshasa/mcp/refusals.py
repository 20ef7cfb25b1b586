"""A refused call as an MCP tool error: the gateway's error code first, then what to do next."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# One sentence per gateway error code: what the agent (or operator) should do now. The text an agent
# reads starts with the code, so a model or a script can branch on it.
NEXT_STEP: dict[str, str] = {
    "UNAUTHENTICATED": "the key was not accepted; configure a key the gateway knows (KINSHASA_KEY or "
    "--key-file for `kinshasa mcp`, a Bearer token for /mcp)",
    "FORBIDDEN": "this key may not do that; use the tools this server lists for you, or ask an operator "
    "to grant the scope",
    "VALIDATION": "fix the arguments named below and call again",
    "RUN_NOT_FOUND": "start a run with start_run and pass its run_id",
    "RUN_CLOSED": "this run is closed to writes; start a new run with start_run if the task goes on",
    "BREAKER_OPEN": "stop writing in this run; an operator has been alerted",
    "NOT_FOUND": "check the id; nothing by that id is visible to this key",
    "BACKEND_UNAVAILABLE": "a component behind the gateway did not answer; retry in a little while",
    "QUERY_TOO_COSTLY": "ask for less (a smaller limit) and call again",
    "RATE_LIMITED": "slow down: wait the retry-after below, then call again",
    "AGENT_BUDGET_EXCEEDED": "you are over one of your agent budgets; wait the retry-after below or ask "
    "an operator to raise the budget",
    "INTERNAL": "nothing was applied; retry once, and report it if it happens again",
    # The SDK's own codes: failures before or after the gateway answered.
    "UNREACHABLE": "the gateway did not answer; check that the stack is running, then retry (a write "
    "retried with the same idempotency_key cannot happen twice)",
    "BAD_RESPONSE": "something other than the gateway answered; check the gateway URL",
    "UNKNOWN_OPERATION": "this operation is no longer in the catalogue; list the tools again",
    "REJECTED": "the service refused the write on its own state; read the reason and change the request",
    # This server's own refusal: a tool name it does not serve.
    "UNKNOWN_TOOL": "list the tools again and call one of those",
}
OTHER = "read the message below before calling again"


def refusal_text(code: str, message: str, extensions: Mapping[str, Any] | None = None) -> str:
    """`CODE: next step.` and the gateway's own words, with the details an agent can act on."""
    lines = [f"{code}: {NEXT_STEP.get(code, OTHER)}.", message.strip()]
    details = dict(extensions or {})
    for field_error in details.get("fields") or []:
        if isinstance(field_error, Mapping):
            lines.append(f"- {field_error.get('path')}: {field_error.get('message')}")
    retry = details.get("retryAfterS", details.get("retry_after"))
    if isinstance(retry, int | float) and not isinstance(retry, bool):
        lines.append(f"Retry after {retry:g} s.")
    breaker = details.get("breaker")
    if isinstance(breaker, Mapping) and breaker.get("trippedReason"):
        lines.append(f"Breaker: {breaker['trippedReason']}.")
    return "\n".join(line for line in lines if line)
