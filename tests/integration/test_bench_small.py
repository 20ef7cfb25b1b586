"""The benchmarks at small size: each runs, exits 0 and writes its figures (no timed checks)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import bench.machine
from bench import (
    bench_antifragile,
    bench_discard,
    bench_gateway,
    bench_isolation,
    bench_latency,
    bench_relay,
    bench_trip,
)

PERCENTILES = ("p50", "p95", "p99")
CASES = [
    pytest.param(bench_latency, "latency", [
        *(f"rates.0.{k}" for k in ("offered_per_s", "commands", "accepted", "applied", "in_ledger")),
        *(f"rates.0.{span}.{p}" for span in ("mutation_ms", "accepted_to_applied_ms", "accepted_to_ledger_ms",
                                             "applied_to_ledger_ms") for p in PERCENTILES),
        *(f"rates.0.hops_ms.{hop}.{p}" for hop, _, _ in bench_latency.HOPS for p in PERCENTILES),
        "saturation.rate_per_s", "saturation.steps.1.accepted_to_ledger_p99_ms",
    ], id="latency"),
    pytest.param(bench_trip, "trip", [
        "threshold", "writers", "gateways", "total_excess", "max_excess", "all_exact",
    ], id="trip", marks=pytest.mark.postgres),
    pytest.param(bench_discard, "discard", [
        "commands", "discarded", "discard_s", "commands_on_kafka", "events_on_kafka", "run_facts_on_kafka",
    ], id="discard"),
    pytest.param(bench_isolation, "isolation", [
        "offered_per_s", "ratio_p99", "attack.served", "attack.offloaded", "attack.query_cost",
        "limits.max_query_cost", "limits.readers",
        *(f"{phase}_ms.{p}" for phase in ("quiet", "attacked") for p in PERCENTILES),
    ], id="isolation"),
    pytest.param(bench_relay, "relay", [
        "messages", "keys", *(f"{db}.{k}" for db in ("sqlite", "postgresql")
                              for k in ("bare_per_s", "relay_per_s", "ratio")),
        "sqlite.synchronous_normal_per_s", "sqlite.synchronous_full_cost",
    ], id="relay", marks=pytest.mark.postgres),
    pytest.param(bench_antifragile, "antifragile", [
        "seed", "rounds", "escaped_reduction", "worst_good_tripped_share", "target_met", "learned_layers",
    ], id="antifragile"),
]


def lookup(figures: dict[str, Any], path: str) -> Any:
    value: Any = figures
    for part in path.split("."):
        if isinstance(value, list):  # a list's items by index: "rates.0.commands"
            assert part.isdigit() and int(part) < len(value), f"figure {path!r} missing from {figures}"
            value = value[int(part)]
            continue
        assert isinstance(value, dict) and part in value, f"figure {path!r} missing from {figures}"
        value = value[part]
    return value


@pytest.mark.parametrize(("module", "name", "figure_keys"), CASES)
def test_small_run_writes_its_figures(module: ModuleType, name: str, figure_keys: list[str], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Results go to a temp dir so the suite never overwrites figures from a full run.
    monkeypatch.setattr(bench.machine, "RESULTS", tmp_path)

    assert module.main(["--small"]) == 0

    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["benchmark"] == name
    assert result["machine"]["cores"]
    figures = result["figures"]
    assert figures["mode"] == "small"
    for key in figure_keys:
        assert lookup(figures, key) is not None, f"figure {key!r} is empty: {figures}"
    if name == "trip":
        assert [lookup(t, "excess") for t in figures["trials"]] == [0] * len(figures["trials"])
    if name == "antifragile":
        rounds = figures["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        for r in rounds:
            assert r["good_runs"] > 0 and r["rogue_runs"] > 0 and r["escaped_per_rogue_run"] >= 0
        # Round 1 learns from rogue runs the starting policy let through.
        assert rounds[0]["rogue_runs_tripped"] > 0 and rounds[0]["proposals_accepted"] > 0
    if name == "discard":
        assert figures["commands_on_kafka"] == figures["events_on_kafka"] == 0


def test_gateway_small_run_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.machine, "RESULTS", tmp_path)

    assert bench_gateway.main(["--small"]) == 0

    result = json.loads((tmp_path / "gateway.json").read_text())
    assert result["mode"] == "small" and result["database"] == "sqlite"
    for side in ("echo", "gateway", "cached_echo", "synchronous_normal"):
        assert result[side]["per_s"] > 0 and result[side]["failed"] == 0, result[side]
    assert result["gateway"]["outbox_backlog_after"] == 0
    for key in ("ratio", "ratio_vs_cached_echo", "synchronous_full_cost"):
        assert result[key] is not None, key
