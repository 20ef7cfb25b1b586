"""The conformance suite: each check of contract section 10, driven against a live service, one row each.

Every check works on entities of its own (fresh UUIDs), so the checks run concurrently without seeing
each other's effects. `read_api:*` runs after them, as an entity type the kit cannot create is found
among what they made, and `compensate` last, as it undoes the steps the `apply:*` checks left.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from kinshasa.conformance.driver import Seen, ServiceDriver, read_catalogue
from kinshasa.conformance.errors import CheckFailed, SetupError
from kinshasa.conformance.report import Check, ConformanceReport
from kinshasa.conformance.subject import ServiceUnderTest
from kinshasa.conformance.verdicts import (
    ORDER_COUNT,
    answer_problems,
    applied_payload_problems,
    compensate_echo_problems,
    count_command_versions,
    forward_payload,
    malformed_payload,
    numbered_payload,
    order_problems,
    refusal_problems,
    replay_payloads,
    state_differences,
    version_of,
    versions_problems,
)
from kinshasa.schemas.declaration import OperationDeclaration
from kinshasa.schemas.envelope import (
    APPLIED,
    COMPENSATED,
    COMPENSATION_FAILED,
    REJECTED,
    Actor,
    EntityRef,
    Envelope,
    compensate_type,
    new_id,
    utcnow,
)
from kinshasa.topics.catalogue import CATALOGUE, TopicNameError, check_service_name

log = logging.getLogger(__name__)

VALIDATION = "VALIDATION"
# A query field no entity declares in list_by, which section 8 answers with 400.
UNLISTED_FIELD = "conformance_unlisted_field"
FORWARD_ACTOR = Actor(kind="agent", id="conformance")
COMPENSATE_ACTOR = Actor(kind="system", id="conformance")


async def run_conformance(service: str, bootstrap: str, *, timeout_s: float = 30,
                          catalogue_topic: str | None = None,
                          topic_suffix: str | None = None) -> ConformanceReport:
    """Check the running `service` against the contract; SetupError if it cannot even be found.

    `topic_suffix` checks an isolated copy (`kinshasa service --topic-suffix`): its commands, events and
    catalogue topics all carry the suffix.
    """
    if timeout_s <= 0:
        raise SetupError(f"timeout must be positive, got {timeout_s}: pass --timeout SECONDS")
    if catalogue_topic is None:
        catalogue_topic = f"{CATALOGUE}.{topic_suffix}" if topic_suffix else CATALOGUE
    subject = await find_service(service, bootstrap, catalogue_topic, timeout_s)
    run_id = str(uuid.uuid4())
    async with ServiceDriver(bootstrap, subject, run_id, timeout_s, topic_suffix) as driver:
        checks = await Suite(subject, driver).run()
    return ConformanceReport(service, run_id, checks)


async def find_service(service: str, bootstrap: str, topic: str, timeout_s: float) -> ServiceUnderTest:
    """The service as its newest declaration on the catalogue topic describes it."""
    try:
        check_service_name(service)
    except TopicNameError as exc:
        raise SetupError(str(exc)) from exc
    records = await asyncio.to_thread(read_catalogue, bootstrap, topic, timeout_s)
    if service not in records:
        declared = ", ".join(sorted(k for k, v in records.items() if v is not None)) or "none"
        raise SetupError(
            f"no declaration of {service!r} on {topic} (declared there: {declared}): start the service, "
            "which publishes its declaration at start, or check --service and --bootstrap")
    return ServiceUnderTest.from_record(service, records[service], topic)


async def judge(name: str, check: Awaitable[str]) -> Check:
    """Run one check: its detail on success, the contract it broke on CheckFailed."""
    try:
        return Check(name, True, await check)
    except CheckFailed as exc:
        return Check(name, False, str(exc))
    except Exception as exc:
        # One broken check must not hide the others' results.
        log.exception("conformance check %s could not run", name)
        return Check(name, False, f"the check could not run: {exc!r}")


@dataclass(frozen=True)
class Step:
    """A forward command, the service's answer and the read API's state just before it was sent.

    The apply checks keep their applied steps for the compensate check to undo.
    """

    op: OperationDeclaration
    command: Envelope
    answer: Envelope
    before: dict[str, Any] | None
    prepared_by: OperationDeclaration | None = None

    @property
    def restores(self) -> dict[str, Any] | None:
        """What undoing the step must restore: the answer's `before`, or if it lacks one, the state read."""
        before = self.answer.payload.get("before", self.before)
        return before if isinstance(before, dict) else None


