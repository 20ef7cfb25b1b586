"""`kinshasa up`: the infrastructure plus every Kinshasa process, each its own process, logs prefixed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.stack import LocalInfra
from kinshasa.kernel.admin_api import load_or_create_internal_token
from kinshasa.settings import (
    SERVICE_NAMES,
    CoordinatorSettings,
    GatewaySettings,
    InfraSettings,
    ServiceSettings,
    StackSettings,
    env_keys,
    service_env_prefix,
)
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import catalogue
from kinshasa.topics.checks import TopicMinimums, check_topics


def process_env_keys() -> dict[str, set[str]]:
    """Environment keys understood by each Kinshasa process, by process name."""
    # The gateway process reads an extended model (its read backends and hardening limits).
    shared = env_keys(StackSettings)
    keys = {
        "gateway": shared | env_keys(GatewayConfig),
        "coordinator": shared | env_keys(CoordinatorSettings),
    }
    for name in SERVICE_NAMES:
        keys[name] = shared | env_keys(ServiceSettings, service_env_prefix(name))
    return keys


@dataclass
class StackPorts:
    """Where each process listens; the defaults are the documented local ports."""

    gateway: int = 8000
    coordinator: int = 8010
    smtp: int = 2525
    services: dict[str, int] = field(default_factory=lambda: {
        name: 8101 + i for i, name in enumerate(SERVICE_NAMES)})
    # Ports of gateway replicas beyond the first (`gateway-2`, `gateway-3`, ...), which share its database.
    gateway_replicas: list[int] = field(default_factory=list)

    @classmethod
    def from_settings(cls) -> StackPorts:
        """The defaults, each overridden by the setting its process reads (KINSHASA_GATEWAY_PORT, ...)."""
        default = cls()
        services = {name: ServiceSettings.for_service(name).admin_port or port
                    for name, port in default.services.items()}
        return cls(gateway=GatewaySettings().port, coordinator=CoordinatorSettings().admin_port,
                   smtp=ServiceSettings.for_service("notifier").smtp_port, services=services)


@dataclass
class StackPlan:
    """Every process of the stack as (name, argv, env): pure data, so tests can read it."""

    stack: StackSettings
    ports: StackPorts
    postgres_url: str | None = None
    dev_mode: bool = True
    # Services from outside the package: (service name, "package.module:attribute"); their ports are in
    # `ports.services` under their names, like the examples'.
    extra_services: list[tuple[str, str]] = field(default_factory=list)

    def _database_url(self, component: str) -> dict[str, str]:
        if self.postgres_url is None:
            return {}
        # One database per component on the given server keeps component autonomy.
        return {"DATABASE_URL": self.postgres_url.rsplit("/", 1)[0] + f"/kinshasa_{component}"}

    def databases(self) -> list[str]:
        extra = [name for name, _ in self.extra_services]
        return [f"kinshasa_{c}" for c in ("gateway", "coordinator", *SERVICE_NAMES, *extra)]

    def processes(self) -> list[tuple[str, list[str], dict[str, str]]]:
        exe = [sys.executable, "-m", "kinshasa.cli"]
        shared = {
            "KINSHASA_DATA_DIR": str(self.stack.data_dir.resolve()),
            "KINSHASA_KAFKA_BOOTSTRAP": self.stack.kafka_bootstrap,
            "KINSHASA_TEMPORAL_ADDRESS": self.stack.temporal_address,
            "KINSHASA_LOG_LEVEL": self.stack.log_level,
            "KINSHASA_LOG_FORMAT": "console",
            "PYTHONUNBUFFERED": "1",
        }
        mail = self.stack.data_dir.resolve() / "mail"
        procs: list[tuple[str, list[str], dict[str, str]]] = [
            ("smtp-sink", [*exe, "service", "smtp-sink", "--dir", str(mail),
                           "--port", str(self.ports.smtp)], dict(shared)),
        ]
        for name in SERVICE_NAMES:
            prefix = service_env_prefix(name)
            env = shared | {f"{prefix}ADMIN_PORT": str(self.ports.services[name]),
                            f"{prefix}SMTP_PORT": str(self.ports.smtp)}
            env |= {f"{prefix}{k}": v for k, v in self._database_url(name).items()}
            procs.append((name, [*exe, "service", name], env))
        for name, reference in self.extra_services:
            prefix = service_env_prefix(name)
            env = shared | {f"{prefix}ADMIN_PORT": str(self.ports.services[name])}
            env |= {f"{prefix}{k}": v for k, v in self._database_url(name).items()}
            procs.append((name, [*exe, "service", "--module", reference], env))
        coordinator_env = shared | {"KINSHASA_COORDINATOR_ADMIN_PORT": str(self.ports.coordinator)}
        coordinator_env |= {f"KINSHASA_COORDINATOR_{k}": v
                            for k, v in self._database_url("coordinator").items()}
        procs.append(("coordinator", [*exe, "coordinator"], coordinator_env))
        # Services say where their read and admin APIs are in their declarations; only the coordinator's
        # admin API is configured.
        admin_urls = {"coordinator": f"http://127.0.0.1:{self.ports.coordinator}"}
        gateway_env = shared | {
            "KINSHASA_GATEWAY_PORT": str(self.ports.gateway),
            "KINSHASA_GATEWAY_DEV_MODE": "true" if self.dev_mode else "false",
            "KINSHASA_GATEWAY_ADMIN_URLS": json.dumps(admin_urls),
            "KINSHASA_GATEWAY_COORDINATOR_URL": f"http://127.0.0.1:{self.ports.coordinator}",
        }
        gateway_env |= {f"KINSHASA_GATEWAY_{k}": v for k, v in self._database_url("gateway").items()}
        procs.append(("gateway", [*exe, "gateway"], gateway_env))
        if self.ports.gateway_replicas and self.postgres_url is None:
            raise ValueError("gateway replicas share one database, which must be PostgreSQL: "
                             "give a PostgreSQL URL or run one gateway")
        for index, port in enumerate(self.ports.gateway_replicas, start=2):
            procs.append((f"gateway-{index}", [*exe, "gateway"],
                          gateway_env | {"KINSHASA_GATEWAY_PORT": str(port)}))
        return procs


async def create_databases(url: str, names: list[str]) -> None:
    """Create each of `names` on the PostgreSQL server of `url` unless it exists."""
    import asyncpg

    base = url.replace("postgresql+asyncpg://", "postgresql://", 1).rsplit("/", 1)[0]
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        existing = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def banner(stack: StackSettings, ports: StackPorts) -> str:
    creds = stack.data_dir.resolve() / "credentials.json"
    url = f"http://127.0.0.1:{ports.gateway}/graphql"
    return "\n".join([
        "",
        "Kinshasa is up.",
        f"  GraphQL endpoint (point your agent here): {url}",
        f"  MCP (streamable HTTP, Bearer key):        http://127.0.0.1:{ports.gateway}/mcp"
        "   or stdio: KINSHASA_KEY=... kinshasa mcp",
        f"  API keys (agent and operator):            {creds}",
        "  Try it:",
        f"    KEY=$(python3 -c 'import json,sys; print(next(p[\"key\"] for p in json.load(open(sys.argv[1]))"
        f"[\"principals\"] if p[\"kind\"] == \"agent\"))' {creds})",
        f"    curl -s {url} -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' \\",
        "      -d '{\"query\":\"mutation { startRun(entryPoint: \\\"hello\\\") { id status } }\"}'",
        "  Tell the story: kinshasa demo      Stop: Ctrl-C",
        "",
    ])


def resolve_services(references: list[str]) -> list[tuple[str, str]]:
    """(name, reference) for each `package.module:attribute`, importing each to check it first."""
    from kinshasa.services.registry import load_module_service

    resolved: list[tuple[str, str]] = []
    for reference in references:
        service = load_module_service(reference)
        if service.name in SERVICE_NAMES or service.name in {n for n, _ in resolved}:
            raise ValueError(f"service name {service.name!r} ({reference}) is already in the stack: "
                             "rename it")
        resolved.append((service.name, reference))
    return resolved


def ensure_stack_topics(stack: StackSettings, services: Sequence[str],
                        report: Callable[[str], None] = print) -> None:
    """`kinshasa topics ensure` for a stack about to start: every topic of these services, the gateway
    and the coordinator, created at the stack's minimums (KINSHASA_MIN_REPLICATION).

    Then the check each component makes at start, over all of them at once: a topic a component would
    refuse (an old one below the minimums) stops `kinshasa up` with the full list before any process runs.
    """
    minimums = TopicMinimums.from_settings(stack)
    specs = catalogue(services)
    created = ensure_topics(stack.kafka_bootstrap, specs, replication_factor=minimums.replication,
                            min_insync_replicas=minimums.insync_replicas)
    report(f"topics: {len(created.created)} created, {len(created.existing)} existing "
           f"(replication factor at least {minimums.replication}, min.insync.replicas at least "
           f"{minimums.insync_replicas})")
    for mismatch in check_topics(stack.kafka_bootstrap, specs, minimums, component="kinshasa up"):
        report(f"warning: {mismatch.line()}")


def run_stack(postgres_url: str | None, report: Callable[[str], None] = print,
              services: list[str] | None = None) -> None:
    """Start infrastructure and processes in the foreground; Ctrl-C or SIGTERM stops everything."""
    import asyncio

    import honcho.manager
    from honcho.manager import Manager
    from honcho.printer import Printer

    stack = StackSettings()
    infra = LocalInfra.from_settings(stack, InfraSettings())
    ports = StackPorts.from_settings()
    try:
        infra.up(attached=True, report=report)
        extra = resolve_services(services or [])
        ensure_stack_topics(stack, [*SERVICE_NAMES, *(name for name, _ in extra)], report)
        load_or_create_internal_token(stack.data_dir)
        for index, (name, _) in enumerate(extra):
            # The service's own setting if given, else the next port after the examples'.
            ports.services[name] = (ServiceSettings.for_service(name).admin_port
                                    or max(ports.services.values()) + 1 + index)
        plan = StackPlan(stack, ports, postgres_url=postgres_url, extra_services=extra)
        if postgres_url:
            asyncio.run(create_databases(postgres_url, plan.databases()))
        # The coordinator's Temporal worker may take up to 10 s to hand back its activities cleanly;
        # honcho's default 5 s before SIGKILL would cut that short on every Ctrl-C.
        honcho.manager.KILL_WAIT = 15
        manager = Manager(Printer(sys.stdout))
        for name, argv, env in plan.processes():
            manager.add_process(name, " ".join(_quote(a) for a in argv), env=os.environ | env)
        report(banner(stack, ports))
        # honcho stops every process when one exits or on Ctrl-C / SIGTERM, and says which.
        manager.loop()
    finally:
        infra.down(report=report)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
