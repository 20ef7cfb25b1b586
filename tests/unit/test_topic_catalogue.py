"""The topic catalogue names every topic and group correctly, refuses bad names, and compares topics."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kinshasa.settings import SERVICE_NAMES
from kinshasa.topics.admin import TopicMismatch, TopicState, compare
from kinshasa.topics.catalogue import (
    ALERTS,
    CATALOGUE,
    RUNS,
    TopicNameError,
    TopicSpec,
    catalogue,
    check_topic_name,
    commands_topic,
    default_groups,
    dlq_topic,
    events_topic,
    events_topic_pattern,
    group_id,
)

PACKAGE = Path(__file__).resolve().parents[2] / "kinshasa"


def test_names_follow_the_architecture() -> None:
    assert commands_topic("documents") == "kinshasa.commands.documents"
    assert events_topic("ledger") == "kinshasa.events.ledger"
    assert RUNS == "kinshasa.runs"
    assert ALERTS == "kinshasa.alerts"
    assert group_id("documents") == "kinshasa.svc.documents"
    assert group_id("gateway") == "kinshasa.gateway"
    assert group_id("coordinator") == "kinshasa.coordinator"
    assert group_id("coordinator", "projector") == "kinshasa.coordinator.projector"
    assert dlq_topic(group_id("documents")) == "kinshasa.svc.documents.dlq"
    assert dlq_topic(group_id("gateway")) == "kinshasa.gateway.dlq"


def test_default_catalogue_has_every_topic_once() -> None:
    specs = catalogue()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    expected = {commands_topic(s) for s in SERVICE_NAMES} | {events_topic(s) for s in SERVICE_NAMES}
    expected |= {RUNS, ALERTS, CATALOGUE} | {dlq_topic(g) for g in default_groups()}
    assert set(names) == expected
    assert len(default_groups()) == len(SERVICE_NAMES) + 2


def test_partitions_keys_and_retention() -> None:
    by_name = {s.name: s for s in catalogue()}
    for service in SERVICE_NAMES:
        for name in (commands_topic(service), events_topic(service)):
            spec = by_name[name]
            assert spec.partitions == 6
            assert spec.keyed_by == "entity"
            # The ledger replays the log from the start: nothing may expire.
            assert spec.configs["retention.ms"] == "-1"
            assert spec.configs["cleanup.policy"] == "delete"
    assert by_name[RUNS].partitions == 3
    assert by_name[RUNS].keyed_by == "run"
    assert by_name[RUNS].configs["retention.ms"] == "-1"
    assert by_name[ALERTS].partitions == 1
    # One partition, compacted, kept: a gateway starting late reads every service's newest declaration.
    assert by_name[CATALOGUE].partitions == 1
    assert by_name[CATALOGUE].keyed_by == "service"
    assert by_name[CATALOGUE].configs["cleanup.policy"] == "compact"
    for group in default_groups():
        dlq = by_name[dlq_topic(group)]
        assert dlq.partitions == 1
        assert dlq.keyed_by == "group"
        assert dlq.configs["retention.ms"] == "-1"
    assert all(s.configs["min.insync.replicas"] == "1" for s in by_name.values())
    assert all(s.description for s in by_name.values())


def test_min_insync_replicas_is_configurable() -> None:
    assert {s.configs["min.insync.replicas"] for s in catalogue(min_insync_replicas=2)} == {"2"}
    with pytest.raises(ValueError, match="at least 1"):
        catalogue(min_insync_replicas=0)


def test_custom_services_and_groups() -> None:
    specs = catalogue(services=["billing"], groups=[group_id("billing"), group_id("coordinator", "alerts")])
    assert [s.name for s in specs] == [
        "kinshasa.commands.billing", "kinshasa.events.billing", RUNS, ALERTS, CATALOGUE,
        "kinshasa.svc.billing.dlq", "kinshasa.coordinator.alerts.dlq",
    ]


@pytest.mark.parametrize("bad", ["", "Documents", "docs.v2", "docs-v2", "9lives", "a" * 49, "gateway",
                                 "coordinator", "docs v2"])
def test_bad_service_names_are_refused(bad: str) -> None:
    with pytest.raises(TopicNameError):
        commands_topic(bad)
    with pytest.raises(TopicNameError):
        group_id(bad) if bad not in ("gateway", "coordinator") else catalogue(services=[bad])


def test_bad_groups_roles_and_topics_are_refused() -> None:
    with pytest.raises(TopicNameError, match="group_id"):
        dlq_topic("my-group")
    with pytest.raises(TopicNameError):
        group_id("coordinator", "Bad.Role")
    for bad in ("", ".", "..", "has space", "x" * 250, "ünicode"):
        with pytest.raises(TopicNameError):
            check_topic_name(bad)
    with pytest.raises(TopicNameError):
        TopicSpec("has space", 1)
    with pytest.raises(TopicNameError, match="partitions"):
        TopicSpec("ok", 0)
    with pytest.raises(TypeError, match="string"):
        TopicSpec("ok", 1, {"retention.ms": -1})  # type: ignore[dict-item]


def test_duplicates_and_dot_underscore_collisions_are_refused() -> None:
    with pytest.raises(TopicNameError, match="duplicate"):
        catalogue(services=["documents", "documents"])
    with pytest.raises(TopicNameError, match="collide"):
        catalogue(services=["a"], groups=[group_id("a"), group_id("a")])
    # Kafka folds '.' and '_' together in metric names.
    with pytest.raises(TopicNameError, match="collide"):
        catalogue(services=["a"], groups=["kinshasa.svc.a_b", "kinshasa.svc.a.b"])


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_topic_names_are_spelled_only_in_the_catalogue() -> None:
    # Docstrings may show names as examples; code must ask the catalogue.
    spelled = re.compile(r"^kinshasa\.(commands|events|runs|alerts|svc)\b")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in PACKAGE.rglob("*.py") if path != PACKAGE / "topics" / "catalogue.py"
        for line, text in _string_literals(path) if spelled.match(text)
    ]
    assert offenders == [], "use kinshasa.topics.catalogue instead of spelling topic names"


def _state(partitions: int = 6, replicas: int = 1, configs: dict[str, str] | None = None) -> TopicState:
    base = {"cleanup.policy": "delete", "retention.ms": "-1", "min.insync.replicas": "1",
            "segment.bytes": "1073741824"}
    return TopicState("t", partitions, replicas, {**base, **(configs or {})})


def test_compare_matching_topic_has_no_mismatch() -> None:
    spec = TopicSpec("t", 6, {"cleanup.policy": "delete", "retention.ms": "-1"})
    assert compare(spec, _state()) == []
    assert compare(spec, _state(), replication_factor=1) == []


def test_compare_reports_partitions_configs_and_replication() -> None:
    spec = TopicSpec("t", 6, {"retention.ms": "-1", "cleanup.policy": "delete",
                              "max.message.bytes": "2000000"})
    drifted = _state(partitions=3, replicas=1, configs={"retention.ms": "604800000"})
    found = compare(spec, drifted, replication_factor=3)
    assert found == [
        TopicMismatch("t", "partitions", "6", "3"),
        TopicMismatch("t", "replication_factor", "3", "1"),
        TopicMismatch("t", "max.message.bytes", "2000000", None),
        TopicMismatch("t", "retention.ms", "-1", "604800000"),
    ]
    assert "partitions is 3 on the broker, the catalogue says 6" in found[0].line()


def test_compare_ignores_configs_the_catalogue_does_not_name() -> None:
    spec = TopicSpec("t", 6, {"retention.ms": "-1"})
    assert compare(spec, _state(configs={"segment.bytes": "1"})) == []


def test_the_events_pattern_matches_every_service_and_only_its_own_copies() -> None:
    import re

    plain, isolated = events_topic_pattern(), events_topic_pattern("t1")
    assert re.match(plain, "kinshasa.events.documents") and re.match(plain, "kinshasa.events.tickets_v2")
    assert not re.match(plain, "kinshasa.events.documents.t1")
    assert not re.match(plain, "kinshasa.commands.documents")
    assert re.match(isolated, "kinshasa.events.inventory.t1")
    assert (not re.match(isolated, "kinshasa.events.inventory")
            and not re.match(isolated, "kinshasa.events.x.t2"))
