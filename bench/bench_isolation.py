"""Benchmark 7: isolation, another principal's write latency while an agent fires the costliest allowed reads.

The real processes of the stack, as bench_latency starts them (the gateway, the documents service and the
coordinator, each its own process on the embedded SQLite default, with a private Kafka broker and Temporal
dev server), on the gateway's default limits. Setup: the attacking agent fills `--runs` runs with
`--writes` writes each (quarantine window 0), so its reads find real commands and ledger steps. Then, in
alternating rounds of the same run:

* quiet: a victim agent (another principal) offers `createDocument` at `--rate` per second, open loop;
* attacked: the same writes while the attacker, from `--attackers` connections, fires the costliest read
  the gateway admits: aliases of `runs(first: <runs>) { nodes { counts commands(first: <writes>)
  steps(first: <writes>) } }`, as many as fit under the cost limit (sized from the QUERY_TOO_COSTLY answer
  to one alias more), as fast as its rate limit lets it (on RATE_LIMITED it waits `retryAfterS`).

The gateway runs reads that costly in its reader processes (kinshasa/gateway/readers.py), started by the
attacker's first read during the warm-up, which waits until they serve; `attack.offloaded` counts the
reads they answered (`--gateway-setting readers=0` measures the gateway without them).

It reports the victim's write latency (sent to answered) p50/p95/p99 with and without the attacker and the
ratio of the p99s; target <= 2, reported, not asserted.

    python -m bench.bench_isolation [--small] [--postgres] [--rate 20] [--seconds 10] [--rounds 5]
                                    [--gateway-setting rate_per_s=5000 ...]

Writes bench/results/isolation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_isolation.py`
    sys.path.insert(0, str(REPO))

from bench.bench_latency import percentiles, start_stack  # noqa: E402
from bench.machine import write_result  # noqa: E402
from kinshasa.schemas.rate_limits import rate_limited_wait  # noqa: E402

NAME = "isolation"
ATTACKER_KEY = "bench-attacker-" + "a" * 40
VICTIM_KEY = "bench-victim-" + "v" * 40
OPERATOR_KEY = "bench-operator-" + "o" * 40
PRINCIPALS = [
    {"id": "bench-attacker", "kind": "agent", "scopes": ["*"], "key": ATTACKER_KEY},
    {"id": "bench-victim", "kind": "agent", "scopes": ["*"], "key": VICTIM_KEY},
    {"id": "bench-operator", "kind": "operator", "scopes": ["*"], "key": OPERATOR_KEY},
]
CREATE = ('mutation($r: ID!, $t: String!) { createDocument(runId: $r, input: {title: $t, body: "isolation"}) '
          "{ commandId status } }")
MAX_ALIASES = 30  # the gateway's default alias limit


async def gql(http: httpx.AsyncClient, url: str, key: str, query: str,
              variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await http.post(f"{url}/graphql", json={"query": query, "variables": variables or {}},
                               headers={"Authorization": f"Bearer {key}"})
    body: dict[str, Any] = response.json()
    return body


async def data(http: httpx.AsyncClient, url: str, key: str, query: str,
               variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """The answer's data; a RATE_LIMITED answer is retried when it says, as a well-behaved agent does."""
    while True:
        body = await gql(http, url, key, query, variables)
        errors = body.get("errors") or []
        wait = rate_limited_wait(body)
        if wait is not None:
            await asyncio.sleep(wait)
            continue
        if errors:
            raise RuntimeError(f"bench setup refused: {errors}")
        return dict(body["data"])


def attack_query(runs: int, writes: int, aliases: int) -> str:
    one = (f"runs(first: {runs}) {{ nodes {{ id status counts {{ held published applied }} "
           f"commands(first: {writes}) {{ commandId status operation }} "
           f"steps(first: {writes}) {{ nodes {{ stepId status operation entityKey }} }} }} }}")
    return "{ " + " ".join(f"a{i}: {one}" for i in range(aliases)) + " }"


