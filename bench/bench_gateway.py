"""Gateway throughput: accepted mutations/s through the full path against a bare Strawberry echo mutation.

Both servers run as separate uvicorn processes with the same settings (one worker, the components' loop
and HTTP parser, no access log) in the same run, driven in alternating rounds (median per side) by the
same minimal keep-alive HTTP/1.1 load generator (cheap enough that the server, not the client, is the
bottleneck).
The gateway path is the real one:
Bearer auth, run ownership, breaker check+count, quarantine window 0, the command row, its outbox row and the
count committed in one database transaction (group commit: writes queued together share it), and the
relay publishing to a real Kafka broker. After each gateway round the bench waits until every accepted
command is on Kafka and reports how many were still unpublished when the load stopped and how long
they took, so a relay that falls behind shows.

A third server, the same echo served like for like with the gateway's /graphql: Strawberry's parser and
validation caches (the gateway has the same two caches, in its one hardening extension
`kinshasa.gateway.hardening.HardenedDocuments`, keyed by the query text; the bare echo has none) and
Strawberry's plain ASGI app with no FastAPI router around it (`kinshasa.gateway.app.GatewayGraphQL`), is
measured alongside: against it the ratio shows what the gateway's own work costs per request. The target
ratio is the one against the bare echo.
On SQLite a fourth server, the same gateway with `synchronous=NORMAL` on a database of its own, states
what the durable commit the stores run with (`synchronous=FULL`) costs; it is never part of a ratio.

    python -m bench.bench_gateway [--small] [--database-url URL] [--bootstrap HOST:PORT]
    python -m bench [--small] gateway

Writes bench/results/gateway.json (figures, the database they were measured on, machine facts and load).
Target: gateway/echo ratio >= 0.7.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.keepalive import Connection, request_bytes  # noqa: E402
from kinshasa.kernel.component import UVICORN_IMPLEMENTATION  # noqa: E402

AGENT_KEY = "bench-agent-" + "k" * 40
OPERATOR_KEY = "bench-operator-" + "k" * 40
# Every server on the event loop and HTTP parser the components run on (uvloop, httptools), so the gateway
# is measured as it serves and the echoes like for like.
UVICORN = {"log_level": "warning", "access_log": False, "lifespan": "on", **UVICORN_IMPLEMENTATION}


# --- the echo server: a bare Strawberry mutation, same FastAPI + uvicorn settings ---------------------


def echo_app(cached: bool = False) -> Any:
    """The bare echo (FastAPI with Strawberry's router); `cached`: Strawberry's parser and validation caches
    and its plain ASGI app, as the gateway serves /graphql."""
    import strawberry
    from fastapi import FastAPI
    from strawberry.extensions import ParserCache, ValidationCache
    from strawberry.fastapi import GraphQLRouter

    @strawberry.type
    class Receipt:
        command_id: str
        status: str

    @strawberry.type
    class Query:
        ok: bool = True

    @strawberry.type
    class Mutation:
        @strawberry.mutation
        def echo(self, run_id: strawberry.ID, title: str) -> Receipt:
            return Receipt(command_id=str(run_id), status=title)

    extensions = [lambda: ParserCache(maxsize=1024), lambda: ValidationCache(maxsize=1024)] if cached else []
    if cached:
        # Like for like with the gateway, which serves /graphql with Strawberry's ASGI app, not a router.
        from strawberry.asgi import GraphQL

        graphql = GraphQL(strawberry.Schema(query=Query, mutation=Mutation, extensions=extensions),
                          graphql_ide=None, allow_queries_via_get=False)

        async def served(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":  # uvicorn's start and stop; Strawberry's app serves requests only
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            await graphql(scope, receive, send)

        return served
    app = FastAPI()
    app.include_router(
        GraphQLRouter(
            strawberry.Schema(query=Query, mutation=Mutation, extensions=extensions),
            graphql_ide=None,
            allow_queries_via_get=False,
        ),
        prefix="/graphql",
    )
    return app


def serve_echo(port: int, cached: bool = False) -> None:
    import uvicorn

    uvicorn.run(echo_app(cached), host="127.0.0.1", port=port, **UVICORN)  # type: ignore[arg-type]


def serve_gateway(port: int, synchronous: str = "FULL") -> None:
    import uvicorn

    from kinshasa.gateway.app import bootstrap
    from kinshasa.kernel import database

    # NORMAL only for the side that states what the stores' synchronous=FULL costs; never for the ratio.
    database.SQLITE_SYNCHRONOUS = synchronous

    gateway = bootstrap()
    uvicorn.run(gateway.app, host="127.0.0.1", port=port, **UVICORN)  # type: ignore[arg-type]


# --- load ---------------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads included (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Side:
    """One server's rounds: requests answered without errors per second, and its CPU per request."""

    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    failed: int = 0

    def add(self, ok: int, failed: int, cpu_s: float | None, seconds: float) -> None:
        self.rates.append(ok / seconds)
        self.failed += failed
        if cpu_s is not None and ok:
            self.cpu_ms.append(1000 * cpu_s / ok)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_ms_per_request(self) -> float | None:
        return statistics.median(self.cpu_ms) if self.cpu_ms else None

    def figures(self) -> dict[str, Any]:
        cpu = self.cpu_ms_per_request
        return {
            "per_s": round(self.rate, 1),
            "rounds_per_s": [round(r, 1) for r in self.rates],
            "failed": self.failed,
            "cpu_ms_per_request": round(cpu, 3) if cpu is not None else None,
            "rounds_cpu_ms_per_request": [round(c, 3) for c in self.cpu_ms],
        }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


async def drive(
    port: int, requests: list[bytes], seconds: float, warmup: float, pid: int | None = None
) -> tuple[int, int, float | None]:
    """Each connection loops over its own request; returns (ok, failed, server CPU s), after the warm-up."""
    ok = failed = 0
    counting = False
    stop = False

    async def worker(request: bytes) -> None:
        nonlocal ok, failed
        conn = await Connection.open(port)
        try:
            while not stop:
                body = await conn.post(request)
                if not counting:
                    continue
                if b'"errors"' in body:
                    failed += 1
                else:
                    ok += 1
        finally:
            conn.close()

    tasks = [asyncio.create_task(worker(r)) for r in requests]
    await asyncio.sleep(warmup)
    counting = True
    cpu_start = process_cpu_s(pid) if pid is not None else None
    await asyncio.sleep(seconds)
    stop = True
    cpu_end = process_cpu_s(pid) if pid is not None else None
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return ok, failed, cpu


# --- orchestration ---------------------------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


async def wait_http(port: int, proc: subprocess.Popen[bytes], log: Path, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early; see {log}")
        try:
            conn = await Connection.open(port)
            await conn.post(request_bytes(port, {"query": "{ __typename }"}, None))
            conn.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise SystemExit(f"server on {port} did not start; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def gql(port: int, query: str, key: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    conn = await Connection.open(port)
    try:
        body = json.loads(
            await conn.post(request_bytes(port, {"query": query, "variables": variables or {}}, key))
        )
    finally:
        conn.close()
    if body.get("errors"):
        raise SystemExit(f"bench setup failed: {body['errors']}")
    data: dict[str, Any] = body["data"]
    return data


async def published_count(port: int, run_ids: list[str]) -> int:
    total = 0
    for run_id in run_ids:
        data = await gql(port, f'{{ run(id: "{run_id}") {{ counts {{ published }} }} }}', OPERATOR_KEY)
        total += data["run"]["counts"]["published"]
    return total


def outbox_backlog(database_url: str) -> int:
    from sqlalchemy import text

    from kinshasa.kernel.database import create_engine

    async def count() -> int:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                return int(
                    (
                        await conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
                    ).scalar_one()
                )
        finally:
            await engine.dispose()

    return asyncio.run(count())


async def drain_time(database_url: str, within_s: float = 120.0) -> tuple[int, float]:
    """(unpublished outbox rows now, seconds until there were none): how far the relay trails acceptance."""
    started = time.monotonic()
    backlog = left = await asyncio.to_thread(outbox_backlog, database_url)
    # Polling another process's database: there is no event to wait on.
    while left > 0 and time.monotonic() - started < within_s:
        await asyncio.sleep(0.05)
        left = await asyncio.to_thread(outbox_backlog, database_url)
    return backlog, time.monotonic() - started


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from kinshasa.infra.process import free_port

    seconds, warmup, connections, rounds = (
        (3.0, 1.0, 16, 1) if args.small else (args.seconds, 2.0, args.connections, args.rounds)
    )
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-"))
    broker = None
    try:
        bootstrap = args.bootstrap
        if bootstrap is None:
            from kinshasa.infra.kafka import KafkaBroker, kafka_libs
            from kinshasa.settings import InfraSettings

            infra = InfraSettings()
            broker = KafkaBroker(
                root=root / "kafka",
                libs=kafka_libs(REPO / ".kinshasa" / "cache", infra.kafka_version, infra.kafka_home),
                port=free_port(),
                controller_port=free_port(),
            )
            broker.start(attached=True)
            bootstrap = broker.bootstrap
        from kinshasa.services.registry import publish_example_declarations

        # The gateway learns the example services from their declarations, as when they start beside it.
        await asyncio.to_thread(publish_example_declarations, bootstrap)
        database_url = args.database_url or f"sqlite+aiosqlite:///{root / 'gateway.sqlite3'}"
        (root / "credentials.json").write_text(
            json.dumps(
                {
                    "principals": [
                        {"id": "bench-agent", "kind": "agent", "key": AGENT_KEY},
                        {"id": "bench-operator", "kind": "operator", "key": OPERATOR_KEY},
                    ]
                }
            )
        )
        env = {
            **os.environ,
            "KINSHASA_DATA_DIR": str(root / "data"),
            "KINSHASA_KAFKA_BOOTSTRAP": bootstrap,
            "KINSHASA_GATEWAY_DATABASE_URL": database_url,
            "KINSHASA_GATEWAY_CREDENTIALS_FILE": str(root / "credentials.json"),
            "KINSHASA_LOG_LEVEL": "WARNING",
            # One agent's raw throughput is what this measures, not the fairness limits, which would hold
            # it to its share (rate_per_s): its agent gets limits of its own.
            "KINSHASA_GATEWAY_PRINCIPAL_LIMITS": json.dumps(
                {"bench-agent": {"rate_per_s": 1e9, "rate_burst": 1e9, "max_in_flight": 10_000}}
            ),
        }

        # Both servers up at once (an idle one costs nothing); rounds alternate echo and gateway so a
        # load spike from elsewhere on the machine hits both sides alike rather than one.
        echo_port, cached_port, gw_port = free_port(), free_port(), free_port()
        echo = spawn(["--serve-echo", str(echo_port)], env, root / "echo.log")
        cached = spawn(["--serve-cached-echo", str(cached_port)], env, root / "cached-echo.log")
        gateway = spawn(["--serve-gateway", str(gw_port)], env, root / "gateway.log")
        # On SQLite, a second gateway on a database of its own with synchronous=NORMAL, to state the cost
        # of the durability the stores run with (a commit on disk when it returns).
        normal_url = f"sqlite+aiosqlite:///{root / 'gateway-normal.sqlite3'}"
        normal_port = free_port() if database_url.startswith("sqlite") else None
        normal = None if normal_port is None else spawn(
            ["--serve-gateway-normal", str(normal_port)],
            {**env, "KINSHASA_GATEWAY_DATABASE_URL": normal_url,
             "KINSHASA_DATA_DIR": str(root / "data-normal")},
            root / "gateway-normal.log")
        try:
            await wait_http(echo_port, echo, root / "echo.log")
            await wait_http(cached_port, cached, root / "cached-echo.log")
            await wait_http(gw_port, gateway, root / "gateway.log")
            if normal is not None and normal_port is not None:
                await wait_http(normal_port, normal, root / "gateway-normal.log")
            echo_body = {
                "query": "mutation($r: ID!, $t: String!) { echo(runId: $r, title: $t) { commandId status } }",
                "variables": {"r": "run", "t": "bench"},
            }
            echo_request = request_bytes(echo_port, echo_body, AGENT_KEY)
            cached_request = request_bytes(cached_port, echo_body, AGENT_KEY)
            mutation = (
                'mutation($r: ID!) { createDocument(runId: $r, input: {title: "bench"}) '
                "{ commandId status } }"
            )

            async def writers(port: int) -> tuple[list[str], list[bytes]]:
                """Open the policy and start one run per connection; one request per run."""
                await gql(
                    port,
                    'mutation { setPolicy(scope: DEFAULT, reason: "bench", settings: {maxWrites: 10000000, '
                    "maxVelocity: 10000000, velocityWindowS: 1, quarantineWindowS: 0}) { version } }",
                    OPERATOR_KEY,
                )
                runs = [(await gql(port, 'mutation { startRun(entryPoint: "bench") { id } }', AGENT_KEY))[
                    "startRun"]["id"] for _ in range(connections)]
                return runs, [request_bytes(port, {"query": mutation, "variables": {"r": r}}, AGENT_KEY)
                              for r in runs]

            run_ids, requests = await writers(gw_port)
            normal_requests = [] if normal_port is None else (await writers(normal_port))[1]
            echo_side, gw_side, cached_side, normal_side = Side(), Side(), Side(), Side()
            backlogs: list[int] = []
            drains: list[float] = []
            load_at_start = load_average()
            for _ in range(rounds):
                echo_side.add(
                    *await drive(echo_port, [echo_request] * connections, seconds, warmup, echo.pid), seconds
                )
                gw_side.add(*await drive(gw_port, requests, seconds, warmup, gateway.pid), seconds)
                # Before the next server's round: what the relay still had to publish when the load
                # stopped, and how long until every accepted command was on Kafka.
                backlog_at_end, drained = await drain_time(database_url)
                backlogs.append(backlog_at_end)
                drains.append(drained)
                cached_side.add(
                    *await drive(cached_port, [cached_request] * connections, seconds, warmup, cached.pid),
                    seconds,
                )
                if normal is not None and normal_port is not None:
                    normal_side.add(*await drive(normal_port, normal_requests, seconds, warmup, normal.pid),
                                    seconds)
            load_at_end = load_average()
            accepted_total = await published_count(gw_port, run_ids)
            # Drained: every accepted command is on Kafka (the outbox holds no unpublished row).
            await drain_time(database_url)
            backlog = await asyncio.to_thread(outbox_backlog, database_url)
        finally:
            stop(echo)
            stop(cached)
            stop(gateway)
            if normal is not None:
                stop(normal)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)

    from bench.machine import machine_info

    return {
        "benchmark": "gateway accepted mutations/s vs bare Strawberry echo mutation",
        "mode": "small" if args.small else "full",
        # Every figure below was measured on this database (the gateway's; the echo servers have none).
        "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
        "database_driver": database_url.split("://", 1)[0],
        "seconds_per_round": seconds,
        "rounds": rounds,
        "warmup_s": warmup,
        "connections": connections,
        "echo": echo_side.figures(),
        "gateway": {
            **gw_side.figures(),
            "accepted_incl_warmup": accepted_total,
            "outbox_backlog_after": backlog,
            # Per gateway round: commands accepted but not yet on Kafka when the load stopped, and the
            # seconds until every accepted command was (the relay's lag behind acceptance).
            "outbox_backlog_at_round_end": backlogs,
            "all_on_kafka_after_round_s": [round(d, 2) for d in drains],
        },
        "ratio": ratio(gw_side.rate, echo_side.rate),
        "target_ratio": 0.7,
        # Server CPU per request, echo over gateway (the gateway's threads included, the Kafka broker
        # not): what the ratio is when each side is CPU-bound with a whole core. On a machine busy with
        # other work the throughput ratio also reflects how the scheduler shared the cores out (a process
        # with more runnable threads gets more), which this figure does not.
        "cpu_ratio": ratio(echo_side.cpu_ms_per_request, gw_side.cpu_ms_per_request),
        # Informational, not the target: the bare echo parses and validates every request, while the
        # gateway caches both. This echo adds only those two caches, so the ratios against it show
        # what the gateway's own work (auth, breaker, database, outbox, relay) costs per request.
        "cached_echo": cached_side.figures(),
        "ratio_vs_cached_echo": ratio(gw_side.rate, cached_side.rate),
        "cpu_ratio_vs_cached_echo": ratio(cached_side.cpu_ms_per_request, gw_side.cpu_ms_per_request),
        # SQLite only: the same gateway with synchronous=NORMAL (a power loss may undo its last commits),
        # and the share of throughput the stores' synchronous=FULL costs against it.
        "synchronous_normal": normal_side.figures() if normal is not None else None,
        "synchronous_full_cost": (None if normal is None or not normal_side.rate
                                  else round(1 - gw_side.rate / normal_side.rate, 3)),
        "machine": {
            **machine_info(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": load_at_end,
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m bench` (which passes ["--small"] or []) and for direct runs."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="a quick run (one round of 3 s per side, 16 connections)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per round and side")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating echo/gateway rounds (median taken)"
    )
    parser.add_argument(
        "--database-url", default=None, help="gateway database (default: SQLite in a temp dir)"
    )
    parser.add_argument(
        "--bootstrap", default=None, help="an existing Kafka; default starts a private broker"
    )
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-cached-echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway-normal", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0
    if args.serve_cached_echo:
        serve_echo(args.serve_cached_echo, cached=True)
        return 0
    if args.serve_gateway:
        serve_gateway(args.serve_gateway)
        return 0
    if args.serve_gateway_normal:
        serve_gateway(args.serve_gateway_normal, synchronous="NORMAL")
        return 0
    from bench import machine

    result = asyncio.run(bench(args))
    out = machine.RESULTS / "gateway.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    gw = result["gateway"]
    print(f"database:             {result['database']} ({result['database_driver']})")
    print(f"echo mutation:        {result['echo']['per_s']:>9.1f} /s")
    print(
        f"gateway full path:    {gw['per_s']:>9.1f} accepted/s "
        f"(all {gw['accepted_incl_warmup']} on Kafka; each round's on Kafka "
        f"{max(gw['all_on_kafka_after_round_s'])} s after it ended at most)"
    )
    print(f"ratio gateway/echo:   {result['ratio']}  (target >= {result['target_ratio']})")
    print(
        f"server CPU ms/request: echo {result['echo']['cpu_ms_per_request']}, gateway "
        f"{gw['cpu_ms_per_request']} -> CPU ratio {result['cpu_ratio']}"
    )
    cached = result["cached_echo"]
    print(
        f"like for like: echo with parser+validation caches, Strawberry's ASGI app {cached['per_s']:.1f} /s "
        f"({cached['cpu_ms_per_request']} CPU ms/request): gateway/cached echo "
        f"{result['ratio_vs_cached_echo']}, CPU ratio {result['cpu_ratio_vs_cached_echo']}"
    )
    if result["synchronous_normal"] is not None:
        print(
            f"durability: the gateway with SQLite synchronous=FULL (what it runs) {gw['per_s']:.1f}/s vs "
            f"NORMAL {result['synchronous_normal']['per_s']:.1f}/s: FULL costs "
            f"{result['synchronous_full_cost']:.1%}"
        )
    print(
        f"load average start/end: {result['machine']['load_average_at_start']} / "
        f"{result['machine']['load_average_at_end']}"
    )
    print(f"wrote {out}")
    return 0 if gw["failed"] == 0 and gw["outbox_backlog_after"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
