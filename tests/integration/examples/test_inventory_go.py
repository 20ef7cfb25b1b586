"""The Go inventory service (examples/inventory-go) keeps docs/service-contract.md on a real broker.

The service is a separate process with no Kinshasa code in it. These tests talk to it only as the ring
would: envelopes on `kinshasa.commands.inventory`, events read back from `kinshasa.events.inventory`,
its declaration on `kinshasa.catalogue`, and its HTTP read API. Every event it emits is parsed with
Kinshasa's own `Envelope`, so a wire-format slip fails here. A test that proves something did *not*
happen waits for a later event of the same entity (same partition, so it comes after) instead of
sleeping.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, deterministic_id, utcnow

REPO = Path(__file__).resolve().parents[3]
SERVICE_DIR = REPO / "examples" / "inventory-go"
COMMANDS = "kinshasa.commands.inventory"
EVENTS = "kinshasa.events.inventory"
DLQ = "kinshasa.svc.inventory.dlq"
CATALOGUE = "kinshasa.catalogue"
AGENT = Actor(kind="agent", id="agent-7")
COORDINATOR = Actor(kind="system", id="coordinator")
TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
WAIT_S = 30.0


def _load_build() -> Callable[[Path], Path]:
    spec = importlib.util.spec_from_file_location("inventory_go_build", SERVICE_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build: Callable[[Path], Path] = module.build
    return build


# --- the service process -----------------------------------------------------------------------------


class InventoryProcess:
    """The Go binary run against the test broker, on one data directory that outlives restarts."""

    def __init__(self, binary: Path, bootstrap: str, data: Path, log: Path) -> None:
        self.binary, self.bootstrap, self.data, self.log = binary, bootstrap, data, log
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> None:
        log = self.log.open("a")
        self.proc = subprocess.Popen(
            [str(self.binary), "--bootstrap", self.bootstrap, "--data", str(self.data),
             "--http", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ},
        )
        log.close()
        ready: list[str] = []
        done = threading.Event()

        def read_stdout() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("inventory ready ") and not ready:
                    ready.append(line.split()[-1])
                    done.set()
            done.set()  # stdout closed: the process ended

        threading.Thread(target=read_stdout, daemon=True).start()
        if not done.wait(60) or not ready:
            self.kill()
            raise AssertionError(f"inventory-go did not get ready; its log:\n{self.log.read_text()}")
        self.url = ready[0]

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then kill if it does not stop in time; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"inventory-go ignored SIGTERM for {timeout}s; its log:\n"
                                 f"{self.log.read_text()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=10)


# --- Kafka plumbing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One record of the events topic, parsed with Kinshasa's own envelope model."""

    partition: int
    offset: int
    key: bytes
    headers: dict[str, bytes]
    envelope: Envelope


