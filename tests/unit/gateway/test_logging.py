"""The gateway process logs through the kernel's formatter, uvicorn's own lines included."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from kinshasa.gateway import app as gateway_app
from kinshasa.gateway import cli
from kinshasa.kernel.logs import log_context
from kinshasa.schemas.envelope import Actor


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, log_format: str) -> dict[str, Any]:
    """Run `kinshasa gateway serve` with uvicorn's Server replaced by one that logs instead of serving; the
    real `uvicorn.Config` is built, so uvicorn's logging options apply exactly as when serving."""
    monkeypatch.setenv("KINSHASA_LOG_FORMAT", log_format)
    monkeypatch.setenv("KINSHASA_LOG_LEVEL", "INFO")
    monkeypatch.setenv("KINSHASA_DATA_DIR", str(tmp_path))
    fake = SimpleNamespace(app=FastAPI(), settings=SimpleNamespace(host="127.0.0.1", port=0))
    monkeypatch.setattr(gateway_app, "bootstrap", lambda stack: fake)
    called: dict[str, Any] = {}

    class Server:
        def __init__(self, config: uvicorn.Config) -> None:
            called.update(log_config=config.log_config, access_log=config.access_log)
            self.started = True
            self.should_exit = False

        def run(self) -> None:
            logging.getLogger("uvicorn.error").info("Uvicorn running on %s", "http://127.0.0.1:8000")
            with log_context(run_id="run-7", actor=Actor(kind="agent", id="agent-1")):
                logging.getLogger("kinshasa.gateway.listener").warning("breaker tripped: %s", "writes 3 > 2")

    monkeypatch.setattr(cli.uvicorn, "Server", Server)
    cli.serve()
    return called


def test_the_gateway_logs_json_lines_with_run_context_when_log_format_is_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = _serve(monkeypatch, tmp_path, "json")
    assert options["log_config"] is None and options["access_log"] is False
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    by_logger = {line["logger"]: line for line in lines}
    uvicorn_line = by_logger["uvicorn.error"]
    assert uvicorn_line["component"] == "gateway" and uvicorn_line["level"] == "info"
    assert uvicorn_line["message"] == "Uvicorn running on http://127.0.0.1:8000"
    gateway_line = by_logger["kinshasa.gateway.listener"]
    assert gateway_line["component"] == "gateway" and gateway_line["level"] == "warning"
    assert (gateway_line["run_id"], gateway_line["actor"]) == ("run-7", "agent:agent-1")
    assert gateway_line["message"] == "breaker tripped: writes 3 > 2" and gateway_line["ts"]


def test_the_gateway_logs_console_lines_when_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _serve(monkeypatch, tmp_path, "console")
    err = capsys.readouterr().err.splitlines()
    assert "INFO    Uvicorn running on http://127.0.0.1:8000" in err
    assert "WARNING breaker tripped: writes 3 > 2  [run_id=run-7 actor=agent:agent-1]" in err
