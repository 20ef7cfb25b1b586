"""Benchmark 4: trip precision, writes accepted beyond the breaker threshold (must be 0), run after run.

Two gateway processes (`python -m kinshasa.gateway serve`) share one PostgreSQL database, with a private
Kafka broker and PostgreSQL cluster on free ports in a temporary directory. For each trial a fresh run
is started and 64 writers, released at once and split over the two gateways, each keep writing
`createDocument` until the breaker refuses them (BREAKER_OPEN). The breaker's check and count are one
atomic step in the shared database, so the accepted writes must equal the threshold exactly whichever
gateway took them; `excess` is accepted minus threshold.

    python -m bench.bench_trip [--small] [--trials 10] [--threshold 100] [--writers 64]

Writes bench/results/trip.json. Exits 1 if any trial accepted a write beyond its threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_trip.py`
    sys.path.insert(0, str(REPO))

from bench.machine import write_result  # noqa: E402

NAME = "trip"
CACHE = REPO / ".kinshasa" / "cache"
AGENT_KEY = "bench-agent-" + "a" * 40
OPERATOR_KEY = "bench-operator-" + "o" * 40
CREATE = 'mutation($r: ID!) { createDocument(runId: $r, input: {title: "trip", body: "x"}) { commandId } }'


def start_gateways(root: Path, cleanup: contextlib.ExitStack, count: int) -> tuple[list[str], str]:
    """Kafka, PostgreSQL and `count` gateway processes on one database; their base URLs and the database."""
    from kinshasa.infra.kafka import KafkaBroker, kafka_libs
    from kinshasa.infra.postgres import PostgresCluster
    from kinshasa.infra.process import ManagedProcess, free_port, wait_until
    from kinshasa.settings import InfraSettings

    infra = InfraSettings()
    kafka = KafkaBroker(root=root / "kafka", libs=kafka_libs(CACHE, infra.kafka_version, infra.kafka_home),
                        port=free_port(), controller_port=free_port())
    cleanup.callback(kafka.stop)
    kafka.start(attached=True)
    # Its own temp dir, which it hands to the unprivileged server account when we are root.
    postgres = PostgresCluster(root=Path(tempfile.mkdtemp(prefix="kinshasa-bench-pg-")), port=free_port())
    cleanup.callback(shutil.rmtree, postgres.root, ignore_errors=True)
    cleanup.callback(postgres.stop)
    postgres.start(attached=True)
    # The gateway learns the example services from their declarations, as when they start beside it.
    from kinshasa.services.registry import publish_example_declarations

    publish_example_declarations(kafka.bootstrap)
    credentials = root / "credentials.json"
    credentials.write_text(json.dumps({"principals": [
        {"id": "bench-agent", "kind": "agent", "scopes": ["*"], "key": AGENT_KEY},
        {"id": "bench-operator", "kind": "operator", "scopes": ["*"], "key": OPERATOR_KEY}]}))
    urls, started = [], []
    for index in range(count):
        port = free_port()
        env = os.environ | {
            "KINSHASA_DATA_DIR": str(root / "data"),
            "KINSHASA_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "KINSHASA_LOG_LEVEL": "WARNING",
            "KINSHASA_GATEWAY_DATABASE_URL": postgres.url,
            "KINSHASA_GATEWAY_CREDENTIALS_FILE": str(credentials),
            "KINSHASA_GATEWAY_HOST": "127.0.0.1",
            "KINSHASA_GATEWAY_PORT": str(port),
        }
        process = ManagedProcess(name=f"gateway-{index}", env=env, cwd=REPO,
                                 argv=[sys.executable, "-m", "kinshasa.gateway", "serve"],
                                 log_path=root / "logs" / f"gateway-{index}.log",
                                 pid_path=root / f"gateway-{index}.pid")
        cleanup.callback(process.stop)
        process.start(attached=True)
        started.append(process)
        urls.append(f"http://127.0.0.1:{port}")
    for url, process in zip(urls, started, strict=True):

        def healthy(url: str = url) -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, process, 120, process.name)
    return urls, postgres.url


async def post(http: httpx.AsyncClient, url: str, key: str, query: str,
               variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await http.post(f"{url}/graphql", json={"query": query, "variables": variables or {}},
                               headers={"Authorization": f"Bearer {key}"})
    body: dict[str, Any] = response.json()
    return body


async def data(http: httpx.AsyncClient, url: str, key: str, query: str) -> dict[str, Any]:
    body = await post(http, url, key, query)
    if body.get("errors"):
        raise RuntimeError(f"gateway refused a setup call: {body['errors']}")
    return dict(body["data"])


async def stored_commands(database_url: str, run_id: str) -> int:
    """The commands the shared database holds for the run: accepted writes as the gateways recorded them."""
    from sqlalchemy import func, select

    from kinshasa.gateway.store import commands
    from kinshasa.kernel.database import create_engine

    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            query = select(func.count()).select_from(commands).where(commands.c.run_id == run_id)
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def trial(urls: list[str], database_url: str, index: int, threshold: int,
                writers: int) -> dict[str, Any]:
    """One run hammered by every writer until the breaker refuses them; what was accepted and what refused."""
    # uvicorn drops connections idle 5 s; keeping them as long races it (a request lost as ReadError).
    limits = httpx.Limits(max_connections=writers * 2, max_keepalive_connections=writers * 2,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started_run = await data(http, urls[index % len(urls)], AGENT_KEY,
                                 f'mutation {{ startRun(entryPoint: "bench-trip-{index}") {{ id }} }}')
        run_id = started_run["startRun"]["id"]
        gate = asyncio.Event()
        accepted = 0
        refused: Counter[str] = Counter()

        async def writer(number: int) -> None:
            nonlocal accepted
            url = urls[number % len(urls)]
            await gate.wait()
            # Bounded so a breaker that never trips ends the trial (with a large excess) instead of hanging.
            for _ in range(threshold + 1):
                try:
                    body = await post(http, url, AGENT_KEY, CREATE, {"r": run_id})
                except httpx.TransportError:
                    # The write's fate is unknown here; the database count below settles it.
                    refused["TRANSPORT_ERROR"] += 1
                    continue
                if not body.get("errors"):
                    accepted += 1
                    continue
                code = body["errors"][0].get("extensions", {}).get("code", "UNKNOWN")
                refused[code] += 1
                if code in ("BREAKER_OPEN", "RUN_CLOSED"):
                    return  # tripped; with auto-revert the run is then closed to every write

        tasks = [asyncio.create_task(writer(n)) for n in range(writers)]
        await asyncio.sleep(0.2)  # every writer is parked on the gate
        started = time.perf_counter()
        gate.set()
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
        read = await data(http, urls[0], OPERATOR_KEY,
                          f'{{ run(id: "{run_id}") {{ breaker {{ state writes tripCount }} }} }}')
    breaker = read["run"]["breaker"]
    stored = await stored_commands(database_url, run_id)
    return {
        "run_id": run_id, "threshold": threshold, "accepted": accepted, "stored": stored,
        # What the database holds is the truth; a receipt lost in transit still counts against the limit.
        "excess": max(accepted, stored) - threshold,
        "refused": dict(refused), "breaker_writes": breaker["writes"], "breaker_state": breaker["state"],
        "trips": breaker["tripCount"], "seconds": round(seconds, 2),
    }


async def measure(urls: list[str], database_url: str, trials: int, threshold: int,
                  writers: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=120) as http:
        await data(http, urls[0], OPERATOR_KEY,
                   'mutation { setPolicy(scope: DEFAULT, reason: "trip bench", settings: {maxWrites: '
                   f"{threshold}, maxVelocity: 10000000, velocityWindowS: 1, quarantineWindowS: 0}}) "
                   "{ version } }")
    results = [await trial(urls, database_url, i, threshold, writers) for i in range(trials)]
    return {
        "database": "postgresql",
        "gateways": len(urls),
        "writers": writers,
        "threshold": threshold,
        "trials": results,
        "total_excess": sum(r["excess"] for r in results),
        "max_excess": max(r["excess"] for r in results),
        "all_exact": all(r["excess"] == 0 and r["stored"] == threshold and r["trips"] == 1 for r in results),
    }


def print_table(f: dict[str, Any]) -> None:
    print(f"trip precision: {f['writers']} writers on {f['gateways']} gateways, one {f['database']} database")
    print(f"{'trial':>5}{'threshold':>11}{'accepted':>10}{'stored':>8}{'excess':>8}{'refused':>9}{'trips':>7}"
          f"{'seconds':>9}")
    for number, r in enumerate(f["trials"], start=1):
        print(f"{number:>5}{r['threshold']:>11}{r['accepted']:>10}{r['stored']:>8}{r['excess']:>8}"
              f"{sum(r['refused'].values()):>9}{r['trips']:>7}{r['seconds']:>9}")
    print(f"total excess: {f['total_excess']} (must be 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run: 2 trials, threshold 20")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--threshold", type=int, default=100, help="the policy's maxWrites")
    parser.add_argument("--writers", type=int, default=64, help="concurrent writers over both gateways")
    args = parser.parse_args(argv)
    trials, threshold = (2, 20) if args.small else (args.trials, args.threshold)
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-trip-"))
    try:
        with contextlib.ExitStack() as cleanup:
            urls, database_url = start_gateways(root, cleanup, count=2)
            figures = asyncio.run(measure(urls, database_url, trials, threshold, args.writers))
    except Exception as exc:
        print(f"trip benchmark failed: {exc!r}\nprocess logs are under {root / 'logs'}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    figures["mode"] = "small" if args.small else "full"
    # Other work on the machine moves every figure; record how busy it was (1, 5, 15 min).
    figures["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    print_table(figures)
    print(f"machine: {os.cpu_count()} cores, load average {figures['load_avg']} (1/5/15 min)")
    print(f"wrote {write_result(NAME, figures)}")
    if not figures["all_exact"]:
        print("PRECISION BROKEN: a trial accepted writes beyond its threshold or tripped more than once",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
