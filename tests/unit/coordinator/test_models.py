"""Workflow inputs validate what an operator or a replay would get wrong, and backoff grows and is capped."""

from __future__ import annotations

from kinshasa.coordinator.activities import compensate_command, compensate_message_id
from kinshasa.coordinator.models import RevertPolicy
from kinshasa.coordinator.run_ledger import ClaimedStep
from kinshasa.schemas.envelope import deterministic_id, utcnow


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RevertPolicy(backoff_s=1.0, max_backoff_s=5.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]


def test_compensate_command_follows_the_contract() -> None:
    forward = "0b3f2a4e-8d1c-4a43-9a39-0c6a4b7b0a11"
    step = ClaimedStep(step_id=7, attempt=2, forward_event_id=forward,
                       forward_type="documents.rename.applied", service="documents", entity_type="document",
                       entity_id="doc-1")
    env = compensate_command("run-1", step, None, utcnow())
    assert env.type == "documents.rename.compensate"
    assert env.message_id == deterministic_id("compensate", forward, "2") == compensate_message_id(forward, 2)
    assert env.actor.kind == "system" and env.actor.id == "coordinator"
    assert env.entity is not None and env.kafka_key() == b"documents:doc-1"
    assert env.payload == {"forward_event_id": forward, "forward_type": "documents.rename.applied"}
    assert env.run_id == "run-1" and env.correlation_id == "run-1"
