"""Gateway throughput: accepted mutations/s through the full path against a bare Strawberry echo mutation.

Both servers run as separate uvicorn processes with the same settings (one worker, same loop, no access
log) in the same run, driven in alternating rounds (median per side) by the same minimal keep-alive
HTTP/1.1 load generator (cheap enough that the server, not the client, is the bottleneck).
The gateway path is the real one:
Bearer auth, run ownership, breaker check+count, quarantine window 0, one database transaction writing the
command and its outbox row, and the relay publishing to a real Kafka broker. After the timed phase the
bench waits until every accepted command is on Kafka and reports that drain rate too.

    python bench/bench_gateway.py [--small] [--database-url URL] [--bootstrap HOST:PORT]

Writes bench/results/gateway.json. Target: gateway/echo ratio >= 0.7.
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

AGENT_KEY = "bench-agent-" + "k" * 40
OPERATOR_KEY = "bench-operator-" + "k" * 40
UVICORN = {"log_level": "warning", "access_log": False, "lifespan": "on", "loop": "asyncio", "http": "h11"}


# --- the echo server: a bare Strawberry mutation, same FastAPI + uvicorn settings ---------------------


def echo_app() -> Any:
    import strawberry
    from fastapi import FastAPI
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

    app = FastAPI()
    app.include_router(
        GraphQLRouter(
            strawberry.Schema(query=Query, mutation=Mutation), graphql_ide=None, allow_queries_via_get=False
        ),
        prefix="/graphql",
    )
    return app


def serve_echo(port: int) -> None:
    import uvicorn

    uvicorn.run(echo_app(), host="127.0.0.1", port=port, **UVICORN)  # type: ignore[arg-type]


def serve_gateway(port: int) -> None:
    import uvicorn

    from kinshasa.gateway.app import bootstrap

    gateway = bootstrap()
    uvicorn.run(gateway.app, host="127.0.0.1", port=port, **UVICORN)  # type: ignore[arg-type]


# --- a minimal keep-alive HTTP/1.1 client ------------------------------------------------------------


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, request: bytes) -> bytes:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def request_bytes(port: int, body: dict[str, Any], key: str | None) -> bytes:
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def drive(port: int, requests: list[bytes], seconds: float, warmup: float) -> tuple[int, int]:
    """Each connection loops over its own request; returns (ok, failed) counted after the warm-up."""
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
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return ok, failed


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


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "machine": platform.machine(),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from kinshasa.infra.process import free_port

    seconds, warmup, connections, rounds = (
        (3.0, 1.0, 16, 2) if args.small else (args.seconds, 2.0, args.connections, args.rounds)
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
        }

        # Both servers up at once (an idle one costs nothing); rounds alternate echo and gateway so a
        # load spike from elsewhere on the machine hits both sides alike rather than one.
        echo_port, gw_port = free_port(), free_port()
        echo = spawn(["--serve-echo", str(echo_port)], env, root / "echo.log")
        gateway = spawn(["--serve-gateway", str(gw_port)], env, root / "gateway.log")
        try:
            await wait_http(echo_port, echo, root / "echo.log")
            await wait_http(gw_port, gateway, root / "gateway.log")
            echo_request = request_bytes(
                echo_port,
                {
                    "query": "mutation($r: ID!, $t: String!) "
                    "{ echo(runId: $r, title: $t) { commandId status } }",
                    "variables": {"r": "run", "t": "bench"},
                },
                AGENT_KEY,
            )
            await gql(
                gw_port,
                'mutation { setPolicy(scope: DEFAULT, reason: "bench", settings: {maxWrites: 10000000, '
                "maxVelocity: 10000000, velocityWindowS: 1, quarantineWindowS: 0}) { version } }",
                OPERATOR_KEY,
            )
            run_ids = [
                (await gql(gw_port, 'mutation { startRun(entryPoint: "bench") { id } }', AGENT_KEY))[
                    "startRun"
                ]["id"]
                for _ in range(connections)
            ]
            mutation = (
                'mutation($r: ID!) { createDocument(runId: $r, input: {title: "bench"}) '
                "{ commandId status } }"
            )
            requests = [
                request_bytes(gw_port, {"query": mutation, "variables": {"r": r}}, AGENT_KEY) for r in run_ids
            ]
            echo_rounds: list[float] = []
            gw_rounds: list[float] = []
            echo_failed = gw_failed = 0
            started = time.monotonic()
            for _ in range(rounds):
                ok, failed = await drive(echo_port, [echo_request] * connections, seconds, warmup)
                echo_rounds.append(ok / seconds)
                echo_failed += failed
                ok, failed = await drive(gw_port, requests, seconds, warmup)
                gw_rounds.append(ok / seconds)
                gw_failed += failed
            accepted_total = await published_count(gw_port, run_ids)
            # Drained: every accepted command is on Kafka (the outbox holds no unpublished row).
            deadline = time.monotonic() + 120
            # Polling another process's database: there is no event to wait on.
            while time.monotonic() < deadline and await asyncio.to_thread(outbox_backlog, database_url) > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            drained_s = time.monotonic() - started
            backlog = await asyncio.to_thread(outbox_backlog, database_url)
        finally:
            stop(echo)
            stop(gateway)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)

    echo_rate = statistics.median(echo_rounds)
    gw_rate = statistics.median(gw_rounds)
    return {
        "benchmark": "gateway accepted mutations/s vs bare Strawberry echo mutation",
        "mode": "small" if args.small else "full",
        "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
        "seconds_per_round": seconds,
        "rounds": rounds,
        "warmup_s": warmup,
        "connections": connections,
        "echo": {
            "per_s": round(echo_rate, 1),
            "rounds_per_s": [round(r, 1) for r in echo_rounds],
            "failed": echo_failed,
        },
        "gateway": {
            "per_s": round(gw_rate, 1),
            "rounds_per_s": [round(r, 1) for r in gw_rounds],
            "failed": gw_failed,
            "accepted_incl_warmup": accepted_total,
            "outbox_backlog_after": backlog,
            # Seconds from the first timed round (echo rounds included) until the outbox was empty.
            "all_on_kafka_after_s": round(drained_s, 2),
        },
        "ratio": round(gw_rate / echo_rate, 3) if echo_rate else None,
        "target_ratio": 0.7,
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (3 s per side, 16 connections)")
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
    parser.add_argument("--serve-gateway", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return
    if args.serve_gateway:
        serve_gateway(args.serve_gateway)
        return
    result = asyncio.run(bench(args))
    out = REPO / "bench" / "results" / "gateway.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"echo mutation:        {result['echo']['per_s']:>9.1f} /s")
    print(
        f"gateway full path:    {result['gateway']['per_s']:>9.1f} accepted/s "
        f"(all {result['gateway']['accepted_incl_warmup']} on Kafka after "
        f"{result['gateway']['all_on_kafka_after_s']} s)"
    )
    print(f"ratio gateway/echo:   {result['ratio']}  (target >= {result['target_ratio']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
