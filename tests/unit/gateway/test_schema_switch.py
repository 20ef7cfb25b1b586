"""A schema swap never changes the schema under a request already running (GraphQLSwitch)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from kinshasa.gateway.app import GraphQLSwitch


class _Holder:
    """Stands in for the gateway: only the attributes the switch reads (no readers: every read is local)."""

    graphql_app: Any = None
    reads: Any = SimpleNamespace(readers=[])


def _app(name: str, started: asyncio.Event, release: asyncio.Event, served: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await release.wait()
        served.append(name)

    return app


async def test_a_request_in_flight_finishes_on_the_app_it_started_with() -> None:
    holder, served = _Holder(), []
    first_started, second_started, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    holder.graphql_app = _app("v1", first_started, release, served)

    async def elsewhere(scope: Any, receive: Any, send: Any) -> None:
        served.append("admin")

    switch = GraphQLSwitch(elsewhere, holder)  # type: ignore[arg-type]
    scope = {"type": "http", "path": "/graphql"}
    in_flight = asyncio.create_task(switch(scope, None, None))
    await first_started.wait()
    holder.graphql_app = _app("v2", second_started, release, served)  # the catalogue changed
    after = asyncio.create_task(switch(scope, None, None))
    await second_started.wait()
    release.set()
    await asyncio.gather(in_flight, after)
    await switch({"type": "http", "path": "/healthz"}, None, None)
    # v1 began serving the first request before the swap; only v2 could have started the second.
    assert sorted(served) == ["admin", "v1", "v2"]