async def costliest_allowed(
    http: httpx.AsyncClient, url: str, runs: int, writes: int
) -> tuple[str, int, int]:
    """The attack query with as many aliases as the cost limit admits: (query, aliases, its cost)."""
    probe = await gql(http, url, ATTACKER_KEY, attack_query(runs, writes, MAX_ALIASES))
    errors = probe.get("errors") or []
    refused = next((e for e in errors if e.get("extensions", {}).get("code") == "QUERY_TOO_COSTLY"), None)
    if refused is None:
        return attack_query(runs, writes, MAX_ALIASES), MAX_ALIASES, 0
    per_alias = refused["extensions"]["cost"] / MAX_ALIASES
    aliases = max(1, int(refused["extensions"]["limit"] // per_alias))
    return attack_query(runs, writes, aliases), aliases, round(per_alias * aliases)


async def fill(http: httpx.AsyncClient, urls: dict[str, str], runs: int, writes: int) -> list[str]:
    """The attacker's runs, `writes` documents each, waited for until the ledger lists them all."""
    gateway = urls["gateway"]
    start = 'mutation { startRun(entryPoint: "isolation") { id } }'
    run_ids = [(await data(http, gateway, ATTACKER_KEY, start))["startRun"]["id"] for _ in range(runs)]
    gate = asyncio.Semaphore(16)

    async def write(run_id: str, index: int) -> None:
        async with gate:
            await data(http, gateway, ATTACKER_KEY, CREATE, {"r": run_id, "t": f"doc {index}"})

    await asyncio.gather(*(write(r, i) for r in run_ids for i in range(writes)))
    deadline = time.monotonic() + 120
    # Polling the coordinator's API: the projection happens in another process.
    for run_id in run_ids:
        while time.monotonic() < deadline:
            page = await http.get(f"{urls['coordinator']}/runs/{run_id}/steps", params={"limit": writes})
            if page.status_code == 200 and len(page.json()["steps"]) >= writes:
                break
            await asyncio.sleep(0.2)
    return run_ids


@dataclass
class Attack:
    """What the attacker got: reads served, refusals by code, and served reads' latencies."""

    served: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def attack(url: str, query: str, connections: int, seconds: float) -> Attack:
    """Fire `query` from `connections` connections for `seconds`, waiting out every RATE_LIMITED."""
    into = Attack()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                          keepalive_expiry=2.0)

    async def one(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            body = await gql(http, url, ATTACKER_KEY, query)
            codes = [e.get("extensions", {}).get("code") for e in body.get("errors") or []]
            limited = next((e for e in body.get("errors") or []
                            if e.get("extensions", {}).get("code") == "RATE_LIMITED"), None)
            if limited is not None:
                into.refused["RATE_LIMITED"] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), float(limited["extensions"]["retryAfterS"]))
            elif codes and body.get("data") is None:
                into.refused[str(codes[0])] += 1
            else:
                into.served += 1
                into.latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.monotonic()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        print("firing", flush=True)
        await asyncio.gather(*(one(http) for _ in range(connections)))
        into.seconds = time.monotonic() - started
    return into


class AttackerProcess:
    """`attack` in a process of its own: parsing its large answers must not delay the victim's clock."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, query: str, connections: int, seconds: float) -> AttackerProcess:
        """Returns once the attacker is firing."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bench_isolation", "--attack", url, "--attackers", str(connections),
            "--seconds", str(seconds), cwd=REPO, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(query.encode())
        process.stdin.close()
        if (await process.stdout.readline()).strip() != b"firing":
            raise RuntimeError("the attacker process did not start")
        return cls(process)

    async def report(self, into: Attack) -> None:
        assert self.process.stdout is not None
        out = await self.process.stdout.read()
        if await self.process.wait() != 0:
            raise RuntimeError(f"the attacker process exited {self.process.returncode}")
        got = json.loads(out)
        into.served += got["served"]
        into.refused.update(got["refused"])
        into.latencies += got["latencies"]
        into.seconds += got["seconds"]


