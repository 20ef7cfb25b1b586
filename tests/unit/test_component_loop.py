"""Every component process runs on uvloop and parses HTTP with httptools (kernel/component.py)."""

from __future__ import annotations

import asyncio

import uvicorn
import uvloop
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kinshasa.gateway.cli import UVICORN_LOGGING
from kinshasa.kernel.component import http_server, run_component


def test_a_components_main_coroutine_runs_on_uvloop() -> None:
    async def main() -> type[asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    assert issubclass(run_component(main()), uvloop.Loop)


def test_the_gateway_and_the_components_http_servers_run_on_uvloop_and_parse_with_httptools() -> None:
    app = FastAPI()
    for config in (uvicorn.Config(app, **UVICORN_LOGGING), http_server(app, "127.0.0.1", 0).config):
        config.load()
        assert config.http_protocol_class is HttpToolsProtocol
        assert config.get_loop_factory() is uvloop.new_event_loop
