"""A private Kafka broker and one gateway process, as the gateway-only benchmarks start them."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".kinshasa" / "cache"


def start_gateway(root: Path, cleanup: contextlib.ExitStack, principals: list[dict[str, Any]],
                  env: dict[str, str] | None = None) -> tuple[str, str]:
    """Kafka, the example services' declarations on it, and one gateway process knowing `principals`;
    `env` adds to the gateway's environment. Returns the gateway's base URL and the Kafka bootstrap."""
    from kinshasa.infra.kafka import KafkaBroker, kafka_libs
    from kinshasa.infra.process import ManagedProcess, free_port, wait_until
    from kinshasa.services.registry import publish_example_declarations
    from kinshasa.settings import InfraSettings

    infra = InfraSettings()
    kafka = KafkaBroker(root=root / "kafka", libs=kafka_libs(CACHE, infra.kafka_version, infra.kafka_home),
                        port=free_port(), controller_port=free_port())
    cleanup.callback(kafka.stop)
    kafka.start(attached=True)
    # The gateway learns the example services from their declarations, as when they start beside it.
    publish_example_declarations(kafka.bootstrap)
    credentials = root / "credentials.json"
    credentials.write_text(json.dumps({"principals": principals}))
    port = free_port()
    process = ManagedProcess(
        name="gateway", argv=[sys.executable, "-m", "kinshasa.gateway", "serve"], cwd=REPO,
        env=os.environ | {
            "KINSHASA_DATA_DIR": str(root / "data"),
            "KINSHASA_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "KINSHASA_LOG_LEVEL": "WARNING",
            "KINSHASA_GATEWAY_CREDENTIALS_FILE": str(credentials),
            "KINSHASA_GATEWAY_HOST": "127.0.0.1",
            "KINSHASA_GATEWAY_PORT": str(port),
        } | (env or {}),
        log_path=root / "logs" / "gateway.log", pid_path=root / "gateway.pid")
    cleanup.callback(process.stop)
    process.start(attached=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, process, 120, "gateway")
    return url, kafka.bootstrap