@dataclass
class Cpu:
    """CPU used over phases: the gateway process's seconds, and the machine's busy share (Linux /proc)."""

    gateway_s: float = 0.0
    machine_busy: float = 0.0
    machine_total: float = 0.0
    wall_s: float = 0.0

    @staticmethod
    def machine() -> tuple[float, float]:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return 0.0, 0.0
        total = sum(fields[:8])
        return total - fields[3] - fields[4], total

    @contextlib.asynccontextmanager
    async def measuring(self, pid: int | None) -> Any:
        from bench.bench_gateway import process_cpu_s

        gateway = process_cpu_s(pid) if pid else None
        busy, total = self.machine()
        started = time.monotonic()
        yield
        self.wall_s += time.monotonic() - started
        after = process_cpu_s(pid) if pid else None
        if gateway is not None and after is not None:
            self.gateway_s += after - gateway
        busy_after, total_after = self.machine()
        self.machine_busy += busy_after - busy
        self.machine_total += total_after - total

    def figures(self) -> dict[str, float | None]:
        return {
            "gateway_cores": round(self.gateway_s / self.wall_s, 2) if self.wall_s else None,
            "machine_busy": round(self.machine_busy / self.machine_total, 2) if self.machine_total else None,
        }


async def victim_writes(http: httpx.AsyncClient, url: str, run_id: str, rate: float,
                        seconds: float) -> tuple[list[float], list[str]]:
    """Open loop: write i is sent at t0 + i/rate; returns the latencies of accepted writes and errors."""
    latencies: list[float] = []
    errors: list[str] = []

    async def one(index: int) -> None:
        sent = time.perf_counter()
        try:
            body = await gql(http, url, VICTIM_KEY, CREATE, {"r": run_id, "t": f"victim {index}"})
        except httpx.HTTPError as exc:
            errors.append(repr(exc))
            return
        if body.get("errors"):
            errors.append(str(body["errors"][0].get("extensions", {}).get("code")))
        else:
            latencies.append(time.perf_counter() - sent)

    tasks = []
    start = time.perf_counter()
    for index in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    return latencies, errors


async def gateway_metrics(http: httpx.AsyncClient, url: str, token: str) -> str:
    response = await http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.text


