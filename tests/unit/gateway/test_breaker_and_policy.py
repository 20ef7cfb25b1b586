"""Pure gateway logic: breaker verdicts, policy layering, principals, generated argument types."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

from kinshasa.gateway import store
from kinshasa.gateway.breaker import check_write
from kinshasa.gateway.graphql import Long, build_schema
from kinshasa.gateway.policy import BUILTIN, Layer, PolicyDocument, resolve
from kinshasa.gateway.principals import PrincipalRegistry, hash_key, load_registry
from kinshasa.gateway.runs import RunRecord
from kinshasa.services.registry import example_catalogue

CATALOGUE = example_catalogue()


def _run(**changes: object) -> RunRecord:
    base = dict(
        run_id="r",
        agent_id="a",
        entry_point="e",
        purpose=None,
        status=store.RUNNING,
        started_at=datetime.now(UTC),
        finished_at=None,
        breaker_state=store.CLOSED,
        writes=0,
        errors=0,
        services=(),
        probes_left=0,
        tripped_reason=None,
        tripped_at=None,
        trip_count=0,
        on_hold=False,
        published=0,
        applied=0,
        compensated=0,
        revert_reason=None,
        revert_requested_at=None,
    )
    base.update(changes)
    return RunRecord(**base)  # type: ignore[arg-type]


POLICY = resolve([Layer(PolicyDocument(max_writes=3, max_velocity=2, max_services=1, max_errors=0), True)], 1)


def test_limits_are_the_most_allowed() -> None:
    assert check_write(_run(writes=2), POLICY, "documents", recent=0).accept
    verdict = check_write(_run(writes=3), POLICY, "documents", recent=0)
    assert not verdict.accept and verdict.trip is not None and verdict.trip.threshold == "writes"
    assert check_write(_run(), POLICY, "documents", recent=2).trip.threshold == "velocity"  # type: ignore[union-attr]
    assert check_write(_run(services=("ledger",)), POLICY, "documents", 0).trip.threshold == "services"  # type: ignore[union-attr]
    assert check_write(_run(services=("ledger",)), POLICY, "ledger", 0).accept
    assert check_write(_run(errors=1), POLICY, "documents", 0).trip.threshold == "errors"  # type: ignore[union-attr]


def test_open_refuses_without_tripping_again_and_half_open_counts_probes() -> None:
    assert check_write(_run(breaker_state=store.OPEN), POLICY, "documents", 0).trip is None
    probe = check_write(_run(breaker_state=store.HALF_OPEN, probes_left=1, writes=99), POLICY, "documents", 0)
    assert probe.accept and probe.probe
    assert not check_write(_run(breaker_state=store.HALF_OPEN, probes_left=0), POLICY, "documents", 0).accept


def test_policy_layers_resolve_to_the_strictest_and_windows_merge() -> None:
    layered = resolve(
        [
            Layer(PolicyDocument(max_writes=10, operation_windows={"a.b": 1, "c.d": 0}), replaces=True),
            Layer(PolicyDocument(max_writes=5, operation_windows={"c.d": 0})),
        ],
        3,
    )
    assert layered.max_writes == 5 and layered.version == 3
    assert layered.window_for("a.b") == 1 and layered.window_for("c.d") == 0
    assert layered.window_for("x.y") == BUILTIN.quarantine_window_s


def test_keys_are_hashed_and_dev_credentials_are_private(tmp_path: Path) -> None:
    registry = PrincipalRegistry.from_document(
        {"principals": [{"id": "a", "kind": "agent", "key_sha256": hash_key("secret")}]}
    )
    assert registry.authenticate("secret") is not None and registry.authenticate("other") is None
    generated = load_registry(None, tmp_path, dev_mode=True)
    path = tmp_path / "credentials.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    keys = [p["key"] for p in json.loads(path.read_text())["principals"]]
    assert {generated.authenticate(k).kind for k in keys} == {"agent", "operator"}  # type: ignore[union-attr]


def test_generated_mutations_follow_the_catalogue() -> None:
    sdl = str(build_schema(CATALOGUE, dev_mode=True, extensions=[]))
    for spec in CATALOGUE:
        assert f"  {spec.graphql_name}(runId: ID!" in sdl
    keyed = "idempotencyKey: String = null): CommandReceipt!"
    assert f"renameDocument(runId: ID!, documentId: ID!, title: String!, {keyed}" in sdl
    assert f"createDocument(runId: ID!, input: CreateDocumentInput!, {keyed}" in sdl
    assert "amountCents: Long!" in sdl and Long.__name__ == "Long"
