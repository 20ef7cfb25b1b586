"""The gateway process's settings: GatewaySettings plus its read backends and its hardening limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from kinshasa.settings import GatewaySettings, env_keys


class PrincipalLimits(BaseModel):
    """One principal's own rate and in-flight limits; a limit left out keeps the gateway's default."""

    model_config = ConfigDict(extra="forbid")

    rate_per_s: float | None = Field(default=None, gt=0)
    rate_burst: float | None = Field(default=None, gt=0)
    max_in_flight: int | None = Field(default=None, ge=1)


class GatewayConfig(GatewaySettings):
    """Read once in bootstrap (env prefix `KINSHASA_GATEWAY_`) and passed down; nothing else reads the env."""

    model_config = SettingsConfigDict(env_prefix="KINSHASA_GATEWAY_", extra="ignore")

    # Read APIs of the services, by service name: {"<service>": "http://127.0.0.1:8101", ...} (JSON in env).
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

    # Query cost and fairness (kinshasa/gateway/cost.py and fairness.py), in this replica's memory: with N
    # replicas a principal gets N times these. A unit is about 25 µs of gateway CPU. An operation
    # estimated over `max_query_cost` is refused before it runs (QUERY_TOO_COSTLY): about a quarter of a
    # second of CPU; the costliest query in use, the operator CLI's page of 100 runs, costs ~500.
    max_query_cost: int = 10_000
    # Each principal's token bucket, in the same units (a write ~100, a run read ~100, the CLI's page of
    # runs ~500): refilled at `rate_per_s`, holding at most `rate_burst` (RATE_LIMITED with retryAfterS
    # past it). 10,000/s is about a quarter of one core, ~100 writes/s: one principal at its limit leaves
    # the rest of the gateway to the others. Benchmarks of one agent's raw throughput give it its own.
    rate_per_s: float = 10_000
    rate_burst: float = 20_000
    # Requests of one principal running at once (RATE_LIMITED past it), so slow ones (a backend timing
    # out) cannot pile up. bench_trip and the replica tests keep 32 in flight from one agent per replica.
    max_in_flight: int = 64
    # Per principal id, JSON in env: {"bench-agent": {"rate_per_s": 1e9, "max_in_flight": 1000}}.
    principal_limits: dict[str, PrincipalLimits] = {}
    # One request's reads of other components: all end within `backend_deadline_s` of its start, and at
    # most `backend_concurrency` run at once per backend (and per request on the gateway's own database).
    backend_deadline_s: float = 10.0
    backend_concurrency: int = 8
    # Read-only connections to the gateway's database open at once for all requests: below the pool's
    # size (5 + 10 overflow on SQLite), so reads never take every connection the writes need.
    database_reads: int = 6

    # Costly reads in processes of their own (kinshasa/gateway/readers.py): a query estimated at
    # `read_offload_cost` or more runs in one of `readers` child processes, at CPU priority `reader_nice`
    # (added to this process's), so one principal's big reads cannot take the CPU everyone's writes need
    # here. Readers start at the first such read; 0 runs every read in this process. The operator CLI's
    # page of 100 runs (~500) and every write stay here.
    readers: int = Field(default=1, ge=0, le=16)
    read_offload_cost: int = Field(default=2_500, ge=1)
    reader_nice: int = Field(default=10, ge=0, le=19)

    # How long /metrics keeps the figures it reads from the database (trips, incidents, held and
    # awaiting-approval commands): however often it is scraped, one read per this many seconds.
    metrics_cache_s: float = Field(default=5.0, ge=0)

    # How often the releaser looks for commands whose quarantine window has elapsed.
    releaser_interval_s: float = 0.25
    releaser_batch: int = 500
    # Webhook delivery: attempts and first backoff (doubling).
    webhook_attempts: int = 4
    webhook_backoff_s: float = 0.5
    # The dlq_threshold alert (kinshasa/gateway/durability.py): every `dlq_alert_interval_s` the gateway
    # reads each component's DLQ size and oldest pending outbox row, and alerts once when a component has
    # `dlq_alert_threshold` dead letters or more, or a row unpublished for over `outbox_age_alert_s`.
    dlq_alert_interval_s: float = Field(default=30.0, gt=0)
    dlq_alert_threshold: int = Field(default=1, ge=1)
    outbox_age_alert_s: float = Field(default=300.0, gt=0)
    # Run the outbox relay and the Kafka listener inside the gateway process (off for read-only replicas).
    background: bool = True
    # TEST ONLY, off by default: the process SIGKILLs itself right after committing the request that
    # carries this idempotency key, before answering (tests/integration/gateway/test_idempotency.py).
    test_kill_after_commit_key: str | None = None


def gateway_env_keys() -> set[str]:
    """Every env key the gateway understands, including the ones added here."""
    return env_keys(GatewayConfig)