def offloaded_reads(metrics: str) -> int:
    """Costly reads the gateway's readers answered (kinshasa/gateway/readers.py)."""
    found = re.search(r"^kinshasa_offloaded_reads_total\{[^}]*\} (\S+)$", metrics, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


async def readers_up(http: httpx.AsyncClient, url: str, token: str, readers: int) -> None:
    """Wait (part of the warm-up) until the readers the attacker's first read started are serving."""
    deadline = time.monotonic() + 120
    for index in range(1, readers + 1):
        up = re.compile(rf'^kinshasa_role_up\{{[^}}]*role="reader-{index}"[^}}]*\}} 1', re.MULTILINE)
        while not up.search(await gateway_metrics(http, url, token)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"reader-{index} of the gateway did not come up")
            await asyncio.sleep(0.2)


async def measure(
    urls: dict[str, str], args: argparse.Namespace, overrides: dict[str, str], gateway_pid: int | None,
    token: str,
) -> dict[str, Any]:
    gateway = urls["gateway"]
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await data(http, gateway, OPERATOR_KEY,
                   'mutation { setPolicy(scope: DEFAULT, reason: "isolation bench", settings: {maxWrites: '
                   "10000000, maxVelocity: 10000000, velocityWindowS: 1, quarantineWindowS: 0}) "
                   "{ version } }")
        started = time.monotonic()
        await fill(http, urls, args.runs, args.writes)
        setup_s = time.monotonic() - started
        query, aliases, cost = await costliest_allowed(http, gateway, args.runs, args.writes)
        start = 'mutation { startRun(entryPoint: "isolation-victim") { id } }'
        victim_run = (await data(http, gateway, VICTIM_KEY, start))["startRun"]["id"]
        # Warm-up, not counted: connections, caches, the victim's run and the attacker's query plan.
        await victim_writes(http, gateway, victim_run, args.rate, args.warmup)
        await gql(http, gateway, ATTACKER_KEY, query)  # its cost starts the gateway's readers
        from kinshasa.gateway.settings import GatewayConfig

        defaults = GatewayConfig(**overrides)  # type: ignore[arg-type]
        await readers_up(http, gateway, token, defaults.readers)
        await asyncio.sleep(1.0)  # the attacker's bucket refills
        offloaded_before = offloaded_reads(await gateway_metrics(http, gateway, token))

        quiet: list[float] = []
        attacked: list[float] = []
        errors: list[str] = []
        report = Attack()
        quiet_cpu, attacked_cpu = Cpu(), Cpu()
        for _ in range(args.rounds):
            async with quiet_cpu.measuring(gateway_pid):
                lat, err = await victim_writes(http, gateway, victim_run, args.rate, args.seconds)
            quiet += lat
            errors += err
            # The attack outlasts the victim's writes a little, so every one of them meets it.
            attacker = await AttackerProcess.start(gateway, query, args.attackers, args.seconds + 0.5)
            async with attacked_cpu.measuring(gateway_pid):
                lat, err = await victim_writes(http, gateway, victim_run, args.rate, args.seconds)
            await attacker.report(report)
            attacked += lat
            errors += err
            await asyncio.sleep(1.0)  # in-flight reads finish and the bucket refills before the next quiet
        offloaded = offloaded_reads(await gateway_metrics(http, gateway, token)) - offloaded_before

    quiet_ms, attacked_ms = percentiles(quiet), percentiles(attacked)
    offered = round(args.rate * args.seconds) * args.rounds
    return {
        "offered_per_s": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "setup_s": round(setup_s, 1),
        "victim": {"offered": 2 * offered, "accepted": len(quiet) + len(attacked),
                   "errors": sorted(set(errors))[:5]},
        "quiet_ms": quiet_ms,
        "attacked_ms": attacked_ms,
        "ratio_p99": round(attacked_ms["p99"] / quiet_ms["p99"], 2)
        if attacked_ms["p99"] and quiet_ms["p99"] else None,
        "target_ratio": 2.0,
        # Cores the gateway process used, and how busy the whole machine was, in each kind of phase.
        "cpu": {"quiet": quiet_cpu.figures(), "attacked": attacked_cpu.figures()},
        "attack": {
            "runs": args.runs,
            "writes_per_run": args.writes,
            "aliases": aliases,
            "query_cost": cost,
            "connections": args.attackers,
            "served": report.served,
            # Of those, answered by the gateway's readers rather than the gateway process itself.
            "offloaded": offloaded,
            "served_per_s": round(report.served / report.seconds, 2) if report.seconds else None,
            "refused": dict(report.refused),
            "read_ms": percentiles(report.latencies),
        },
        "limits": {"max_query_cost": defaults.max_query_cost, "rate_per_s": defaults.rate_per_s,
                   "rate_burst": defaults.rate_burst, "max_in_flight": defaults.max_in_flight,
                   "readers": defaults.readers, "read_offload_cost": defaults.read_offload_cost,
                   "reader_nice": defaults.reader_nice},
    }


def start_postgres(cleanup: contextlib.ExitStack) -> str:
    """A private PostgreSQL cluster on a free port, stopped and removed by `cleanup`; its URL."""
    from kinshasa.infra.postgres import PostgresCluster
    from kinshasa.infra.process import free_port

    # Its own temp dir, which it hands to the unprivileged server account when we are root.
    postgres = PostgresCluster(root=Path(tempfile.mkdtemp(prefix="kinshasa-bench-pg-")), port=free_port())
    cleanup.callback(shutil.rmtree, postgres.root, ignore_errors=True)
    cleanup.callback(postgres.stop)
    postgres.start(attached=True)
    return postgres.url


def print_table(f: dict[str, Any]) -> None:
    a = f["attack"]
    print(f"gateway database: {f['database']}")
    print(f"victim writes at {f['offered_per_s']:g}/s, {f['rounds']} x {f['seconds']:g} s quiet and "
          f"attacked: {f['victim']['accepted']}/{f['victim']['offered']} accepted")
    print(f"attacker: {a['aliases']} aliases of runs(first: {a['runs']}) with commands and steps(first: "
          f"{a['writes_per_run']}), cost {a['query_cost']} (limit {f['limits']['max_query_cost']}), "
          f"{a['connections']} connections: {a['served']} served ({a['served_per_s']}/s, "
          f"{a['offloaded']} by the gateway's {f['limits']['readers']} reader(s)), "
          f"refused {a['refused']}, read p50 {a['read_ms']['p50']} ms")
    print(f"{'victim write (ms)':<22}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for label, key in (("quiet", "quiet_ms"), ("attacked", "attacked_ms")):
        row = f[key]
        print(f"{label:<22}" + "".join(f"{row[p] if row[p] is not None else '-':>9}"
                                       for p in ("p50", "p95", "p99", "max")))
    print(f"ratio attacked/quiet p99: {f['ratio_p99']}  (target <= {f['target_ratio']:g}, not asserted)")
    cpu = f["cpu"]
    print(f"gateway process cores quiet/attacked: {cpu['quiet']['gateway_cores']}/"
          f"{cpu['attacked']['gateway_cores']}; machine busy {cpu['quiet']['machine_busy']}/"
          f"{cpu['attacked']['machine_busy']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run: 1 round of 4 s each, less data")
    parser.add_argument("--rate", type=float, default=20.0, help="the victim's writes per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each quiet and attacked phase")
    # Five rounds: each p99 rests on 1,000 writes at the default rate (600 with three, where one run
    # in three came out 0.1 over or under the target by the draw of its six slowest writes).
    parser.add_argument("--rounds", type=int, default=5, help="alternating quiet/attacked rounds")
    parser.add_argument("--runs", type=int, default=20, help="the attacker's runs, each read by its query")
    parser.add_argument("--writes", type=int, default=25, help="writes (commands, steps) per attacker run")
    parser.add_argument("--attackers", type=int, default=8, help="the attacker's concurrent connections")
    parser.add_argument("--gateway-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a gateway setting other than its default, e.g. rate_per_s=5000 (repeatable)")
    parser.add_argument("--postgres", action="store_true",
                        help="the gateway's database on a private PostgreSQL cluster instead of SQLite")
    parser.add_argument("--attack", metavar="URL", help=argparse.SUPPRESS)  # the attacker process
    args = parser.parse_args(argv)
    if args.attack:
        report = asyncio.run(attack(args.attack, sys.stdin.read(), args.attackers, args.seconds))
        print(json.dumps({"served": report.served, "refused": dict(report.refused),
                          "latencies": report.latencies, "seconds": report.seconds}))
        return 0
    overrides = dict(item.split("=", 1) for item in args.gateway_setting)
    args.warmup = 2.0
    if args.small:
        args.seconds, args.rounds, args.runs, args.writes, args.warmup = 4.0, 1, 8, 10, 1.0
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-isolation-"))
    try:
        with contextlib.ExitStack() as cleanup:
            env = {f"KINSHASA_GATEWAY_{name.upper()}": value for name, value in overrides.items()}
            if args.postgres:
                env["KINSHASA_GATEWAY_DATABASE_URL"] = start_postgres(cleanup)
            urls = start_stack(root, cleanup, principals=PRINCIPALS, gateway_env=env)
            pid_file = root / "gateway.pid"
            pid = int(pid_file.read_text()) if pid_file.exists() else None
            token = (root / "data" / "internal-token").read_text().strip()
            figures = asyncio.run(measure(urls, args, overrides, pid, token))
    except Exception as exc:
        print(f"isolation benchmark failed: {exc!r}\nprocess logs are under {root / 'logs'}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    figures["mode"] = "small" if args.small else "full"
    figures["database"] = "postgresql" if args.postgres else "sqlite"
    figures["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    print_table(figures)
    print(f"machine: {os.cpu_count()} cores, load average {figures['load_avg']} (1/5/15 min)")
    path = write_result(NAME, figures)
    print(f"wrote {path}")
    victim = figures["victim"]
    complete = victim["accepted"] == victim["offered"] and figures["attack"]["served"] > 0
    if not complete:
        print("not every victim write was accepted, or the attacker got no read served: see the result",
              file=sys.stderr)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
