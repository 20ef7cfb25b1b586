"""Every component process runs on uvloop and parses HTTP with httptools (kernel/component.py)."""

from __future__ import annotations

import asyncio
import gc

import uvicorn
import uvloop
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kinshasa.gateway.cli import UVICORN_LOGGING
from kinshasa.kernel.component import http_server, run_component, serve_until_signalled


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


def test_a_component_freezes_its_startup_heap_once_it_is_ready_and_not_before() -> None:
    """Full collections then skip what the process built at start (`freeze_startup_heap`)."""
    seen: list[int] = []

    async def run(stop: asyncio.Event) -> None:
        seen.append(gc.get_freeze_count())  # still starting: nothing frozen yet
        ready.set()
        for _ in range(100):  # a few turns of the loop: the freezing task runs on the next
            await asyncio.sleep(0)
            if gc.get_freeze_count():
                break
        seen.append(gc.get_freeze_count())

    gc.unfreeze()
    ready = asyncio.Event()
    try:
        run_component(serve_until_signalled(run, ready))
        assert seen[0] == 0 and seen[1] > 1000
    finally:
        gc.unfreeze()