def _is(event: Envelope, suffix: str) -> bool:
    return event.type.endswith(f".{suffix}")


def _outcome(event: Envelope) -> str:
    """An answer in words, for a detail: `rejected (CODE): reason` or `answered with <type>`."""
    if _is(event, REJECTED) or _is(event, COMPENSATION_FAILED):
        code = event.payload.get("code")
        kind = event.type.rsplit(".", 1)[1]
        return f"{kind}{f' ({code})' if code else ''}: {event.payload.get('reason', '(no reason)')}"
    return f"answered with {event.type}"


def _fail_if(problems: list[str]) -> None:
    if problems:
        raise CheckFailed("; ".join(problems))


def _labelled(label: str, differences: list[str]) -> list[str]:
    """Differences as one problem under `label`, or none."""
    return [f"{label}: {', '.join(differences)}"] if differences else []


class Suite:
    """One run's checks: each builds its commands, sends them through the driver, judges the answers."""

    def __init__(self, subject: ServiceUnderTest, driver: ServiceDriver) -> None:
        self.subject = subject
        self.driver = driver
        self.steps: dict[str, Step] = {}  # operation name -> the step its apply check left
        # Digits, which most id patterns accept; random per run, so a second run's payloads differ too.
        self._tag_base = f"{secrets.randbelow(10**6):06d}"
        self._tags = itertools.count(1)

    async def run(self) -> list[Check]:
        ops = self.subject.operations
        first = await asyncio.gather(
            *(judge(f"apply:{op.name}", self.check_apply(op)) for op in ops),
            judge("duplicate", self.check_duplicate()),
            judge("compensate_unknown", self.check_compensate_unknown()),
            judge("malformed", self.check_malformed()),
            judge("order", self.check_order()),
        )
        # Reads before compensations, so an entity only an applied step made is still there to read.
        reads = await asyncio.gather(
            *(judge(f"read_api:{t}", self.check_read_api(t)) for t in self.subject.entity_types))
        compensate = await judge("compensate", self.check_compensate())
        applies, (duplicate, unknown, malformed, order) = first[: len(ops)], first[len(ops):]
        return [*applies, duplicate, compensate, unknown, malformed, order, *reads]

    def tag(self) -> str:
        """A mark no other payload of any run has, for `numbered_payload`."""
        return f"{self._tag_base}{next(self._tags)}"

    # --- building and sending -----------------------------------------------------------------------

    def entity(self, op: OperationDeclaration, entity_id: str) -> EntityRef:
        return EntityRef(service=self.subject.service, type=op.entity_type, id=entity_id)

    def command(self, op: OperationDeclaration, entity_id: str, payload: dict[str, Any],
                check: str) -> Envelope:
        """A forward command of this run, with a trace context the service must copy onto its answer."""
        return Envelope(
            message_id=new_id(), type=self.subject.command_type(op), run_id=self.driver.run_id,
            actor=FORWARD_ACTOR, correlation_id=f"conformance:{check}", entity=self.entity(op, entity_id),
            occurred_at=utcnow(), payload=payload, traceparent=_traceparent())

    def compensate(self, op: OperationDeclaration, entity: EntityRef, forward_event_id: UUID,
                   check: str) -> Envelope:
        """`<op>.compensate` naming one forward event, as the coordinator sends it (section 4)."""
        command_type = self.subject.command_type(op)
        return Envelope(
            message_id=new_id(), type=compensate_type(command_type), run_id=self.driver.run_id,
            actor=COMPENSATE_ACTOR, correlation_id=f"conformance:{check}", entity=entity,
            occurred_at=utcnow(), traceparent=_traceparent(),
            payload={"forward_event_id": str(forward_event_id), "forward_type": f"{command_type}.{APPLIED}"})

    async def exchange(self, command: Envelope) -> Envelope:
        """Send one command and return the service's answer to it."""
        await self.driver.send(command)
        return await self.driver.answer(command)

    async def apply(self, op: OperationDeclaration, entity_id: str, check: str) -> Envelope:
        """Have `op` applied to `entity_id` as a means to a check; the applied event, else CheckFailed.

        The example marked with a fresh tag goes first, so it never repeats an earlier payload (two links
        with the same ends); if the service refuses it, the example as it is.
        """
        answer = None
        for payload in (numbered_payload(op, entity_id, self.tag()), forward_payload(op, entity_id)):
            if payload is None:
                continue
            answer = await self.exchange(self.command(op, entity_id, payload, check))
            if _is(answer, APPLIED):
                return answer
        assert answer is not None
        raise CheckFailed(f"{self.subject.command_type(op)} was {_outcome(answer)}")

    async def new_entity(self, entity_type: str, check: str) -> str:
        """The id of a new entity of `entity_type`, made with the service's create operation for it."""
        creator = self.subject.creator_for(entity_type)
        if creator is None:
            raise CheckFailed(
                f"{self.subject.service} declares no create operation for {entity_type}, so the kit "
                "cannot make one to work on: declare one (entity_id_field null)")
        entity_id = str(uuid.uuid4())
        try:
            await self.apply(creator, entity_id, check)
        except CheckFailed as exc:
            raise CheckFailed(f"creating a {entity_type} first failed: {exc}") from exc
        return entity_id

    async def target(self, op: OperationDeclaration, check: str) -> str:
        """The entity id a command of `op` goes to: minted for a create, else a new entity's."""
        return str(uuid.uuid4()) if op.creates else await self.new_entity(op.entity_type, check)

    def replayable(self) -> OperationDeclaration | None:
        """The non-create operation best sent several times in a row: not egress, with a free-text field."""
        def rank(op: OperationDeclaration) -> tuple[bool, bool]:
            return op.egress, not replay_payloads(op, "x", ["1", "2"])[1]
        candidates = [op for op in self.subject.updates() if _has_example(op)]
        return min(candidates, key=rank) if candidates else None

    # --- apply:<operation> --------------------------------------------------------------------------

    async def check_apply(self, op: OperationDeclaration) -> str:
        check = f"apply:{op.name}"
        step = first = await self.try_example(op, None, check)
        if _is(first.answer, REJECTED) and not op.creates:
            step = await self.try_after_another(op, check) or first
        if not _is(step.answer, APPLIED):
            raise CheckFailed(f"its example payload was {_outcome(step.answer)}")
        # Kept even if the answer breaks the envelope contract, so compensate is still checked.
        self.steps[op.name] = step
        problems = answer_problems(step.command, step.answer, APPLIED, step.command.message_id)
        problems += applied_payload_problems(op, step.answer.payload)
        problems += await self.before_after_problems(step)
        _fail_if(problems)
        if step.prepared_by is None:
            return f"applied as {step.answer.message_id}"
        return (f"applied as {step.answer.message_id} after {step.prepared_by.name} (on a fresh "
                f"{op.entity_type} it was {_outcome(first.answer)})")

    async def before_after_problems(self, step: Step) -> list[str]:
        """Whether `before` and `after` are the states the read API answered just before and just after."""
        payload, entity = step.answer.payload, _entity(step.command)
        problems = []
        if isinstance(payload.get("before", False), dict | None):
            problems += _labelled("before vs the read API just before",
                                  state_differences(step.before, payload["before"],
                                                    only=_keys(payload["before"])))
        if isinstance(payload.get("after", False), dict | None):
            after = await self.driver.read_state(entity.type, entity.id)
            problems += _labelled("after vs the read API just after",
                                  state_differences(payload["after"], after, only=_keys(payload["after"])))
        return problems

    async def try_example(self, op: OperationDeclaration, prepare: OperationDeclaration | None,
                          check: str) -> Step:
        """`op`'s example sent to a fresh entity (after `prepare`'s example, if given), and its answer."""
        entity_id = await self.target(op, check)
        if prepare is not None:
            await self.apply(prepare, entity_id, check)
        before = None if op.creates else await self.driver.read_state(op.entity_type, entity_id)
        command = self.command(op, entity_id, forward_payload(op, entity_id), check)
        return Step(op, command, await self.exchange(command), before, prepare)

    async def try_after_another(self, op: OperationDeclaration, check: str) -> Step | None:
        """An example refused on a fresh entity (an `unarchive`) is tried after each other operation's."""
        for prepare in self.subject.updates():
            if prepare.entity_type != op.entity_type or prepare is op or prepare.egress:
                continue
            try:
                step = await self.try_example(op, prepare, check)
            except CheckFailed:
                continue
            if _is(step.answer, APPLIED):
                return step
        return None

    # --- duplicate ----------------------------------------------------------------------------------

    async def check_duplicate(self) -> str:
        op = self.replayable() or self.first_creator()
        entity_id = await self.target(op, "duplicate")
        twice = self.command(op, entity_id, replay_payloads(op, entity_id, [self.tag()])[0][0], "duplicate")
        first = await self.exchange(twice)
        if not _is(first, APPLIED):
            raise CheckFailed(f"{twice.type} was {_outcome(first)}, so there is nothing to deliver twice")
        settled = await self.driver.read_state(op.entity_type, entity_id)
        # The marker goes to the same entity, so the same partition: once it is answered, the second
        # delivery was handled and every answer to it has been read. A malformed marker is refused, so
        # it changes nothing itself and the entity must read exactly as it did after the first delivery.
        marker = self.command(op, entity_id, self.marker_payload(op, entity_id), "duplicate")
        await self.driver.send(twice, marker)
        marker_answer = await self.driver.answer(marker)
        answers = [s.envelope for s in self.driver.events.caused_by(twice.message_id)]
        problems = [f"the second delivery was {_outcome(a)}" for a in answers if not _is(a, APPLIED)]
        ids = {a.message_id for a in answers if _is(a, APPLIED)}
        if len(ids) != 1:
            problems.append(f"{len(ids)} different applied event ids: {', '.join(map(str, sorted(ids)))}")
        if _is(marker_answer, REJECTED):
            now = await self.driver.read_state(op.entity_type, entity_id)
            problems += _labelled("the read API after the second delivery",
                                  state_differences(settled, now, ignore=()))
        history = await self.versions_body(op.entity_type, entity_id)
        written = count_command_versions(history, twice.message_id)
        if written > 1:
            problems.append(f"the read API's /versions has {written} versions written by the one command")
        _fail_if(problems)
        return f"{op.name} delivered twice: one applied event {first.message_id}, the entity unchanged after"

    def marker_payload(self, op: OperationDeclaration, entity_id: str) -> dict[str, Any]:
        """A payload the service must refuse, or, if its schema refuses nothing, another valid one."""
        try:
            return malformed_payload(op, entity_id)[0]
        except CheckFailed:
            return replay_payloads(op, entity_id, [self.tag()])[0][0]

    def first_creator(self) -> OperationDeclaration:
        creators = sorted((op for op in self.subject.operations if op.creates), key=lambda op: op.egress)
        if not creators:
            raise CheckFailed(f"{self.subject.service} has no operation the kit can send to an entity it "
                              "made: declare a create operation")
        return creators[0]

    async def versions_body(self, entity_type: str, entity_id: str) -> object:
        path = f"/entities/{entity_type}/{entity_id}/versions"
        response = await self.driver.get(path)
        if response.status_code != 200:
            raise CheckFailed(f"GET {path} answered {response.status_code} {response.text[:200]!r}, "
                              "expected 200")
        return response.json()

    # --- compensate ---------------------------------------------------------------------------------

    async def check_compensate(self) -> str:
        if not self.steps:
            raise CheckFailed("no operation was applied, so there is no step to compensate: "
                              "fix the apply:* checks first")
        steps = [self.steps[op.name] for op in self.subject.operations if op.name in self.steps]
        outcomes = await asyncio.gather(*(_attempt(self.undo(s) if not s.op.egress else self.refuse(s))
                                          for s in steps))
        named = [(s.op.name, ok, detail) for s, (ok, detail) in zip(steps, outcomes, strict=True)]
        _fail_if([f"{name}: {detail}" for name, ok, detail in named if not ok])
        by_outcome: dict[str, list[str]] = {}
        for name, _, detail in named:
            by_outcome.setdefault(detail, []).append(name)
        done = "; ".join(f"{detail}: {', '.join(names)}" for detail, names in by_outcome.items())
        untried = [op.name for op in self.subject.operations if op.name not in self.steps]
        return done + (f" (not tried, as their apply failed: {', '.join(untried)})" if untried else "")

    async def undo(self, step: Step) -> str:
        """Compensate an applied step twice: the first restores `before`, the second changes nothing."""
        forward_id, entity = step.answer.message_id, _entity(step.command)
        first_cmd = self.compensate(step.op, entity, forward_id, "compensate")
        first = await self.exchange(first_cmd)
        if not _is(first, COMPENSATED):
            raise CheckFailed(f"compensating was {_outcome(first)}")
        problems = answer_problems(first_cmd, first, COMPENSATED, forward_id)
        problems += compensate_echo_problems(first_cmd, first)
        restored = await self.driver.read_state(entity.type, entity.id)
        problems += _labelled("the read API after it vs the applied event's before",
                              state_differences(step.restores, restored, only=_keys(step.restores)))
        again = await self.compensate_again(step, first_cmd)
        if again is not None and (again.message_id != first.message_id or not _is(again, COMPENSATED)):
            problems.append(f"compensating again answered {again.type} {again.message_id}, expected "
                            f"nothing or {first.type} {first.message_id} again")
        after_again = await self.driver.read_state(entity.type, entity.id)
        if version_of(after_again) != version_of(restored):
            problems.append(f"compensating again changed the entity: version {version_of(restored)} -> "
                            f"{version_of(after_again)}")
        _fail_if(problems)
        how = "answered the same id" if again is not None else "was absorbed"
        return f"before restored, and a second compensate {how} and changed nothing"

    async def compensate_again(self, step: Step, first_cmd: Envelope) -> Envelope | None:
        """The answer to a re-sent compensate (new message id): its own event, a copy of the first's, or
        none (allowed: section 4) once a marker command sent after it on the same entity was answered."""
        forward_id, entity = step.answer.message_id, _entity(step.command)
        events = self.driver.events
        first_seen = events.caused_by(first_cmd.message_id)[0]
        second_cmd = self.compensate(step.op, entity, forward_id, "compensate")
        await self.driver.send(second_cmd)
        # Same key, so same partition: once the marker is answered, the compensate before it was handled.
        marker = self.command(step.op, entity.id, self.marker_payload(step.op, entity.id), "compensate")
        await self.driver.send(marker)

        def answer() -> tuple[Envelope | None] | None:
            caused = events.caused_by(second_cmd.message_id)
            copies = [s for s in events.with_id(first_seen.envelope.message_id) if _after(s, first_seen)]
            found = caused or copies
            if found:
                return (found[0].envelope,)
            return (None,) if events.caused_by(marker.message_id) else None
        settled = await events.wait(answer, self.driver.timeout_s)
        if settled is None:
            raise CheckFailed(f"neither a second compensate nor a command after it on the same entity was "
                              f"answered within {self.driver.timeout_s:g}s")
        return settled[0]

    async def refuse(self, step: Step) -> str:
        """Compensating an egress step must answer compensation_failed (section 4)."""
        command = self.compensate(step.op, _entity(step.command), step.answer.message_id, "compensate")
        answer = await self.exchange(command)
        if not _is(answer, COMPENSATION_FAILED):
            raise CheckFailed(f"compensating an egress step was {_outcome(answer)}, expected "
                              "compensation_failed: egress is never compensated")
        problems = answer_problems(command, answer, COMPENSATION_FAILED, command.message_id)
        problems += refusal_problems(answer.payload, needs_code=False)
        _fail_if(problems)
        return "egress, refused with compensation_failed"

    # --- compensate_unknown -------------------------------------------------------------------------

    async def check_compensate_unknown(self) -> str:
        op = min(self.subject.operations, key=lambda o: o.egress)
        forward_id = uuid.uuid4()
        command = self.compensate(op, self.entity(op, str(uuid.uuid4())), forward_id, "compensate_unknown")
        answer = await self.exchange(command)
        if not _is(answer, COMPENSATION_FAILED):
            raise CheckFailed(f"a compensate naming an event it never emitted was {_outcome(answer)}, "
                              "expected compensation_failed")
        problems = answer_problems(command, answer, COMPENSATION_FAILED, command.message_id)
        problems += refusal_problems(answer.payload, needs_code=False)
        problems += compensate_echo_problems(command, answer)
        # Section 4: an unknown step's reason names its id; an egress operation's says egress instead.
        if not op.egress and str(forward_id) not in str(answer.payload.get("reason", "")):
            problems.append("the reason does not name the forward event id")
        _fail_if(problems)
        return f"compensation_failed: {answer.payload.get('reason')}"

    # --- malformed ----------------------------------------------------------------------------------

    async def check_malformed(self) -> str:
        creators = [op for op in self.subject.operations if op.creates]
        op = min(creators, key=lambda o: o.egress) if creators else self.subject.operations[0]
        entity_id = await self.target(op, "malformed")
        payload, how = malformed_payload(op, entity_id)
        bad = self.command(op, entity_id, payload, "malformed")
        answer = await self.exchange(bad)
        if not _is(answer, REJECTED):
            raise CheckFailed(f"{op.name} with {how} was {_outcome(answer)}, "
                              f"expected rejected ({VALIDATION})")
        problems = answer_problems(bad, answer, REJECTED, bad.message_id)
        problems += refusal_problems(answer.payload, needs_code=True)
        if answer.payload.get("code") not in (None, "", VALIDATION):
            problems.append(f"code is {answer.payload['code']!r}; the contract says a payload that does not "
                            f"validate is rejected with {VALIDATION}")
        try:
            await self.apply(op, entity_id, "malformed")
        except CheckFailed as exc:
            problems.append(f"the valid command after it: {exc}")
        _fail_if(problems)
        return f"{op.name} with {how}: {_outcome(answer)}; the next {op.name} of the entity was applied"

    # --- order --------------------------------------------------------------------------------------

    async def check_order(self) -> str:
        op = self.replayable()
        if op is None:
            if all(o.creates for o in self.subject.operations):
                return "nothing to order: every operation creates its entity, so no entity gets two commands"
            raise CheckFailed("no non-create operation has an example and an entity type the kit can "
                              "create: declare examples and create operations")
        entity_id = await self.new_entity(op.entity_type, "order")
        payloads, varied = replay_payloads(op, entity_id, [self.tag() for _ in range(ORDER_COUNT)])
        commands = [self.command(op, entity_id, p, "order") for p in payloads]
        await self.driver.send(*commands)
        answers = await self.first_answers(commands)
        problems = order_problems([c.message_id for c in commands],
                                  [s.envelope.causation_id for s in answers])
        refused = [s.envelope for s in answers if not _is(s.envelope, APPLIED)]
        # Identical replays may rightly be refused as no-ops, but never the first one.
        first_refused = bool(answers) and answers[0].envelope in refused
        if refused and (varied or first_refused):
            problems.append(f"{len(refused)} of {ORDER_COUNT} not applied, e.g. {_outcome(refused[0])}")
        _fail_if(problems)
        note = f" ({len(refused)} identical replays refused)" if refused else ""
        return f"{ORDER_COUNT} {op.name} commands of one entity answered in the order sent{note}"

    async def first_answers(self, commands: list[Envelope]) -> list[Seen]:
        """The first answer to each command (those that came within the timeout), in partition order."""
        events = self.driver.events

        def firsts() -> list[Seen]:
            return [found[0] for c in commands if (found := events.caused_by(c.message_id))]

        await events.wait(lambda: firsts() if len(firsts()) == len(commands) else None, self.driver.timeout_s)
        return sorted(firsts(), key=lambda s: (s.partition, s.offset))

    # --- read_api:<type> ----------------------------------------------------------------------------

    async def check_read_api(self, entity_type: str) -> str:
        entity_id = await self.entity_to_read(entity_type)
        current = await self.driver.read_state(entity_type, entity_id)
        if current is None:
            raise CheckFailed(f"GET /entities/{entity_type}/{entity_id} answered 404 for an entity this run "
                              "made")
        problems = []
        if str(current.get("id")) != entity_id or "version" not in current:
            problems.append(f"the state has id {current.get('id')!r} and version {current.get('version')!r}; "
                            f"expected id {entity_id!r} and a version")
        history = await self.versions_body(entity_type, entity_id)
        problems += versions_problems(history, entity_type, entity_id, current)
        problems += await self.listing_problems(entity_type, entity_id)
        unknown = uuid.uuid4()
        for path in (f"/entities/{entity_type}/{unknown}", f"/entities/{entity_type}/{unknown}/versions"):
            status = (await self.driver.get(path)).status_code
            if status != 404:
                problems.append(f"GET {path} (an unknown id) answered {status}, expected 404")
        _fail_if(problems)
        count = len(history.get("versions", [])) if isinstance(history, dict) else 0
        listed = ", listed by run_id" if "run_id" in self.list_by(entity_type) else ""
        return f"{entity_type} {entity_id}: state, {count} version(s){listed}; an unknown id is 404"

    async def listing_problems(self, entity_type: str, entity_id: str) -> list[str]:
        """`?run_id=` lists what this run made, if the type is listed by run_id; another field is 400."""
        problems = []
        if "run_id" in self.list_by(entity_type):
            listed = await self.listed(entity_type)
            if entity_id not in {str(state.get("id")) for state in listed}:
                problems.append(f"GET /entities/{entity_type}?run_id=<this run> does not list {entity_id}")
        path = f"/entities/{entity_type}?{UNLISTED_FIELD}=x"
        status = (await self.driver.get(path)).status_code
        if status != 400:
            problems.append(f"GET {path} (a field not in list_by) answered {status}, expected 400")
        return problems

    def list_by(self, entity_type: str) -> list[str]:
        declared = self.subject.declaration.entity(entity_type)
        return list(declared.list_by) if declared is not None else []

    async def listed(self, entity_type: str) -> list[dict[str, Any]]:
        """The states `GET /entities/{type}?run_id=<this run>` answers; CheckFailed if it is not a list."""
        path = f"/entities/{entity_type}?run_id={self.driver.run_id}"
        response = await self.driver.get(path)
        body = response.json() if response.status_code == 200 else None
        if not isinstance(body, list):
            raise CheckFailed(f"GET {path} answered {response.status_code} {response.text[:200]!r}, expected "
                              "200 with a list of states (the type declares list_by run_id)")
        return [state for state in body if isinstance(state, dict)]

    async def entity_to_read(self, entity_type: str) -> str:
        """A new entity of the type; if the service cannot create one, one this run's commands made."""
        if self.subject.creator_for(entity_type) is not None:
            return await self.new_entity(entity_type, f"read_api:{entity_type}")
        for seen in reversed(self.driver.events.events):
            entity = seen.envelope.entity
            if _is(seen.envelope, APPLIED) and entity is not None and entity.type == entity_type:
                return entity.id
        if "run_id" in self.list_by(entity_type):
            for state in await self.listed(entity_type):
                if state.get("id") is not None:
                    return str(state["id"])
        raise CheckFailed(f"the kit cannot find an entity of type {entity_type} to read: "
                          f"{self.subject.service} declares no create operation for it, no applied event "
                          f"names one, and it is not listed by run_id; declare list_by [\"run_id\"] for "
                          f"{entity_type} so the run's entities can be found")


def _entity(message: Envelope) -> EntityRef:
    """The entity of a command the kit built, or of the service's answer to it: both always name one."""
    if message.entity is None:
        raise CheckFailed(f"{message.type} {message.message_id} names no entity: copy the command's entity")
    return message.entity


def _keys(state: Any) -> list[str] | None:
    return list(state) if isinstance(state, dict) else None


def _has_example(op: OperationDeclaration) -> bool:
    try:
        forward_payload(op, "x")
    except CheckFailed:
        return False
    return True


def _after(seen: Seen, other: Seen) -> bool:
    return (seen.partition, seen.offset) > (other.partition, other.offset)


async def _attempt(work: Awaitable[str]) -> tuple[bool, str]:
    try:
        return True, await work
    except CheckFailed as exc:
        return False, str(exc)


def _traceparent() -> str:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"

