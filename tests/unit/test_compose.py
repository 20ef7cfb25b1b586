"""docker-compose.yml names the same processes, commands and settings keys as the code."""

from __future__ import annotations

from pathlib import Path

import typer.main
import yaml

from kinshasa.cli import app
from kinshasa.launcher import process_env_keys
from kinshasa.settings import SERVICE_NAMES, StackSettings, env_keys

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def _kinshasa_services() -> dict[str, dict]:
    doc = yaml.safe_load(COMPOSE.read_text())
    return {name: svc for name, svc in doc["services"].items() if svc.get("build") == "."}


def _process_of(command: list[str]) -> str:
    return command[1] if command[0] == "service" else command[0]


def test_every_component_has_a_compose_service() -> None:
    processes = {_process_of(svc["command"]) for svc in _kinshasa_services().values()}
    assert {"gateway", "coordinator", *SERVICE_NAMES} <= processes


def test_compose_env_keys_are_settings_the_process_reads() -> None:
    allowed = process_env_keys()
    shared = env_keys(StackSettings)
    for name, svc in _kinshasa_services().items():
        process = _process_of(svc["command"])
        keys = set(svc.get("environment", {}))
        unknown = keys - allowed.get(process, shared)
        assert not unknown, f"compose service {name} sets keys its settings do not read: {unknown}"


def test_compose_commands_exist_in_the_cli() -> None:
    group = typer.main.get_command(app)
    commands = set(group.commands)  # type: ignore[attr-defined]
    for name, svc in _kinshasa_services().items():
        assert svc["command"][0] in commands, f"compose service {name} runs an unknown command"


def test_settings_keys_catch_a_typo() -> None:
    # The check above must be able to fail: a misspelt key is not among the gateway's keys.
    assert "KINSHASA_GATEWAY_DATABSE_URL" not in process_env_keys()["gateway"]
    assert "KINSHASA_GATEWAY_DATABASE_URL" in process_env_keys()["gateway"]


def _doc() -> dict:
    document: dict = yaml.safe_load(COMPOSE.read_text())
    return document


def test_compose_runs_as_production_with_only_the_gateway_published() -> None:
    services = _doc()["services"]
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"gateway"}
    gateway_env = services["gateway"]["environment"]
    assert gateway_env["KINSHASA_GATEWAY_DEV_MODE"] == "false"
    assert gateway_env["KINSHASA_GATEWAY_CREDENTIALS_FILE"].startswith("/run/secrets/")
    dev = yaml.safe_load((COMPOSE.parent / "docker-compose.dev.yml").read_text())
    assert dev["services"]["gateway"]["environment"]["KINSHASA_GATEWAY_DEV_MODE"] == "true"


def test_each_container_mounts_only_what_it_needs() -> None:
    services = _kinshasa_services()
    owners: dict[str, list[str]] = {}
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            owners.setdefault(str(mount).split(":", 1)[0], []).append(name)
    shared = {volume: names for volume, names in owners.items() if len(names) > 1}
    assert shared == {}, f"volumes mounted by several containers: {shared}"
    with_credentials = {name for name, svc in services.items()
                        if any(s.get("source") == "credentials" for s in svc.get("secrets", []))}
    assert with_credentials == {"gateway"}


def test_production_topics_are_three_replicas_made_before_any_component_starts() -> None:
    services = _doc()["services"]
    brokers = [svc for svc in services.values() if str(svc.get("image", "")).startswith("apache/kafka")]
    assert len(brokers) == 3
    for broker in brokers:
        assert (broker["environment"]["KAFKA_DEFAULT_REPLICATION_FACTOR"],
                broker["environment"]["KAFKA_MIN_INSYNC_REPLICAS"]) == ("3", "2")
    assert services["topics"]["command"] == ["topics", "ensure"]
    for name, svc in _kinshasa_services().items():
        if name == "smtp-sink":
            continue  # no Kafka
        # Components check against three replicas; `topics ensure` creates with them.
        assert svc["environment"]["KINSHASA_MIN_REPLICATION"] == "3", name
        assert svc["environment"]["KINSHASA_KAFKA_BOOTSTRAP"].count(",") == 2, name
        if name != "topics":
            assert svc["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name
