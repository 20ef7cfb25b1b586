"""The gateway process's settings: GatewaySettings plus its read backends and its hardening limits."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from kinshasa.settings import GatewaySettings, env_keys


class GatewayConfig(GatewaySettings):
    """Read once in bootstrap (env prefix `KINSHASA_GATEWAY_`) and passed down; nothing else reads the env."""

    model_config = SettingsConfigDict(env_prefix="KINSHASA_GATEWAY_", extra="ignore")

    # Read APIs of the services, by service name: {"documents": "http://127.0.0.1:8101", ...} (JSON in env).
    service_urls: dict[str, str] = {}
    # The coordinator's ledger API, for Run.steps.
    coordinator_url: str | None = None
    # Admin endpoints (/admin/dlq) of the other components, by component name, for `dlq`/`reprocessDlq`.
    admin_urls: dict[str, str] = {}
    # The shared internal token for admin endpoints; None reads/creates <data_dir>/internal-token.
    internal_token: str | None = None
    http_timeout_s: float = 3.0
    # Where services publish their declarations, and how long start waits to have read all of them.
    catalogue_topic: str = "kinshasa.catalogue"
    catalogue_wait_s: float = 15.0

    # Hardening: a hostile document is refused by these before any resolver runs.
    max_request_bytes: int = 262_144
    max_depth: int = 12
    max_aliases: int = 30
    max_tokens: int = 4_000

    # How often the releaser looks for commands whose quarantine window has elapsed.
    releaser_interval_s: float = 0.25
    releaser_batch: int = 500
    # Webhook delivery: attempts and first backoff (doubling).
    webhook_attempts: int = 4
    webhook_backoff_s: float = 0.5
    # Run the outbox relay and the Kafka listener inside the gateway process (off for read-only replicas).
    background: bool = True


def gateway_env_keys() -> set[str]:
    """Every env key the gateway understands, including the ones added here."""
    return env_keys(GatewayConfig)
