"""`kinshasa gateway serve` shuts uvicorn down and exits non-zero when the supervisor gives up on a task."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
import uvicorn
from fastapi import FastAPI

from kinshasa.gateway import app as gateway_app
from kinshasa.gateway import cli
from kinshasa.kernel.supervisor import GaveUp


def _serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, give_up: bool, servers: list[Any]) -> None:
    monkeypatch.setenv("KINSHASA_DATA_DIR", str(tmp_path))
    fake = SimpleNamespace(app=FastAPI(), settings=SimpleNamespace(host="127.0.0.1", port=0), on_give_up=None)
    monkeypatch.setattr(gateway_app, "bootstrap", lambda stack: fake)
    class Server:
        def __init__(self, config: uvicorn.Config) -> None:
            self.started = True
            self.should_exit = False
            servers.append(self)

        def run(self) -> None:
            # What the gateway's supervisor does from inside the served app when a role is given up on.
            if give_up:
                fake.on_give_up(GaveUp("listener", "it died 21 times within 300 s", "ConsumerError: x"))

    monkeypatch.setattr(cli.uvicorn, "Server", Server)
    cli.serve()


def test_a_give_up_stops_the_server_and_exits_with_code_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servers: list[Any] = []
    with pytest.raises(typer.Exit) as exited:
        _serve(monkeypatch, tmp_path, True, servers)
    assert exited.value.exit_code == 1 and servers[0].should_exit is True
    assert "role listener is not restarted" in capsys.readouterr().err


def test_a_clean_stop_exits_normally(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    servers: list[Any] = []
    _serve(monkeypatch, tmp_path, False, servers)
    assert servers[0].should_exit is False
