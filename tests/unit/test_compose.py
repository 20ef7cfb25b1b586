"""docker-compose.yml names the same processes, commands and settings keys as the code."""

from __future__ import annotations

from pathlib import Path

import typer.main
import yaml

from kinshasa.cli import app
from kinshasa.settings import SERVICE_NAMES, StackSettings, env_keys, process_env_keys

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