class EventTail:
    """Follows the events topic from its beginning in a thread; tests wait on what it has seen."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.seen: list[Seen] = []
        self.unparsable: list[tuple[bytes, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._assigned.wait(30), f"could not assign {EVENTS}"

    def _run(self) -> None:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        try:
            partitions = _partitions(consumer, EVENTS)
            consumer.assign([TopicPartition(EVENTS, p, OFFSET_BEGINNING) for p in partitions])
            self._assigned.set()
            while not self._stop.is_set():
                msg = consumer.poll(0.1)
                if msg is None or msg.error():
                    continue
                value = msg.value() or b""
                try:
                    envelope = Envelope.from_bytes(value)
                except ValueError as exc:
                    with self._lock:
                        self.unparsable.append((value, str(exc)))
                    continue
                seen = Seen(int(msg.partition() or 0), int(msg.offset() or 0), msg.key() or b"",
                            _headers(msg), envelope)
                with self._lock:
                    self.seen.append(seen)
        finally:
            consumer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def matching(self, predicate: Callable[[Envelope], bool]) -> list[Seen]:
        with self._lock:
            assert not self.unparsable, f"events Kinshasa cannot parse: {self.unparsable}"
            return [s for s in self.seen if predicate(s.envelope)]

    def wait(self, predicate: Callable[[Envelope], bool], count: int = 1,
             within: float = WAIT_S) -> list[Seen]:
        deadline = time.monotonic() + within
        while True:
            found = self.matching(predicate)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"saw {len(found)} of {count} expected events within {within}s: {found}")
            time.sleep(0.05)

    def one(self, message_id: uuid.UUID | str) -> Seen:
        """The event with this id (waiting for it), checking there is exactly one copy so far."""
        found = self.wait(lambda e: str(e.message_id) == str(message_id))
        assert len(found) == 1, found
        return found[0]


def _headers(msg: Message) -> dict[str, bytes]:
    pairs: list[tuple[str, Any]] = list(msg.headers() or [])  # type: ignore[arg-type]
    return {key: value if isinstance(value, bytes) else str(value or "").encode() for key, value in pairs}


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return sorted(meta.partitions)
        time.sleep(0.2)
    raise AssertionError(f"topic {topic} never appeared")


def read_topic(bootstrap: str, topic: str) -> list[Message]:
    """Every record on `topic` right now, from the beginning."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        records = []
        for p in _partitions(consumer, topic):
            tp = TopicPartition(topic, p)
            for attempt in range(50):
                try:
                    low, high = consumer.get_watermark_offsets(tp, timeout=10)
                    break
                except KafkaException:
                    if attempt == 49:
                        raise
                    time.sleep(0.2)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                records.append(msg)
                if int(msg.offset() or 0) + 1 >= high:
                    break
        return records
    finally:
        consumer.close()


