"""The tickets service run in-process on a real broker: it keeps the service contract, and undoing a run
restores every state the run passed through."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from kinshasa.conformance import run_conformance
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, new_id, parse_envelope, utcnow
from kinshasa.services.kit.runtime import ServiceRuntime
from kinshasa.testing import running_service
from kinshasa.topics.producer import AsyncProducer, envelope_message

from tickets.service import tickets

ANSWER_TIMEOUT_S = 30.0
AGENT = Actor(kind="agent", id="support-bot")
COORDINATOR = Actor(kind="system", id="coordinator")
# What a compensation must restore; the rest of a state is provenance (who wrote it, when).
DOMAIN_FIELDS = ("title", "body", "priority", "status", "assignee", "resolution")


def unique_suffix() -> str:
    # A topic suffix must start with a letter, like a service name.
    return f"t{uuid.uuid4().hex[:10]}"


async def test_tickets_passes_the_conformance_kit(kinshasa_kafka: KafkaBroker, tmp_path: Path) -> None:
    suffix = unique_suffix()
    async with running_service(tickets, kinshasa_kafka.bootstrap, tmp_path, suffix):
        report = await run_conformance("tickets", kinshasa_kafka.bootstrap,
                                       catalogue_topic=f"kinshasa.catalogue.{suffix}", topic_suffix=suffix)
    assert report.ok, report.render()


class Wire:
    """Commands to a running tickets service over its own topics, its answers, and its read API."""

    def __init__(self, runtime: ServiceRuntime, producer: AsyncProducer, http: httpx.AsyncClient) -> None:
        self.runtime = runtime
        self.producer = producer
        self.http = http
        self.run_id = f"run-{uuid.uuid4()}"
        self._answers: dict[uuid.UUID, Envelope] = {}
        self._consumer = Consumer({"bootstrap.servers": runtime.stack.kafka_bootstrap,
                                   "group.id": f"tickets-tests-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False})
        # The events topic is this test's alone (a unique suffix), so everything on it is ours.
        topic = runtime.topics.events
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def close(self) -> None:
        self._consumer.close()

    def forward(self, operation: str, ticket_id: str, payload: dict[str, Any]) -> Envelope:
        """A forward command as the gateway publishes it."""
        return Envelope(message_id=new_id(), type=f"tickets.{operation}", run_id=self.run_id, actor=AGENT,
                        correlation_id=self.run_id, occurred_at=utcnow(), payload=payload,
                        entity=EntityRef(service="tickets", type="ticket", id=ticket_id))

    def compensate(self, applied: Envelope) -> Envelope:
        """The coordinator's compensate command for an applied step."""
        return Envelope(message_id=new_id(), type=f"{applied.type.removesuffix('.applied')}.compensate",
                        run_id=self.run_id, actor=COORDINATOR, correlation_id=self.run_id,
                        entity=applied.entity, occurred_at=utcnow(),
                        payload={"forward_event_id": str(applied.message_id), "forward_type": applied.type})

    async def exchange(self, command: Envelope, expected: str) -> Envelope:
        """Send `command` and return its answer, which must be of type `<command type>.<expected>`."""
        await self.producer.send_batch([envelope_message(self.runtime.topics.commands, command)])
        answer = await asyncio.to_thread(self._answer, command.message_id)
        wanted = f"{command.type.removesuffix('.compensate')}.{expected}"
        assert answer.type == wanted, f"{command.type} answered {answer.type}: {answer.payload}"
        return answer

    def _answer(self, command_id: uuid.UUID) -> Envelope:
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while command_id not in self._answers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to command {command_id} within {ANSWER_TIMEOUT_S:g}s")
            msg = self._consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            event = parse_envelope(msg.value() or b"")
            if event.causation_id is not None:
                self._answers.setdefault(event.causation_id, event)
        return self._answers[command_id]

    async def state(self, ticket_id: str) -> dict[str, Any] | None:
        """The ticket's domain fields as the read API answers them, None on 404."""
        response = await self.http.get(f"/entities/ticket/{ticket_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body = response.json()
        return {field: body[field] for field in DOMAIN_FIELDS}

    async def history(self, ticket_id: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"/entities/ticket/{ticket_id}/versions")
        response.raise_for_status()
        return list(response.json()["versions"])


@asynccontextmanager
async def wired(kafka: KafkaBroker, tmp_path: Path) -> AsyncIterator[Wire]:
    async with running_service(tickets, kafka.bootstrap, tmp_path, unique_suffix()) as runtime, \
            AsyncProducer(kafka.bootstrap, client_id="tickets-tests") as producer, \
            httpx.AsyncClient(base_url=str(runtime.admin_url)) as http:
        wire = Wire(runtime, producer, http)
        try:
            yield wire
        finally:
            wire.close()


async def test_open_assign_close_then_their_compensations_restore_each_state(
        kinshasa_kafka: KafkaBroker, tmp_path: Path) -> None:
    async with wired(kinshasa_kafka, tmp_path) as wire:
        ticket_id = str(uuid.uuid4())
        opened = await wire.exchange(wire.forward("open", ticket_id, {"title": "Printer on fire"}), "applied")
        after_open = await wire.state(ticket_id)
        assert after_open == {"title": "Printer on fire", "body": "", "priority": "normal", "status": "open",
                              "assignee": None, "resolution": None}
        assigned = await wire.exchange(
            wire.forward("assign", ticket_id, {"ticket_id": ticket_id, "assignee": "alice"}), "applied")
        after_assign = await wire.state(ticket_id)
        assert after_assign == {**after_open, "assignee": "alice"}
        closed = await wire.exchange(
            wire.forward("close", ticket_id, {"ticket_id": ticket_id, "resolution": "New fuser."}), "applied")
        assert await wire.state(ticket_id) == {**after_assign, "status": "closed", "resolution": "New fuser."}

        # Undone newest first, as the coordinator reverts a run.
        await wire.exchange(wire.compensate(closed), "compensated")
        assert await wire.state(ticket_id) == after_assign
        await wire.exchange(wire.compensate(assigned), "compensated")
        assert await wire.state(ticket_id) == after_open
        await wire.exchange(wire.compensate(opened), "compensated")
        assert await wire.state(ticket_id) is None

        history = await wire.history(ticket_id)
        assert [(v["status"], v["assignee"], v["operation"]) for v in history] == [
            ("open", None, "tickets.open"),
            ("open", "alice", "tickets.assign"),
            ("closed", "alice", "tickets.close"),
            ("open", "alice", "tickets.close.compensate"),
            ("open", None, "tickets.assign.compensate"),
            ("withdrawn", None, "tickets.open.compensate"),
        ]


async def test_an_older_assignment_is_not_undone_over_a_newer_one(
        kinshasa_kafka: KafkaBroker, tmp_path: Path) -> None:
    async with wired(kinshasa_kafka, tmp_path) as wire:
        ticket_id = str(uuid.uuid4())
        opened = await wire.exchange(wire.forward("open", ticket_id, {"title": "VPN down"}), "applied")
        to_alice = await wire.exchange(
            wire.forward("assign", ticket_id, {"ticket_id": ticket_id, "assignee": "alice"}), "applied")
        await wire.exchange(wire.forward("assign", ticket_id, {"ticket_id": ticket_id, "assignee": "bob"}),
                            "applied")

        refused = await wire.exchange(wire.compensate(to_alice), "compensation_failed")
        assert "'bob'" in refused.payload["reason"]
        refused = await wire.exchange(wire.compensate(opened), "compensation_failed")
        assert "assignee" in refused.payload["reason"]
        state = await wire.state(ticket_id)
        assert state is not None and state["assignee"] == "bob"


async def test_a_closed_ticket_refuses_an_assignment_with_ticket_closed(
        kinshasa_kafka: KafkaBroker, tmp_path: Path) -> None:
    async with wired(kinshasa_kafka, tmp_path) as wire:
        ticket_id = str(uuid.uuid4())
        await wire.exchange(wire.forward("open", ticket_id, {"title": "Monitor flickers"}), "applied")
        await wire.exchange(
            wire.forward("close", ticket_id, {"ticket_id": ticket_id, "resolution": "Cable."}), "applied")
        rejected = await wire.exchange(
            wire.forward("assign", ticket_id, {"ticket_id": ticket_id, "assignee": "alice"}), "rejected")
        assert rejected.payload["code"] == "TICKET_CLOSED"
        state = await wire.state(ticket_id)
        assert state is not None and state["assignee"] is None
