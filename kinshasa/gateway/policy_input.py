"""A policy layer as operators send it to setPolicy and backtestPolicy, checked before it is used.

The layer's document is validated by `policy.PolicyDocument`; what is checked here is what the document
cannot know alone: that a layer above DEFAULT names its subject, that the operations it names are in the
catalogue, and that agent budgets sit at a scope that bounds an agent.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

from pydantic import ValidationError

from kinshasa.gateway import policy as policy_mod
from kinshasa.gateway.arguments import check_length
from kinshasa.gateway.errors import Invalid, camel, invalid_from_pydantic


def check_layer(
    catalogue: Container[str], scope: Any, subject: str | None, settings: Mapping[str, Any]
) -> tuple[policy_mod.PolicyScope, str, policy_mod.PolicyDocument]:
    """(scope, subject, document) of one layer; `settings` holds every PolicyDocument field by name."""
    scope_value = policy_mod.PolicyScope(scope)
    if scope_value is not policy_mod.PolicyScope.DEFAULT and not (subject and subject.strip()):
        raise Invalid(
            f"scope {scope_value.value} needs a subject (the agent id or entry point)",
            [("subject", "required")],
        )
    check_length(subject, "subject")
    raw = {name: settings.get(name) for name in policy_mod.PolicyDocument.model_fields}
    if raw.get("operation_windows") is not None:
        unknown = (
            [op for op in raw["operation_windows"] if op not in catalogue]
            if isinstance(raw["operation_windows"], dict)
            else ["(not an object)"]
        )
        if unknown:
            raise Invalid(
                f"operationWindows names unknown operations: {', '.join(map(str, unknown))}",
                [("settings.operationWindows", "unknown operation")],
            )
    gates = [op for op in raw.get("operation_gates") or () if op not in catalogue]
    if gates:
        raise Invalid(
            f"operationGates names unknown operations: {', '.join(gates)}: name command types from "
            "the operations query",
            [("settings.operationGates", "unknown operation")],
        )
    try:
        document = policy_mod.PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc, "settings.") from exc
    misplaced = [(f"settings.{camel(name)}", problem) for name, problem in
                 policy_mod.scope_problems(scope_value, document)]
    if misplaced:
        raise Invalid(
            "agent budgets (maxConcurrentRuns, maxRunsPerHour, maxAgentWritesPerHour) bound an agent "
            "across all its runs: set them at scope DEFAULT or AGENT, not ENTRY_POINT",
            misplaced,
        )
    return scope_value, (subject or "").strip(), document
