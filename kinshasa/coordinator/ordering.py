"""Which compensations may go out now: newest first per entity, entities in parallel (pure logic, no I/O).

How one entity's steps stay strictly newest first while a wide run still reverts in a few round trips:

* Different entities never wait for each other.
* Within an entity, up to `depth` steps are in flight at once, emitted newest first in one outbox
  transaction. They share the entity's Kafka key, so the idempotent producer and the service's single
  consumer per partition apply them in exactly that order.
* That order breaks only if a compensation does not apply (refused, or dead-lettered) and the next,
  older one of the same entity then does. The service kit refuses an inverse whose entity changed since
  its forward step (`StateChangedError`), so the older step is refused too, never misapplied, and the
  entity is fenced for the rest of the pass: nothing older is released behind a refusal.
* Retry passes (after a refusal or a straggler) use depth 1: the next older step of an entity is sent
  only once the newer one is acknowledged, so a resolved conflict is undone in strict order.

Depth 1 everywhere would need no service-side check at all, at the cost of one round trip per step of
the deepest entity (a run that posts 10,000 entries to one account would take 10,000 round trips).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kinshasa.coordinator.store import StepStatus


@dataclass(frozen=True)
class PlannedStep:
    """An unsettled step; `claimed_by_this_pass` marks what a retried pass already has in flight."""

    step_id: int
    entity_key: str
    claimed_by_this_pass: bool = False


@dataclass
class CompensationPlan:
    """The state of one pass: queued steps per entity, steps in flight, fenced entities."""

    depth: int = 1
    queues: dict[str, deque[int]] = field(default_factory=dict)
    in_flight: dict[int, str] = field(default_factory=dict)
    fenced: dict[str, int] = field(default_factory=dict)
    settled: int = 0
    refused: list[int] = field(default_factory=list)
    _per_entity: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_steps(cls, newest_first: Sequence[PlannedStep], depth: int = 1) -> CompensationPlan:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        plan = cls(depth=depth)
        ordered = sorted(newest_first, key=lambda s: -s.step_id)
        for step in ordered:
            if step.claimed_by_this_pass:
                # Already emitted by this pass before its activity was retried: wait for it, do not resend.
                plan.in_flight[step.step_id] = step.entity_key
                plan._per_entity[step.entity_key] += 1
            else:
                plan.queues.setdefault(step.entity_key, deque()).append(step.step_id)
        return plan

    def next_wave(self) -> list[int]:
        """Steps to emit now, newest first within each entity; they count as in flight from here on."""
        wave: list[int] = []
        for entity, queue in self.queues.items():
            if not queue or entity in self.fenced:
                continue
            while queue and self._per_entity[entity] < self.depth:
                step_id = queue.popleft()
                self.in_flight[step_id] = entity
                self._per_entity[entity] += 1
                wave.append(step_id)
        return wave

    def settle(self, step_id: int, status: str) -> bool:
        """Record a settlement; returns False for steps this pass was not waiting on."""
        entity = self.in_flight.pop(step_id, None)
        if entity is None:
            return False
        self._per_entity[entity] -= 1
        self.settled += 1
        if status == StepStatus.COMPENSATION_FAILED.value:
            self.refused.append(step_id)
            self.fenced.setdefault(entity, step_id)
        return True

    def drop(self, step_ids: Iterable[int]) -> None:
        """Steps that turned out settled before they could be claimed (an ack won the race)."""
        for step_id in step_ids:
            self.settle(step_id, StepStatus.COMPENSATED.value)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    @property
    def done(self) -> bool:
        """Nothing in flight and nothing more may be emitted in this pass."""
        if self.in_flight:
            return False
        return all(not q or e in self.fenced for e, q in self.queues.items())