class Commands:
    """Sends envelopes to the commands topic as the gateway and the coordinator do (librdkafka, keyed)."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})

    def send_raw(self, key: bytes, value: bytes) -> int:
        """Publish and wait for the broker; returns the partition it landed on."""
        delivered: list[Any] = []
        self.producer.produce(COMMANDS, key=key, value=value,
                              on_delivery=lambda err, msg: delivered.append((err, msg)))
        self.producer.flush(30)
        assert delivered and delivered[0][0] is None, delivered
        return int(delivered[0][1].partition())

    def send(self, envelope: Envelope) -> int:
        return self.send_raw(envelope.kafka_key(), envelope.to_bytes())

    def close(self) -> None:
        self.producer.flush(10)
        del self.producer  # librdkafka's threads go with it, before the broker stops


def _item(item_id: str) -> EntityRef:
    return EntityRef(service="inventory", type="item", id=item_id)


def command(op: str, item_id: str, payload: dict[str, Any], run_id: str, *,
            message_id: uuid.UUID | None = None) -> Envelope:
    return Envelope(message_id=message_id or uuid.uuid4(), type=f"inventory.{op}", run_id=run_id,
                    actor=AGENT, correlation_id=f"corr-{run_id}", entity=_item(item_id),
                    occurred_at=utcnow(), payload=payload, traceparent=TRACEPARENT)


def compensate(op: str, forward: Envelope | str, run_id: str, item_id: str,
               forward_type: str | None = None) -> Envelope:
    forward_id = str(forward.message_id) if isinstance(forward, Envelope) else forward
    return Envelope(message_id=uuid.uuid4(), type=f"inventory.{op}.compensate", run_id=run_id,
                    actor=COORDINATOR, entity=_item(item_id), occurred_at=utcnow(),
                    payload={"forward_event_id": forward_id,
                             "forward_type": forward_type or f"inventory.{op}.applied"})


def applied_id(cmd: Envelope) -> str:
    return str(deterministic_id("applied", str(cmd.message_id)))


def rejected_id(cmd: Envelope) -> str:
    return str(deterministic_id("rejected", str(cmd.message_id)))


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def inventory_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _load_build()(tmp_path_factory.mktemp("inventory-go-bin"))


@pytest.fixture(scope="module")
def service(kafka: KafkaBroker, inventory_binary: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[InventoryProcess]:
    root = tmp_path_factory.mktemp("inventory-go")
    process = InventoryProcess(inventory_binary, kafka.bootstrap, root / "data", root / "inventory.log")
    process.start()
    try:
        yield process
    finally:
        try:
            process.stop()
        finally:
            process.kill()
            sys.stderr.write(f"inventory-go log: {process.log}\n")


@pytest.fixture(scope="module")
def events(service: InventoryProcess, kafka: KafkaBroker) -> Iterator[EventTail]:
    tail = EventTail(kafka.bootstrap)
    try:
        yield tail
    finally:
        tail.close()


@pytest.fixture(scope="module")
def commands(kafka: KafkaBroker) -> Iterator[Commands]:
    sender = Commands(kafka.bootstrap)
    try:
        yield sender
    finally:
        sender.close()


@pytest.fixture
def run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def add_item(commands: Commands, events: EventTail, run_id: str, quantity: int = 10,
             name: str = "Blue widget") -> tuple[str, Envelope]:
    """Add an item and wait for it to be applied; returns its id and its applied event."""
    item_id = str(uuid.uuid4())
    cmd = command("add_item", item_id, {"sku": "WIDGET-42", "name": name, "quantity": quantity}, run_id)
    commands.send(cmd)
    return item_id, events.one(applied_id(cmd)).envelope


# --- the declaration -----------------------------------------------------------------------------------


def test_declaration_is_on_the_catalogue_with_its_digest(service: InventoryProcess,
                                                         kafka: KafkaBroker) -> None:
    records = [r for r in read_topic(kafka.bootstrap, CATALOGUE) if r.key() == b"inventory"]
    ours = [json.loads(r.value() or b"null") for r in records]
    ours = [d for d in ours if d["endpoints"]["read"] == service.url]
    assert ours, f"no declaration of inventory with endpoints.read={service.url} on {CATALOGUE}"
    declaration = ours[-1]
    assert declaration["kind"] == "kinshasa.service/v1"
    assert declaration["service"] == "inventory" and declaration["version"] == 1

    body = {k: declaration[k] for k in ("service", "version", "description", "operations", "entities")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert declaration["digest"] == "sha256:" + hashlib.sha256(canonical).hexdigest()

    ops = {op["name"]: op for op in declaration["operations"]}
    shapes = {name: (op["mutation"], op["entity_type"], op["entity_id_field"], op["inverse"]["name"],
                     op["egress"]) for name, op in ops.items()}
    assert shapes == {
        "add_item": ("addItem", "item", None, "remove_added_item", False),
        "adjust_stock": ("adjustStock", "item", "item_id", "restore_quantity", False),
        "rename_item": ("renameItem", "item", "item_id", "restore_name", False),
    }
    for op in ops.values():
        schema = op["payload_schema"]
        assert schema["additionalProperties"] is False and schema["examples"], op["name"]
    delta = ops["adjust_stock"]["payload_schema"]["properties"]["delta"]
    assert delta["not"] == {"const": 0} and "not" in delta["errorMessage"]
    assert declaration["entities"][0]["type"] == "item"
    assert declaration["entities"][0]["list_by"] == ["run_id"]


# --- forward commands ----------------------------------------------------------------------------------


def test_each_operation_is_applied_with_before_and_after(service: InventoryProcess, commands: Commands,
                                                        events: EventTail, run_id: str) -> None:
    item_id = str(uuid.uuid4())
    add = command("add_item", item_id, {"sku": "WIDGET-42", "name": "Blue widget", "quantity": 10}, run_id)
    partition = commands.send(add)
    seen = events.one(applied_id(add))
    event = seen.envelope

    # The envelope: copied from the command, caused by it, keyed and partitioned like it.
    assert event.type == "inventory.add_item.applied"
    assert (event.run_id, event.actor, event.correlation_id, event.traceparent) == (
        run_id, AGENT, f"corr-{run_id}", TRACEPARENT)
    assert event.causation_id == add.message_id
    assert event.entity == add.entity
    assert seen.key == f"inventory:{item_id}".encode()
    assert seen.partition == partition == zlib.crc32(seen.key) % 6
    assert seen.headers["type"] == b"inventory.add_item.applied"
    assert seen.headers["message_id"] == applied_id(add).encode()
    assert seen.headers["traceparent"] == TRACEPARENT.encode()

    after = event.payload["after"]
    assert event.payload["before"] is None
    assert {k: event.payload[k] for k in ("item_id", "sku", "name", "quantity")} == {
        "item_id": item_id, "sku": "WIDGET-42", "name": "Blue widget", "quantity": 10}
    assert after == {"id": item_id, "version": 1, "sku": "WIDGET-42", "name": "Blue widget", "quantity": 10,
                     "status": "active", "run_id": run_id, "command_id": str(add.message_id),
                     "actor": "agent:agent-7", "recorded_at": after["recorded_at"]}

    adjust = command("adjust_stock", item_id, {"item_id": item_id, "delta": -3, "reason": "sold"}, run_id)
    commands.send(adjust)
    adjusted = events.one(applied_id(adjust)).envelope
    assert adjusted.type == "inventory.adjust_stock.applied"
    assert {k: adjusted.payload[k] for k in ("delta", "reason", "old_quantity", "new_quantity")} == {
        "delta": -3, "reason": "sold", "old_quantity": 10, "new_quantity": 7}
    assert adjusted.payload["before"] == after
    assert adjusted.payload["after"]["quantity"] == 7 and adjusted.payload["after"]["version"] == 2

    rename = command("rename_item", item_id, {"item_id": item_id, "name": "Red widget"}, run_id)
    commands.send(rename)
    renamed = events.one(applied_id(rename)).envelope
    assert {k: renamed.payload[k] for k in ("old_name", "new_name")} == {"old_name": "Blue widget",
                                                                          "new_name": "Red widget"}
    assert renamed.payload["before"] == adjusted.payload["after"]
    assert renamed.payload["after"]["name"] == "Red widget"

    # The read API answers exactly what the last event's `after` says.
    assert service.get(f"/entities/item/{item_id}").json() == renamed.payload["after"]
    history = service.get(f"/entities/item/{item_id}/versions").json()
    assert history["entity_type"] == "item" and history["id"] == item_id
    assert [(v["version"], v["operation"], v["quantity"], v["name"]) for v in history["versions"]] == [
        (1, "inventory.add_item", 10, "Blue widget"), (2, "inventory.adjust_stock", 7, "Blue widget"),
        (3, "inventory.rename_item", 7, "Red widget")]
    assert service.get("/entities/item", run_id=run_id).json() == [renamed.payload["after"]]


def test_the_domain_refuses_with_a_code(service: InventoryProcess, commands: Commands, events: EventTail,
                                        run_id: str) -> None:
    item_id, _ = add_item(commands, events, run_id, quantity=2)
    too_many = command("adjust_stock", item_id, {"item_id": item_id, "delta": -3}, run_id)
    unknown_item = str(uuid.uuid4())
    no_item = command("adjust_stock", unknown_item, {"item_id": unknown_item, "delta": 1}, run_id)
    unknown_op = command("explode", item_id, {}, run_id)
    mismatch = command("rename_item", item_id, {"item_id": str(uuid.uuid4()), "name": "x"}, run_id)
    for cmd in (too_many, no_item, unknown_op, mismatch):
        commands.send(cmd)
    expected = [(too_many, "INSUFFICIENT_STOCK"), (no_item, "ITEM_NOT_FOUND"),
                (unknown_op, "UNKNOWN_OPERATION"), (mismatch, "VALIDATION")]
    for cmd, code in expected:
        event = events.one(rejected_id(cmd)).envelope
        assert event.type == f"{cmd.type}.rejected"
        assert event.payload["code"] == code, event.payload
        assert event.payload["reason"] and set(event.payload) == {"reason", "code"}
        assert (event.run_id, event.actor, event.causation_id) == (run_id, AGENT, cmd.message_id)
    assert service.get(f"/entities/item/{item_id}").json()["quantity"] == 2


def test_a_malformed_payload_is_rejected_and_the_next_command_is_applied(
        service: InventoryProcess, commands: Commands, events: EventTail, run_id: str) -> None:
    item_id, _ = add_item(commands, events, run_id)
    zero = command("adjust_stock", item_id, {"item_id": item_id, "delta": 0}, run_id)
    extra = command("adjust_stock", item_id, {"item_id": item_id, "delta": 1, "colour": "red"}, run_id)
    fraction = command("adjust_stock", item_id, {"item_id": item_id, "delta": 1.5}, run_id)
    bad_sku_id = str(uuid.uuid4())
    bad_sku = command("add_item", bad_sku_id, {"sku": "lower-case", "name": "n"}, run_id)
    good = command("adjust_stock", item_id, {"item_id": item_id, "delta": 4}, run_id)
    for cmd in (zero, extra, fraction, bad_sku, good):
        commands.send(cmd)

    applied = events.one(applied_id(good))
    for cmd, field in ((zero, "delta"), (extra, "colour"), (fraction, "delta"), (bad_sku, "sku")):
        rejected = events.one(rejected_id(cmd))
        assert rejected.envelope.payload["code"] == "VALIDATION"
        assert f"{field}:" in rejected.envelope.payload["reason"], rejected.envelope.payload
        if cmd.entity == good.entity:
            assert rejected.partition == applied.partition and rejected.offset < applied.offset
    assert "must not be zero" in events.one(rejected_id(zero)).envelope.payload["reason"]
    assert applied.envelope.payload["old_quantity"] == 10 and applied.envelope.payload["new_quantity"] == 14
    assert service.get(f"/entities/item/{bad_sku_id}").status_code == 404


def test_a_duplicate_delivery_has_one_effect(service: InventoryProcess, commands: Commands, events: EventTail,
                                             run_id: str) -> None:
    item_id, _ = add_item(commands, events, run_id)
    adjust = command("adjust_stock", item_id, {"item_id": item_id, "delta": 5}, run_id)
    commands.send(adjust)
    commands.send(adjust)  # the same message_id again, as a broker redelivery would bring it
    later = command("rename_item", item_id, {"item_id": item_id, "name": "After the duplicate"}, run_id)
    commands.send(later)

    events.wait(lambda e: str(e.message_id) == applied_id(later))  # the copy came before this one
    assert len(events.matching(lambda e: e.causation_id == adjust.message_id)) == 1
    history = service.get(f"/entities/item/{item_id}/versions").json()["versions"]
    assert [v["quantity"] for v in history] == [10, 15, 15]


def test_an_unparsable_record_goes_to_the_dlq_and_the_partition_moves_on(
        service: InventoryProcess, commands: Commands, events: EventTail, kafka: KafkaBroker,
        run_id: str) -> None:
    item_id = str(uuid.uuid4())
    key = f"inventory:{item_id}".encode()
    garbage = b'{"this is": "not an envelope", "marker": "' + uuid.uuid4().hex.encode() + b'"}'
    commands.send_raw(key, garbage)
    no_entity = command("add_item", item_id, {"sku": "A-1", "name": "n"}, run_id).model_copy(
        update={"entity": None})
    commands.send_raw(key, no_entity.to_bytes())
    add = command("add_item", item_id, {"sku": "A-1", "name": "after the garbage"}, run_id)
    commands.send(add)
    events.one(applied_id(add))

    letters = {r.value(): r for r in read_topic(kafka.bootstrap, DLQ) if r.key() == key}
    assert garbage in letters and no_entity.to_bytes() in letters
    headers = _headers(letters[garbage])
    assert headers["kinshasa.dlq.source_topic"] == COMMANDS.encode()
    assert b"invalid envelope" in headers["kinshasa.dlq.error"]
    assert b"entity" in _headers(letters[no_entity.to_bytes()])["kinshasa.dlq.error"]
    assert not events.matching(lambda e: e.causation_id == no_entity.message_id)


# --- compensation --------------------------------------------------------------------------------------


def test_compensations_restore_before_and_answer_again_with_the_same_id(
        service: InventoryProcess, commands: Commands, events: EventTail, run_id: str) -> None:
    item_id, added = add_item(commands, events, run_id)
    adjust = command("adjust_stock", item_id, {"item_id": item_id, "delta": 5}, run_id)
    commands.send(adjust)
    adjusted = events.one(applied_id(adjust)).envelope
    rename = command("rename_item", item_id, {"item_id": item_id, "name": "Renamed"}, run_id)
    commands.send(rename)
    renamed = events.one(applied_id(rename)).envelope

    # Newest first, as the coordinator sends them; each restores its step's `before`.
    for forward, op in ((renamed, "rename_item"), (adjusted, "adjust_stock")):
        undo = compensate(op, forward, run_id, item_id)
        commands.send(undo)
        event = events.one(deterministic_id("compensated", str(forward.message_id))).envelope
        assert event.type == f"inventory.{op}.compensated"
        assert event.payload == {"forward_event_id": str(forward.message_id),
                                 "forward_type": f"inventory.{op}.applied"}
        assert (event.entity, event.causation_id, event.run_id, event.actor) == (
            forward.entity, undo.message_id, run_id, COORDINATOR)
        state = service.get(f"/entities/item/{item_id}").json()
        before = forward.payload["before"]
        assert (state["name"], state["quantity"]) == (before["name"], before["quantity"])

    # A straggler re-sent with a new message id: the same compensated event again, nothing changed.
    versions_before = len(service.get(f"/entities/item/{item_id}/versions").json()["versions"])
    again = compensate("rename_item", renamed, run_id, item_id)
    commands.send(again)
    copies = events.wait(lambda e: str(e.message_id) == str(
        deterministic_id("compensated", str(renamed.message_id))), count=2)
    assert copies[0].envelope == copies[1].envelope
    assert len(service.get(f"/entities/item/{item_id}/versions").json()["versions"]) == versions_before

    # Undoing the create removes the item: it reads as it did before (absent), its history stays.
    commands.send(compensate("add_item", added, run_id, item_id))
    events.one(deterministic_id("compensated", str(added.message_id)))
    missing = service.get(f"/entities/item/{item_id}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    history = service.get(f"/entities/item/{item_id}/versions").json()["versions"]
    assert history[-1]["status"] == "removed"
    assert history[-1]["operation"] == "inventory.add_item.compensate"


def test_an_inverse_refuses_when_the_item_changed_since(service: InventoryProcess, commands: Commands,
                                                        events: EventTail, run_id: str) -> None:
    item_id, added = add_item(commands, events, run_id)
    first = command("adjust_stock", item_id, {"item_id": item_id, "delta": 5}, run_id)
    second = command("adjust_stock", item_id, {"item_id": item_id, "delta": 1}, run_id)
    commands.send(first)
    commands.send(second)
    first_applied = events.one(applied_id(first)).envelope
    events.one(applied_id(second))

    # The older step first: the newer one did not apply its undo, so the older must refuse.
    for undo, forward in ((compensate("adjust_stock", first_applied, run_id, item_id), first_applied),
                          (compensate("add_item", added, run_id, item_id), added)):
        commands.send(undo)
        failed = events.one(deterministic_id("compensation_failed", str(undo.message_id))).envelope
        assert failed.type == undo.type.replace(".compensate", ".compensation_failed")
        assert failed.payload["forward_event_id"] == str(forward.message_id)
        assert "changed since" in failed.payload["reason"]
    assert service.get(f"/entities/item/{item_id}").json()["quantity"] == 16


def test_compensating_an_unknown_step_fails(service: InventoryProcess, commands: Commands, events: EventTail,
                                            run_id: str) -> None:
    item_id, added = add_item(commands, events, run_id)
    stranger = str(uuid.uuid4())
    unknown = compensate("adjust_stock", stranger, run_id, item_id)
    other_op = compensate("adjust_stock", added, run_id, item_id, forward_type="inventory.add_item.applied")
    wrong_op = compensate("rename_item", added, run_id, item_id)
    for undo in (unknown, other_op, wrong_op):
        commands.send(undo)
    added_id = str(added.message_id)
    for undo, named in ((unknown, stranger), (other_op, added_id), (wrong_op, added_id)):
        failed = events.one(deterministic_id("compensation_failed", str(undo.message_id))).envelope
        assert failed.type.endswith(".compensation_failed")
        assert failed.payload["forward_event_id"] == named
        assert failed.payload["reason"]
    unknown_failed = events.one(deterministic_id("compensation_failed", str(unknown.message_id)))
    assert stranger in unknown_failed.envelope.payload["reason"]
    assert service.get(f"/entities/item/{item_id}").json()["status"] == "active"


# --- the read API --------------------------------------------------------------------------------------


def test_read_api_errors(service: InventoryProcess) -> None:
    assert service.get("/healthz").status_code == 200
    unknown_type = service.get("/entities/widget/abc")
    assert unknown_type.status_code == 404 and unknown_type.json()["error"]["code"] == "UNKNOWN_ENTITY_TYPE"
    for path in ("/entities/item/nope", "/entities/item/nope/versions"):
        missing = service.get(path)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NOT_FOUND" and missing.json()["error"]["message"]
    assert service.get("/entities/item", sku="WIDGET-42").status_code == 400
    assert service.get("/entities/item", run_id="never-ran").json() == []


# --- restart -------------------------------------------------------------------------------------------


def test_sigterm_stops_cleanly_and_a_restart_keeps_everything(
        service: InventoryProcess, commands: Commands, events: EventTail, run_id: str,
        kafka: KafkaBroker) -> None:
    item_id, _ = add_item(commands, events, run_id)
    adjust = command("adjust_stock", item_id, {"item_id": item_id, "delta": 2}, run_id)
    commands.send(adjust)
    events.one(applied_id(adjust))

    assert service.stop() == 0
    service.start()
    assert service.get("/healthz").status_code == 200

    # The inbox survived: the old command again has no effect; a new one is applied after it.
    commands.send(adjust)
    later = command("adjust_stock", item_id, {"item_id": item_id, "delta": 1}, run_id)
    commands.send(later)
    assert events.one(applied_id(later)).envelope.payload["old_quantity"] == 12
    assert len(events.matching(lambda e: e.causation_id == adjust.message_id)) == 1
    # The declaration was published again with the new address.
    published = [r for r in read_topic(kafka.bootstrap, CATALOGUE) if r.key() == b"inventory"]
    urls = [json.loads(r.value() or b"null")["endpoints"]["read"] for r in published]
    assert urls[-1] == service.url


def test_go_vet_and_unit_tests_pass(inventory_binary: Path) -> None:
    go = Path(sys.executable).parent / "go"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    for args in (["vet", "./..."], ["test", "./..."]):
        result = subprocess.run([str(go), *args], cwd=SERVICE_DIR, env=env, capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_conformance_kit_passes(service: InventoryProcess, kafka: KafkaBroker) -> None:
    import asyncio

    from kinshasa.conformance import run_conformance

    report = asyncio.run(run_conformance("inventory", kafka.bootstrap, timeout_s=30))
    print(report.render())
    assert report.ok, report.render()
    assert {"apply:add_item", "apply:adjust_stock", "apply:rename_item", "compensate"} <= {
        check.name for check in report.checks}
