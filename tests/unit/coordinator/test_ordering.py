"""The compensation plan releases steps newest first per entity, entities in parallel, and fences refusals."""

from __future__ import annotations

import pytest

from kinshasa.coordinator.ordering import CompensationPlan, PlannedStep
from kinshasa.coordinator.store import StepStatus

OK = StepStatus.COMPENSATED.value
REFUSED = StepStatus.COMPENSATION_FAILED.value


def plan(steps: list[tuple[int, str]], depth: int = 1) -> CompensationPlan:
    return CompensationPlan.from_steps([PlannedStep(i, e) for i, e in steps], depth=depth)


def test_each_wave_holds_the_newest_unsettled_step_of_every_entity() -> None:
    p = plan([(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "a"), (6, "b")])
    assert sorted(p.next_wave()) == [4, 5, 6]
    assert p.next_wave() == []  # nothing more until the in-flight steps settle
    p.settle(5, OK)
    assert p.next_wave() == [3]
    for step in (3, 4, 6):
        p.settle(step, OK)
    assert sorted(p.next_wave()) == [1, 2]
    p.settle(1, OK)
    p.settle(2, OK)
    assert p.done


def test_depth_pipelines_one_entity_newest_first() -> None:
    p = plan([(i, "account") for i in range(1, 11)], depth=4)
    assert p.next_wave() == [10, 9, 8, 7]
    p.settle(10, OK)
    assert p.next_wave() == [6]


def test_a_refusal_fences_its_entity_but_not_the_others() -> None:
    p = plan([(1, "a"), (2, "a"), (3, "b"), (4, "b")])
    assert sorted(p.next_wave()) == [2, 4]
    p.settle(2, REFUSED)
    p.settle(4, OK)
    assert p.next_wave() == [3]  # step 1 of `a` stays behind the refused step 2
    p.settle(3, OK)
    assert p.done and p.refused == [2] and p.queued == 1


def test_steps_claimed_by_the_same_pass_are_awaited_not_resent() -> None:
    p = CompensationPlan.from_steps([PlannedStep(5, "a", claimed_by_this_pass=True), PlannedStep(3, "a")])
    assert p.next_wave() == []
    p.settle(5, OK)
    assert p.next_wave() == [3]


def test_settling_an_unknown_step_changes_nothing() -> None:
    p = plan([(1, "a")])
    assert p.settle(99, OK) is False
    assert p.next_wave() == [1]


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        plan([(1, "a")], depth=0)
