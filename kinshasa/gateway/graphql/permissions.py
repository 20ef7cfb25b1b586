"""Authorization of the GraphQL layer, checked here in one place: permission classes and run ownership."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.permission import BasePermission

from kinshasa.gateway import runs as runs_mod
from kinshasa.gateway.context import GatewayContext


def ctx(info: strawberry.Info) -> GatewayContext:
    context: GatewayContext = info.context
    return context


class IsAuthenticated(BasePermission):
    message = "authentication required: send 'Authorization: Bearer <key>'"

    def has_permission(self, source: Any, info: strawberry.Info, **kwargs: Any) -> bool:
        ctx(info).require_principal()
        return True


class IsAgent(BasePermission):
    message = "only agents may call this"

    def has_permission(self, source: Any, info: strawberry.Info, **kwargs: Any) -> bool:
        ctx(info).require_agent()
        return True


class IsOperator(BasePermission):
    message = "this is an operator action: agents cannot call it"

    def has_permission(self, source: Any, info: strawberry.Info, **kwargs: Any) -> bool:
        ctx(info).require_operator()
        return True


AUTHENTICATED: list[type[BasePermission]] = [IsAuthenticated]
AGENT: list[type[BasePermission]] = [IsAgent]
OPERATOR: list[type[BasePermission]] = [IsOperator]


async def visible_run(info: strawberry.Info, run_id: str) -> runs_mod.RunRecord:
    """The run `run_id`, if the caller may see it (operators: any; agents: their own)."""
    context = ctx(info)
    principal = context.require_principal()
    async with context.reads.database() as conn:
        run = await runs_mod.load_run(conn, run_id)
        await conn.rollback()
    runs_mod.check_owner(run, principal)
    return run
