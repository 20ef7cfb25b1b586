"""Pure decisions of the write path: policy layers resolved to the strictest, read scopes and entry points,
agent budgets and idempotency keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kinshasa.gateway.budgets import WINDOW_S, opens_breach, over, writes_retry_after
from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.idempotency import REUSED, Remembered, check_key, digest
from kinshasa.gateway.policy import (
    BUILTIN,
    Layer,
    PolicyDocument,
    PolicyScope,
    PolicyVersion,
    resolve,
    scope_problems,
)
from kinshasa.gateway.principals import CredentialsError, Principal, PrincipalRegistry, load_registry

DEFAULT = Layer(PolicyDocument(max_writes=100, quarantine_window_s=10), replaces=True)


def _tighten(**fields: object) -> Layer:
    return Layer(PolicyDocument.model_validate(fields))


def _loosen(**fields: object) -> Layer:
    return Layer(PolicyDocument.model_validate(fields), replaces=True)


def test_an_entry_point_layer_cannot_loosen_the_agents_limit() -> None:
    agent, entry = _tighten(max_writes=5), _tighten(max_writes=50)
    assert resolve([DEFAULT, agent, entry], 1).max_writes == 5
    # Tighter than the agent's: the entry point's limit applies.
    assert resolve([DEFAULT, agent, _tighten(max_writes=2)], 1).max_writes == 2


def test_loosen_lets_a_layer_replace_what_lies_below() -> None:
    assert resolve([DEFAULT, _tighten(max_writes=5), _loosen(max_writes=50)], 1).max_writes == 50
    # Only the fields the loosening layer names: the rest stay the strictest.
    policy = resolve([DEFAULT, _tighten(max_writes=5, max_errors=1), _loosen(max_writes=50)], 1)
    assert policy.max_errors == 1


def test_the_default_layer_sets_the_base_even_looser_than_built_in() -> None:
    assert resolve([_loosen(max_writes=10_000)], 1).max_writes == 10_000
    assert resolve([], 0).max_writes == BUILTIN.max_writes


def test_stricter_per_field() -> None:
    base = _loosen(
        max_velocity=100, velocity_window_s=60, probe_writes=3, auto_revert=False, hold_timeout_s=3600
    )
    policy = resolve(
        [
            base,
            _tighten(
                max_velocity=10, velocity_window_s=1, probe_writes=5, auto_revert=True, hold_timeout_s=60
            ),
        ],
        1,
    )
    # 10 writes per 60 s admits nothing that 10 per 1 s or 100 per 60 s would refuse.
    assert (policy.max_velocity, policy.velocity_window_s) == (10, 60)
    assert policy.probe_writes == 3
    assert policy.auto_revert is True
    assert policy.hold_timeout_s == 60
    # auto_revert: a layer saying false does not switch off what the layer below switched on.
    assert resolve([_loosen(auto_revert=True), _tighten(auto_revert=False)], 1).auto_revert is True
    # No hold timeout is the loosest: any timeout is stricter.
    assert resolve([_tighten(hold_timeout_s=120)], 1).hold_timeout_s == 120


def test_budgets_are_unlimited_until_set_and_resolve_to_the_lowest() -> None:
    policy = resolve([], 0)
    assert (policy.max_concurrent_runs, policy.max_runs_per_hour, policy.max_agent_writes_per_hour) == (
        None,
        None,
        None,
    )
    policy = resolve(
        [_loosen(max_runs_per_hour=100), _tighten(max_runs_per_hour=10, max_concurrent_runs=3)], 1
    )
    assert policy.max_runs_per_hour == 10 and policy.max_concurrent_runs == 3 and policy.has_run_budget
    assert (
        resolve([_loosen(max_runs_per_hour=10), _tighten(max_runs_per_hour=100)], 1).max_runs_per_hour == 10
    )


def test_budgets_belong_to_default_and_agent_scopes() -> None:
    document = PolicyDocument(max_agent_writes_per_hour=5, max_writes=3)
    assert scope_problems(PolicyScope.AGENT, document) == []
    assert scope_problems(PolicyScope.DEFAULT, document) == []
    assert [name for name, _ in scope_problems(PolicyScope.ENTRY_POINT, document)] == [
        "max_agent_writes_per_hour"
    ]


def test_windows_tighten_to_the_longer_quarantine() -> None:
    # A tighter layer's general window floors every operation, an override from below included.
    policy = resolve(
        [_loosen(quarantine_window_s=5, operation_windows={"a.x": 0}), _tighten(quarantine_window_s=30)], 1
    )
    assert policy.window_for("a.x") == 30 and policy.window_for("b.y") == 30
    assert policy.quarantine_window_s == 30
    # A tighter layer's override cannot shorten below what the operation had, its declared default included.
    policy = resolve([_loosen(quarantine_window_s=5), _tighten(operation_windows={"a.x": 1})], 1)
    assert policy.window_for("a.x", declared=60) == 60
    assert policy.window_for("a.x") == 5
    # ... and it lengthens when it asks for more; a layer's own override beats its own general window.
    policy = resolve(
        [_loosen(quarantine_window_s=5), _tighten(quarantine_window_s=30, operation_windows={"a.x": 20})], 1
    )
    assert policy.window_for("a.x") == 20 and policy.window_for("b.y") == 30
    assert policy.operation_windows == {"a.x": 20}
    # A shorter general window in a tightening layer changes nothing.
    assert (
        resolve([_loosen(quarantine_window_s=30), _tighten(quarantine_window_s=1)], 1).window_for("a.x") == 30
    )


def test_windows_loosen_only_when_asked() -> None:
    policy = resolve([_loosen(quarantine_window_s=30), _loosen(operation_windows={"a.x": 0})], 1)
    assert policy.window_for("a.x", declared=60) == 0  # an operator's override may go below declared
    assert policy.window_for("b.y", declared=60) == 60
    assert (
        resolve([_loosen(quarantine_window_s=30), _loosen(quarantine_window_s=2)], 1).window_for("b.y") == 2
    )


def test_a_versions_layer_replaces_only_for_default_or_loosen() -> None:
    now = datetime.now(UTC)
    doc = PolicyDocument(max_writes=1)
    version = PolicyVersion(1, PolicyScope.AGENT, "a", doc, "op", "why", now)
    assert not version.layer.replaces
    assert PolicyVersion(1, PolicyScope.AGENT, "a", doc, "op", "why", now, loosen=True).layer.replaces
    assert PolicyVersion(1, PolicyScope.DEFAULT, "", doc, "op", "why", now).layer.replaces


def test_read_scopes_are_service_read_globs() -> None:
    writer = Principal("a", "agent", frozenset({"documents.*"}))
    reader = Principal("b", "agent", frozenset({"documents:read"}))
    everything = Principal("c", "agent", frozenset({"*"}))
    all_reads = Principal("d", "agent", frozenset({"*:read"}))
    operator = Principal("o", "operator", frozenset())
    assert not writer.may_read("documents")
    assert reader.may_read("documents") and not reader.may_read("ledger")
    assert everything.may_read("ledger") and all_reads.may_read("ledger")
    assert operator.may_read("ledger")


def test_the_dev_agent_reads_every_service_at_any_entry_point(tmp_path: Path) -> None:
    registry = load_registry(None, tmp_path, dev_mode=True)
    agent = next(p for p in registry.principals if p.is_agent)
    assert agent.may_read("any-service") and agent.may_start_at("anywhere")


def test_entry_points_come_from_the_credentials() -> None:
    registry = PrincipalRegistry.from_document(
        {
            "principals": [
                {"id": "a", "kind": "agent", "key": "k1", "entryPoints": ["support-bot", " nightly "]},
                {"id": "b", "kind": "agent", "key": "k2"},
            ]
        }
    )
    bounded, free = registry.authenticate("k1"), registry.authenticate("k2")
    assert bounded is not None and free is not None
    assert bounded.may_start_at("nightly") and not bounded.may_start_at("other")
    assert free.entry_points is None and free.may_start_at("anything")
    for bad in ("support-bot", [""], [1]):
        with pytest.raises(CredentialsError, match="entryPoints"):
            PrincipalRegistry.from_document(
                {"principals": [{"id": "a", "kind": "agent", "key": "k", "entryPoints": bad}]}
            )


def test_budget_decisions() -> None:
    assert not over(4, 5) and over(5, 5) and not over(10**6, None)
    now = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert opens_breach(None, now)
    assert not opens_breach(now - timedelta(seconds=WINDOW_S - 1), now)
    assert opens_breach(now - timedelta(seconds=WINDOW_S), now)
    minute = int(now.timestamp() // 60)
    # 3 writes 60 minutes ago (they count until the end of the 61st minute) and 2 now, limit 5:
    # room again once the old minute ages out, 30 s from now.
    assert writes_retry_after([(minute - 60, 3), (minute, 2)], 5, now) == 30
    # Limit 2 with 2 written this minute: one hour and a minute from this minute's start.
    assert writes_retry_after([(minute, 2)], 2, now) == 3660 - 30


def test_idempotency_keys() -> None:
    assert check_key(None) is None and check_key("k") == "k"
    for bad in ("", "x" * 256):
        with pytest.raises(Invalid):
            check_key(bad)
    first = digest("createDocument", {"runId": "r", "input": {"title": "t", "body": None}})
    assert first == digest("createDocument", {"input": {"body": None, "title": "t"}, "runId": "r"})
    remembered = Remembered(first, {"command_id": "c"})
    assert remembered.replay(first) == {"command_id": "c"}
    with pytest.raises(Invalid, match=REUSED):
        remembered.replay(digest("createDocument", {"runId": "r", "input": {"title": "other"}}))
