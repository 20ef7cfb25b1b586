"""What every mutation resolver shares: one transaction per write, and the test-only kill marker."""

from collections.abc import Callable
from typing import Any

import strawberry

from kinshasa.gateway.graphql.permissions import ctx
from kinshasa.gateway.uow import transaction


async def in_tx(info: strawberry.Info, work: Callable[[Any], Any]) -> Any:
    """`work(tx)` in one transaction, committed when it returns (and the relay woken)."""
    services = ctx(info).services
    async with transaction(services.engine, services.wake_relay) as tx:
        result = await work(tx)
        await tx.commit()
    return result


def kill_marker(info: strawberry.Info) -> str | None:
    """TEST ONLY: the idempotency key whose commit kills this process (idempotency.kill_after_commit...)."""
    return ctx(info).services.settings.test_kill_after_commit_key
