"""Who a key is and the catalogue it sees are re-read once older than the TTL, so new services show up."""

from __future__ import annotations

from typing import Any

from kinshasa.client.operations import Operation
from kinshasa.mcp.server import Views


class Gateway:
    """Answers `me` and the catalogue as a gateway would, counting the reads; `operations` can grow."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.mutations = ["createDocument"]
        self.reads = 0

    async def query(self, document: str, variables: Any = None) -> dict[str, Any]:
        assert "me" in document
        return {"me": {"id": f"{self.kind}-1", "kind": self.kind}}

    async def operations(self, refresh: bool = False) -> list[Operation]:
        self.reads += 1
        return [Operation.from_graphql({"service": "s", "operation": f"s.{m}", "mutation": m,
                                        "inputSchema": "{}", "arguments": []}) for m in self.mutations]


async def test_the_catalogue_is_trusted_for_the_ttl_then_read_again() -> None:
    gateway = Gateway("agent")
    views = Views(ttl_s=3600)
    first = await views.get("key", gateway)  # type: ignore[arg-type]
    gateway.mutations.append("openTicket")
    assert (await views.get("key", gateway)) is first  # type: ignore[arg-type]
    fresh = await views.get("key", gateway, refresh=True)  # type: ignore[arg-type]
    assert [op.mutation for op in fresh.operations] == ["createDocument", "openTicket"]
    assert gateway.reads == 2


async def test_a_zero_ttl_reads_every_time_and_operators_never_read_the_catalogue() -> None:
    agent, operator = Gateway("agent"), Gateway("operator")
    views = Views(ttl_s=0)
    await views.get("a", agent)  # type: ignore[arg-type]
    await views.get("a", agent)  # type: ignore[arg-type]
    assert agent.reads == 2
    view = await views.get("o", operator)  # type: ignore[arg-type]
    assert view.role == "operator" and view.operations == [] and operator.reads == 0


async def test_views_are_kept_per_key_and_bounded() -> None:
    gateway = Gateway("agent")
    views = Views(ttl_s=3600, limit=2)
    for key in ("k1", "k2", "k3"):
        await views.get(key, gateway)  # type: ignore[arg-type]
    assert len(views._by_key) == 2
