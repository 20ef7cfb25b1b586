"""Process settings: one BaseSettings per process, each with its own env prefix, built in bootstrap.

No other module reads the environment, with one exception: OpenTelemetry's own variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` and its companions), read by kinshasa/kernel/tracing.py and the exporter
itself. `kinshasa.launcher.process_env_keys()` is the registry of which
environment keys each process understands (this module imports nothing of Kinshasa's: every layer reads it).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_NAMES = ("documents", "ledger", "links", "notifier")


class StackSettings(BaseSettings):
    """Settings every process shares: where the data lives and where Kafka and Temporal are."""

    model_config = SettingsConfigDict(env_prefix="KINSHASA_", extra="ignore")

    data_dir: Path = Path(".kinshasa")
    kafka_bootstrap: str = "127.0.0.1:9092"
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    log_level: str = "INFO"
    # "json" for log shippers; "console" for a person reading a terminal (`make run` sets it).
    log_format: str = "json"
    # The internal token (admin endpoints) from a mounted secret; None: `<data_dir>/internal-token`.
    internal_token_file: Path | None = None
    # The least every topic must have: `kinshasa topics ensure` creates topics with this replication factor
    # and a component refuses to start on a topic below it. 1 for the single local broker, 3 on a cluster.
    min_replication: int = Field(default=1, ge=1)
    # The least min.insync.replicas of every topic; None: one less than min_replication (at least 1), so an
    # acks=all write is on two brokers of three and survives losing one.
    min_insync_replicas: int | None = Field(default=None, ge=1)


class InfraSettings(BaseSettings):
    """Ports and paths for the local infrastructure `kinshasa infra up` starts."""

    model_config = SettingsConfigDict(env_prefix="KINSHASA_INFRA_", extra="ignore")

    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_version: str = "4.1.1"
    # The official binary tarball's directory; when set, its libs/ replace the Maven download.
    kafka_home: Path | None = Field(default=None, validation_alias="KAFKA_HOME")
    kafka_heap: str = "512m"
    # Where downloaded Kafka jars are kept; defaults to <data_dir>/cache.
    cache_dir: Path | None = None
    temporal_port: int = 7233
    postgres_port: int = 5433
    start_timeout_s: float = 90.0


class ComponentSettings(BaseSettings):
    """What every component process has: its own database and its admin endpoint."""

    model_config = SettingsConfigDict(extra="ignore")

    # None means the embedded default: SQLite under the data dir, one file per component.
    database_url: str | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int = 0
    # Published outbox rows older than this are pruned (every 10 minutes); 0 prunes at the next round.
    outbox_keep_published_hours: float = Field(default=24.0, ge=0)

    def resolved_database_url(self, stack: StackSettings, component: str) -> str:
        if self.database_url:
            return self.database_url
        path = (stack.data_dir / "db" / f"{component}.sqlite3").resolve()
        return f"sqlite+aiosqlite:///{path}"


class GatewaySettings(ComponentSettings):
    model_config = SettingsConfigDict(env_prefix="KINSHASA_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    dev_mode: bool = False
    credentials_file: Path | None = None
    alert_webhook_url: str | None = None


class CoordinatorSettings(ComponentSettings):
    model_config = SettingsConfigDict(env_prefix="KINSHASA_COORDINATOR_", extra="ignore")

    admin_port: int = 8010
    task_queue: str = "kinshasa-revert"
    # How long /metrics keeps its revert and compensation figures (one scan of the ledger per period).
    metrics_cache_s: float = Field(default=15.0, ge=0)


class ServiceSettings(ComponentSettings):
    """One domain service's settings; the env prefix is per service (`KINSHASA_SVC_DOCUMENTS_`)."""

    model_config = SettingsConfigDict(extra="ignore")

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    # The URL other components reach this service's HTTP API at, published in its declaration; None
    # means the address it binds (fine on one machine, not behind a container network).
    advertised_url: str | None = None

    @classmethod
    def for_service(cls, name: str) -> ServiceSettings:
        return cls(_env_prefix=service_env_prefix(name))


def service_env_prefix(name: str) -> str:
    return f"KINSHASA_SVC_{name.upper()}_"


def env_keys(model: type[BaseSettings], prefix: str | None = None) -> set[str]:
    """The environment variable names a settings model reads."""
    prefix = model.model_config.get("env_prefix", "") if prefix is None else prefix
    keys = set()
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        keys.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return keys
