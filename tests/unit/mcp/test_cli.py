"""`kinshasa mcp` finds its key: --key-file, else --key or KINSHASA_KEY, else it says how to give one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kinshasa import cli
from kinshasa.kernel import logs
from kinshasa.mcp import stdio

SECRET = "agent-key-from-the-environment"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys `kinshasa mcp` would have served with, instead of serving."""
    keys: list[str] = []

    async def serve(url: str, key: str, settings: Any) -> None:
        keys.append(key)

    monkeypatch.setattr(stdio, "serve_stdio", serve)
    monkeypatch.setattr(logs, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.delenv("KINSHASA_KEY", raising=False)
    return keys


def test_the_key_comes_from_kinshasa_key_or_the_key_option(served: list[str]) -> None:
    runner = CliRunner()
    assert runner.invoke(cli.app, ["mcp"], env={"KINSHASA_KEY": f" {SECRET}\n"}).exit_code == 0
    assert runner.invoke(cli.app, ["mcp", "--key", "from-the-flag"]).exit_code == 0
    assert served == [SECRET, "from-the-flag"]


def test_a_key_file_wins_over_kinshasa_key(served: list[str], tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-the-file\n", encoding="utf-8")
    result = CliRunner().invoke(cli.app, ["mcp", "--key-file", str(key_file)], env={"KINSHASA_KEY": SECRET})
    assert result.exit_code == 0, result.output
    assert served == ["from-the-file"]


def test_without_a_key_it_says_how_to_give_one(served: list[str]) -> None:
    result = CliRunner().invoke(cli.app, ["mcp"], env={"KINSHASA_KEY": "  "})
    assert result.exit_code == 2 and served == []
    assert "error: no key: set KINSHASA_KEY or pass --key-file" in result.output


def test_help_names_the_variable_and_never_shows_its_value(served: list[str]) -> None:
    result = CliRunner().invoke(cli.app, ["mcp", "--help"], env={"KINSHASA_KEY": SECRET})
    assert result.exit_code == 0
    assert "KINSHASA_KEY" in result.output and SECRET not in result.output
