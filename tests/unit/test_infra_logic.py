"""Pure logic of the local infrastructure: clear errors when a tool is missing, settings resolution."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kinshasa.infra.kafka import kafka_libs
from kinshasa.infra.process import InfraError, free_port, pid_alive
from kinshasa.infra.temporal import time_skipping_server
from kinshasa.launcher import StackPlan, StackPorts
from kinshasa.settings import ComponentSettings, ServiceSettings, StackSettings


def test_without_maven_the_error_names_both_alternatives(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no mvn, no java
    with pytest.raises(InfraError) as err:
        kafka_libs(tmp_path / "cache", "4.1.1", None)
    message = str(err.value)
    assert "KAFKA_HOME" in message and "docker compose up" in message and "apt-get install maven" in message


def test_without_maven_the_time_skipping_server_names_the_package(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InfraError, match="apt-get install maven"):
        time_skipping_server(tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.jar"))


def test_kafka_home_without_jars_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="KAFKA_HOME"):
        kafka_libs(tmp_path / "cache", "4.1.1", tmp_path)


def test_kafka_home_with_jars_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / "kafka_2.13-4.1.1.jar").write_bytes(b"")
    assert kafka_libs(tmp_path / "cache", "4.1.1", tmp_path) == tmp_path / "libs"


def test_embedded_default_is_sqlite_per_component(tmp_path: Path) -> None:
    stack = StackSettings(data_dir=tmp_path)
    url = ComponentSettings().resolved_database_url(stack, "gateway")
    assert url == f"sqlite+aiosqlite:///{tmp_path.resolve()}/db/gateway.sqlite3"
    configured = ComponentSettings(database_url="postgresql+asyncpg://u@h/db")
    assert configured.resolved_database_url(stack, "gateway") == "postgresql+asyncpg://u@h/db"


def test_service_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KINSHASA_SVC_LEDGER_DATABASE_URL", "postgresql+asyncpg://u@h/ledger")
    assert ServiceSettings.for_service("ledger").database_url == "postgresql+asyncpg://u@h/ledger"
    assert ServiceSettings.for_service("documents").database_url is None


def test_process_helpers() -> None:
    assert 0 < free_port() < 65536
    assert not pid_alive(2**22 + 12345)


def test_gateway_replicas_share_the_first_gateways_settings_on_their_own_ports(tmp_path: Path) -> None:
    stack = StackSettings(data_dir=tmp_path)
    ports = StackPorts(gateway=9000, gateway_replicas=[9001, 9002])
    plan = StackPlan(stack, ports, postgres_url="postgresql+asyncpg://u@127.0.0.1:5433/kinshasa")
    gateways = {name: env for name, _argv, env in plan.processes() if name.startswith("gateway")}
    assert sorted(gateways) == ["gateway", "gateway-2", "gateway-3"]
    assert [gateways[n]["KINSHASA_GATEWAY_PORT"] for n in ("gateway", "gateway-2", "gateway-3")] == \
        ["9000", "9001", "9002"]
    urls = {env["KINSHASA_GATEWAY_DATABASE_URL"] for env in gateways.values()}
    assert urls == {"postgresql+asyncpg://u@127.0.0.1:5433/kinshasa_gateway"}


def test_gateway_replicas_on_the_embedded_default_are_refused(tmp_path: Path) -> None:
    plan = StackPlan(StackSettings(data_dir=tmp_path), StackPorts(gateway_replicas=[9001]))
    with pytest.raises(ValueError, match="PostgreSQL"):
        plan.processes()


def test_free_ports_are_distinct_and_below_the_range_outgoing_connections_take_theirs_from() -> None:
    from kinshasa.infra.process import _ephemeral_low

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(20_000 <= port < _ephemeral_low() for port in ports)
    for port in ports[:20]:  # each was free when handed out, and still is: nothing here bound it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))

