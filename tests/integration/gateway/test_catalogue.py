"""The gateway grows its schema from kinshasa.catalogue, live: a new service, a compatible version and an
incompatible one, against a real gateway and a real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import MetaData

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.schemas.declaration import ServiceDeclaration
from kinshasa.services.kit import AppliedStep, CommandContext, Service
from kinshasa.settings import StackSettings
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import catalogue_topic_spec
from kinshasa.topics.declaration_feed import publish_declaration
from kinshasa.topics.producer import AsyncProducer
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, Client, registry


class OpenWidget(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "w"}]})
    name: str


class OpenWidgetWithColour(OpenWidget):
    colour: str | None = None


class OpenWidgetColourRequired(OpenWidget):
    colour: str


class PaintWidget(BaseModel):
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"widget_id": "w", "colour": "red"}]})
    widget_id: str
    colour: str


async def _forward(conn: Any, cmd: Any, ctx: CommandContext) -> dict[str, Any]:
    return {}


async def _undo(conn: Any, step: AppliedStep, ctx: CommandContext) -> None:
    return None


async def _read(conn: Any, entity_id: str) -> Any:
    return None


def widgets(version: int, open_payload: type[BaseModel], *, paint: bool = False) -> ServiceDeclaration:
    """The declaration a `widgets` service of this shape publishes."""
    service = Service("widgets", version=version, metadata=MetaData(), domain_tables=[])
    service.operation("open", payload=open_payload, mutation="openWidget", entity="widget",
                      inverse=_undo)(_forward)
    if paint:
        service.operation("paint", payload=PaintWidget, mutation="paintWidget", entity="widget",
                          entity_id_field="widget_id", inverse=_undo)(_forward)
    service.read_model("widget", current=_read, versions=_read)
    return service.declaration(read_url="http://127.0.0.1:9")


class Live:
    """A gateway following its own catalogue topic, and a way to publish on that topic."""

    def __init__(self, gateway: Gateway, client: Client, bootstrap: str, topic: str) -> None:
        self.gateway, self.client, self.bootstrap, self.topic = gateway, client, bootstrap, topic

    async def publish(self, declaration: ServiceDeclaration) -> None:
        async with AsyncProducer(self.bootstrap, client_id="test-catalogue") as producer:
            await publish_declaration(producer, declaration, self.topic)

    async def until(self, check: Callable[[], Any], within_s: float = 20.0) -> Any:
        deadline = time.monotonic() + within_s
        while True:
            found = await check()
            if found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.1)


async def _start(settings: GatewayConfig, stack: StackSettings) -> Gateway:
    gateway = Gateway(settings, stack, registry=registry())
    await gateway.start()
    return gateway


@pytest.fixture
async def live(kafka: Any, tmp_path: Path, unique: str) -> AsyncIterator[Live]:
    topic = f"kinshasa.catalogue.t{unique}"
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, [catalogue_topic_spec(name=topic)])
    settings = GatewayConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.sqlite3'}",
                             catalogue_topic=topic, background=False)
    gateway = await _start(settings, StackSettings(data_dir=tmp_path / "data",
                                                   kafka_bootstrap=kafka.bootstrap))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway",
                                     timeout=30) as http:
            yield Live(gateway, Client(http), kafka.bootstrap, topic)
    finally:
        await gateway.stop()


OPEN = 'mutation($r: ID!, $i: OpenWidgetInput!) { openWidget(runId: $r, input: $i) { commandId status } }'
PAINT = 'mutation($r: ID!) { paintWidget(runId: $r, widgetId: "w1", colour: "red") { commandId } }'


async def _mutation_exists(client: Client, name: str) -> bool:
    body = await client.gql("{ __schema { mutationType { fields { name } } } }", key=OPERATOR_KEY)
    if body.get("errors"):
        # Introspection off: ask for the field itself and read the validation error.
        probe = await client.gql(f"mutation {{ {name}(runId: \"r\") {{ commandId }} }}")
        return not any("Cannot query field" in e["message"] for e in probe.get("errors", []))
    return name in {f["name"] for f in body["data"]["__schema"]["mutationType"]["fields"]}


async def test_a_service_declared_later_appears_and_compatible_versions_go_live(live: Live) -> None:
    c = live.client
    assert not await _mutation_exists(c, "openWidget")
    await live.publish(widgets(1, OpenWidget))
    assert await live.until(lambda: _mutation_exists(c, "openWidget")), "openWidget never appeared"
    run_id = await c.start_run()
    accepted = await c.data(OPEN, {"r": run_id, "i": {"name": "first"}})
    assert accepted["openWidget"]["status"] in ("HELD", "PUBLISHED")
    unknown = await c.error(OPEN, {"r": run_id, "i": {"name": "x", "colour": "red"}})
    assert unknown["extensions"]["code"] == "VALIDATION"

    # Version 2 adds an optional field and an operation: live without a restart.
    await live.publish(widgets(2, OpenWidgetWithColour, paint=True))
    assert await live.until(lambda: _mutation_exists(c, "paintWidget")), "paintWidget never appeared"
    await c.data(OPEN, {"r": run_id, "i": {"name": "second", "colour": "red"}})
    await c.data(PAINT, {"r": run_id})
    assert live.gateway.book.declaration("widgets").version == 2  # type: ignore[union-attr]


async def test_an_incompatible_version_is_refused_with_an_alert_and_the_old_one_keeps_serving(
    live: Live, tmp_path: Path
) -> None:
    c = live.client
    await live.publish(widgets(1, OpenWidgetWithColour, paint=True))
    assert await live.until(lambda: _mutation_exists(c, "paintWidget"))
    # Version 2 makes `colour` required and drops paint: both would break agents calling version 1.
    await live.publish(widgets(2, OpenWidgetColourRequired))

    async def refused() -> list[dict[str, Any]]:
        found = await c.data('{ alerts(kind: "catalogue_incompatible") { summary details } }',
                             key=OPERATOR_KEY)
        return list(found["alerts"])

    alerts = await live.until(refused)
    assert len(alerts) == 1, alerts
    summary = alerts[0]["summary"]
    assert "widgets.paint was removed" in summary and "'colour' became required" in summary
    assert "version 1 keeps serving" in summary
    assert alerts[0]["details"]["version"] == 2
    # Version 1 still serves: paint exists and colour stays optional.
    run_id = await c.start_run()
    await c.data(PAINT, {"r": run_id})
    await c.data(OPEN, {"r": run_id, "i": {"name": "no colour"}})
    assert live.gateway.book.declaration("widgets").version == 1  # type: ignore[union-attr]

    # The same refused version again raises no second alert; a compatible version 3 goes live after it.
    await live.publish(widgets(2, OpenWidgetColourRequired))
    await live.publish(widgets(3, OpenWidgetWithColour, paint=True))
    assert await live.until(lambda: _version_is(live, 3))
    assert len(await refused()) == 1

    # A restart serves what was accepted, not what was published last.
    await live.publish(widgets(4, OpenWidgetColourRequired))
    assert await live.until(lambda: _alert_count(c, 2))
    settings, stack = live.gateway.settings, live.gateway.stack
    await live.gateway.stop()
    again = await _start(settings, stack)
    try:
        assert again.book.declaration("widgets").version == 3  # type: ignore[union-attr]
        assert "paintWidget" in str(again.schema)
    finally:
        await again.stop()
        live.gateway = await _start(settings, stack)  # the fixture stops this one


async def _version_is(live: Live, version: int) -> bool:
    found = live.gateway.book.declaration("widgets")
    return found is not None and found.version == version


async def _alert_count(c: Client, count: int) -> bool:
    found = await c.data('{ alerts(kind: "catalogue_incompatible") { id } }', key=OPERATOR_KEY)
    return len(found["alerts"]) >= count


async def test_a_declaration_that_does_not_parse_is_refused_with_an_alert(live: Live) -> None:
    async with AsyncProducer(live.bootstrap, client_id="test-catalogue") as producer:
        await producer.send(live.topic, b"widgets", b'{"service": "widgets", "version": 1, "operations": []}')
    await live.publish(widgets(1, OpenWidget))
    assert await live.until(lambda: _version_is(live, 1))
    alerts = (await live.client.data('{ alerts(kind: "catalogue_incompatible") { summary } }',
                                     key=OPERATOR_KEY))["alerts"]
    assert len(alerts) == 1 and "declares no operations" in alerts[0]["summary"]
    assert AGENT_KEY  # the agent sees the service once a valid declaration arrives


async def test_hostile_records_are_refused_and_the_gateway_keeps_following(live: Live) -> None:
    """Anyone can publish on the catalogue: nothing published there stops the gateway or takes its names."""
    from kinshasa.schemas.declaration import declaration_digest

    schema = {"type": "object", "additionalProperties": False, "properties": {"name": {"type": "string"}},
              "required": ["name"]}
    minimal = {"service": "gadgets", "version": 1, "operations": [{
        "name": "open", "mutation": "openGadget", "entity_type": "gadget", "payload_schema": schema,
        "inverse": {"name": "close"}}]}
    # The digest over the keys as published, the optional ones left out: what another language sends.
    minimal["digest"] = declaration_digest({k: minimal[k] for k in ("service", "version", "operations")})
    lookaround = {**schema, "properties": {"name": {"type": "string", "pattern": "^(?!admin)"}}}
    records = [
        b"[" * 100_000,
        json_bytes({**minimal, "service": "hijack", "digest": None,
                    "operations": [{**minimal["operations"][0], "mutation": "startRun"}]}),
        json_bytes({**minimal, "service": "regexes", "digest": None,
                    "operations": [{**minimal["operations"][0], "mutation": "openRegex",
                                    "payload_schema": lookaround}]}),
        json_bytes(minimal),
    ]
    async with AsyncProducer(live.bootstrap, client_id="test-catalogue") as producer:
        for key, value in zip((b"deep", b"hijack", b"regexes", b"gadgets"), records, strict=True):
            await producer.send(live.topic, key, value)
    assert await live.until(lambda: _version_is_of(live, "gadgets", 1)), "the valid record was never taken"
    c = live.client
    assert await _mutation_exists(c, "openGadget")
    assert "startRun(entryPoint" in str(live.gateway.schema)
    assert await live.until(lambda: _alert_count(c, 3))
    summaries = [a["summary"] for a in (await c.data('{ alerts(kind: "catalogue_incompatible") { summary } }',
                                                     key=OPERATOR_KEY))["alerts"]]
    assert any("startRun is one of the gateway's own" in s for s in summaries), summaries
    # What was accepted survives a restart, digest and all.
    settings, stack = live.gateway.settings, live.gateway.stack
    await live.gateway.stop()
    live.gateway = await _start(settings, stack)
    assert live.gateway.book.declaration("gadgets") is not None


def json_bytes(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


async def _version_is_of(live: Live, service: str, version: int) -> bool:
    found = live.gateway.book.declaration(service)
    return found is not None and found.version == version
