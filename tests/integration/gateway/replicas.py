"""Gateway replicas as real processes (`python -m kinshasa.gateway serve`) sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kinshasa.infra.process import free_port
from tests.conftest import REPO, _create_database


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


@dataclass
class Replicas:
    gateways: list[Replica]
    database_url: str

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]


def _spawn(tmp: Path, name: str, env: Mapping[str, str]) -> Replica:
    port = free_port()
    log = tmp / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "kinshasa.gateway", "serve"],
        cwd=REPO,
        env={**os.environ, **env, "KINSHASA_GATEWAY_PORT": str(port)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Replica(process, f"http://127.0.0.1:{port}", log)


def _wait_ready(replica: Replica) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{replica.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{replica.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"gateway at {replica.url} never became healthy:\n{replica.log.read_text()[-3000:]}")


@asynccontextmanager
async def gateway_replicas(
    postgres: Any,
    bootstrap: str,
    tmp: Path,
    catalogue: str,
    principals: dict[str, Any],
    extra_env: list[dict[str, str]],
) -> AsyncIterator[Replicas]:
    """One gateway process per entry of `extra_env` (its own settings on top of the shared ones)."""
    database_url = await _create_database(postgres, f"t_{uuid.uuid4().hex[:12]}")
    (tmp / "credentials.json").write_text(json.dumps(principals))
    shared = {
        "KINSHASA_DATA_DIR": str(tmp / "data"),
        "KINSHASA_KAFKA_BOOTSTRAP": bootstrap,
        "KINSHASA_GATEWAY_CATALOGUE_TOPIC": catalogue,
        "KINSHASA_GATEWAY_DATABASE_URL": database_url,
        "KINSHASA_GATEWAY_CREDENTIALS_FILE": str(tmp / "credentials.json"),
        "KINSHASA_GATEWAY_HOST": "127.0.0.1",
        "KINSHASA_LOG_LEVEL": "WARNING",
    }
    started = [_spawn(tmp, f"gw{i}", {**shared, **extra}) for i, extra in enumerate(extra_env)]
    try:
        for replica in started:
            await asyncio.to_thread(_wait_ready, replica)
        yield Replicas(started, database_url)
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.terminate()
        for replica in started:
            try:
                await asyncio.to_thread(replica.process.wait, 20)
            except subprocess.TimeoutExpired:
                replica.process.kill()


async def post(
    client: httpx.AsyncClient, url: str, key: str, query: str, variables: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = await client.post(
        f"{url}/graphql",
        json={"query": query, "variables": variables or {}},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
