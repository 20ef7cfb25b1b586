"""Benchmark 8: the system gets harder to break the longer it runs.

A seeded synthetic population of agents works through a real gateway process (embedded SQLite, a
private Kafka broker) at three entry points, in rounds. Good runs have realistic shapes (a few notes, an
account and its paperwork, a quick batch import, a long careful session) and now and then a write the
service rejects; rogue runs are of four kinds: a velocity loop, a slow drift of many writes, a fan-out
across services, a burst of writes the service rejects. The bench plays the services' part only for
rejections: it publishes `<operation>.rejected` on the service's events topic, in the contract's shape,
once the command has left the gateway.

Every round replays the same population (same shapes, fresh timing jitter). After each round the bench
reads the round's TRIP incidents and accepts every proposal whose backtest keeps goodRunsTripped at or
under 1% of the good runs replayed, as an operator trusting the system would. Per round it reports the
escaped writes per rogue run (writes that had left the gateway when the breaker stopped the run; all of
a rogue run's writes if it was never stopped) and the share of good runs the breaker tripped.

Target: escaped writes per rogue run fall by at least 80% from round 1 to round 5 while good runs
tripped stay at or under 1%.

    python -m bench.bench_antifragile [--small] [--rounds 5] [--seed 7]

Writes bench/results/antifragile.json. In full mode, exits 1 if the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bench_antifragile.py`
    sys.path.insert(0, str(REPO))

from bench import gateway_process  # noqa: E402
from bench.machine import write_result  # noqa: E402
from kinshasa.schemas.rate_limits import rate_limited_wait  # noqa: E402

NAME = "antifragile"
OPERATOR_KEY = "bench-operator-" + "o" * 40
ENTRY_POINTS = ("support", "billing", "research")
AGENTS = 6
GOOD_SHARE = 0.01
# The policy the operator starts from: generous, as a fresh install is.
START_POLICY = {
    "maxWrites": 60, "maxErrors": 8, "maxServices": 3, "maxVelocity": 40, "velocityWindowS": 2.0,
    "quarantineWindowS": 0.3, "autoRevert": True,
}
# (mutation, service, entity type, input) per kind of write.
WRITES: dict[str, tuple[str, str, str, str]] = {
    "doc": ("createDocument", "documents", "document", '{title: "t", body: "b"}'),
    "account": ("openAccount", "ledger", "account", '{name: "n", currency: "EUR"}'),
    "link": ("link", "links", "link", '{fromId: "%s", toId: "%s", kind: "references"}'),
    "email": ("sendEmail", "notifier", "email", '{to: "a@example.org", subject: "s", body: "b"}'),
}


def agent_key(n: int) -> str:
    return f"bench-agent-{n}-" + "a" * 40


@dataclass(frozen=True)
class Step:
    kind: str
    gap_s: float
    reject: bool = False


@dataclass(frozen=True)
class Shape:
    """One run of the population: who, where, what kind, and its writes (gaps drawn afresh per round)."""

    name: str
    rogue: bool
    agent: int
    entry_point: str
    kinds: tuple[str, ...]
    gaps: tuple[float, float]
    rejects: frozenset[int] = frozenset()

    def steps(self, rng: random.Random) -> list[Step]:
        return [Step(k, rng.uniform(*self.gaps), i in self.rejects) for i, k in enumerate(self.kinds)]


def population(seed: int, good: int, rogue_per_kind: int) -> list[Shape]:
    rng = random.Random(seed)
    shapes: list[Shape] = []
    for n in range(good):
        entry, agent = ENTRY_POINTS[n % len(ENTRY_POINTS)], rng.randrange(AGENTS)
        kind = rng.choices(("notes", "account", "import", "session"), weights=(5, 3, 2, 1))[0]
        if kind == "notes":
            kinds, gaps = ("doc",) * rng.randint(2, 5), (0.05, 0.25)
        elif kind == "account":
            kinds, gaps = ("account",) * rng.randint(1, 3) + ("doc",) * rng.randint(1, 2), (0.05, 0.2)
        elif kind == "import":
            kinds, gaps = ("doc",) * rng.randint(6, 12), (0.01, 0.03)
        else:
            kinds, gaps = tuple(rng.choice(("doc", "link")) for _ in range(rng.randint(15, 25))), (0.08, 0.15)
        roll = rng.random()
        rejects = frozenset(rng.sample(range(len(kinds)), min(len(kinds), 1 if roll < 0.9 else 2))) \
            if roll > 0.85 else frozenset()
        shapes.append(Shape(f"good.{kind}", False, agent, entry, kinds, gaps, rejects))
    for n in range(rogue_per_kind):
        entry = ENTRY_POINTS[n % len(ENTRY_POINTS)]
        shapes += [
            Shape("rogue.velocity_loop", True, rng.randrange(AGENTS), entry, ("doc",) * 120, (0.0, 0.005)),
            Shape("rogue.slow_drift", True, rng.randrange(AGENTS), entry,
                  tuple(("doc", "link")[i % 2] for i in range(70)), (0.04, 0.06)),
            Shape("rogue.fan_out", True, rng.randrange(AGENTS), entry,
                  ("doc",) * 10 + ("account",) * 10 + ("link",) * 10 + ("email",) * 5, (0.08, 0.12)),
            Shape("rogue.rejected_burst", True, rng.randrange(AGENTS), entry, ("doc",) * 30, (0.02, 0.03),
                  frozenset(range(30))),
        ]
    return shapes


def start_gateway(root: Path, cleanup: contextlib.ExitStack) -> tuple[str, str]:
    """Kafka and one gateway process with the bench's agents; returns the gateway's URL and Kafka's."""
    principals = [{"id": f"bench-agent-{n}", "kind": "agent", "scopes": ["*"], "key": agent_key(n)}
                  for n in range(AGENTS)]
    principals.append({"id": "bench-operator", "kind": "operator", "scopes": ["*"], "key": OPERATOR_KEY})
    env = {
        "KINSHASA_GATEWAY_RELEASER_INTERVAL_S": "0.05",
        # The breaker is what is measured, not the gateway's per-principal rate limits.
        "KINSHASA_GATEWAY_PRINCIPAL_LIMITS": json.dumps(
            {f"bench-agent-{n}": {"rate_per_s": 1e9, "rate_burst": 1e9, "max_in_flight": 10_000}
             for n in range(AGENTS)}),
    }
    url, bootstrap = gateway_process.start_gateway(root, cleanup, principals, env)
    return f"{url}/graphql", bootstrap


class Gateway:
    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http, self.url = http, url

    async def call(self, key: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        for attempt in range(5):
            try:
                response = await self.http.post(self.url, json={"query": query, "variables": variables or {}},
                                                headers={"Authorization": f"Bearer {key}"})
                return dict(response.json())
            except httpx.TransportError:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def data(self, key: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer's data. A RATE_LIMITED answer is waited out as the console and the CLI do: this
        bench's operator reads the stack as fast as it can, and its rate is the gateway's default."""
        body = await self.call(key, query, variables)
        for _ in range(20):
            wait = rate_limited_wait(body, min_wait_s=0.05)
            if wait is None:
                break
            await asyncio.sleep(wait)
            body = await self.call(key, query, variables)
        if body.get("errors"):
            raise RuntimeError(f"gateway refused a call: {body['errors']}")
        return dict(body["data"])


@dataclass
class Played:
    shape: Shape
    run_id: str
    accepted: int = 0
    tripped: bool = False
    rejections: list[asyncio.Task[None]] = field(default_factory=list)


class Service:
    """The services' part the bench plays: rejecting a command once it has left the gateway."""

    def __init__(self, gateway: Gateway, producer: Any) -> None:
        self.gateway, self.producer = gateway, producer

    async def reject(self, run_id: str, receipt: dict[str, Any], service: str, entity: str) -> None:
        from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
        from kinshasa.topics.catalogue import events_topic

        if receipt.get("releaseAt"):
            # Nothing reaches the service before the window ends: no need to ask before then.
            due = datetime.fromisoformat(receipt["releaseAt"]) - datetime.now(UTC)
            await asyncio.sleep(max(0.0, due.total_seconds()))
        for _ in range(50):
            data = await self.gateway.data(OPERATOR_KEY, "query($c: ID!) { command(id: $c) { status } }",
                                           {"c": receipt["commandId"]})
            status = data["command"]["status"]
            if status == "PUBLISHED":
                break
            if status not in ("HELD", "AWAITING_APPROVAL"):
                return  # discarded: it never reached the service
            await asyncio.sleep(0.2)
        else:
            return
        await self.producer.send_envelope(events_topic(service), Envelope(
            message_id=uuid.uuid4(), type=f"{receipt['operation']}.rejected", run_id=run_id,
            actor=Actor(kind="service", id=service), causation_id=uuid.UUID(receipt["commandId"]),
            correlation_id=run_id, entity=EntityRef(service=service, type=entity, id=receipt["entityId"]),
            occurred_at=utcnow(), payload={"reason": "refused by the service"}))
        # Until the gateway has counted it: a round's trips are read only once every rejection was.
        for _ in range(100):
            data = await self.gateway.data(OPERATOR_KEY, "query($c: ID!) { command(id: $c) { status } }",
                                           {"c": receipt["commandId"]})
            if data["command"]["status"] == "REJECTED":
                return
            await asyncio.sleep(0.1)


async def play(gateway: Gateway, service: Service, shape: Shape, rng: random.Random) -> Played:
    key = agent_key(shape.agent)
    started = await gateway.data(key, "mutation($e: String!) { startRun(entryPoint: $e) { id } }",
                                 {"e": shape.entry_point})
    played = Played(shape, started["startRun"]["id"])
    for step in shape.steps(rng):
        await asyncio.sleep(step.gap_s)
        mutation, svc, entity, args = WRITES[step.kind]
        if step.kind == "link":
            args = args % (uuid.uuid4(), uuid.uuid4())
        body = await gateway.call(
            key, f"mutation($r: ID!) {{ {mutation}(runId: $r, input: {args}) "
                 "{ commandId entityId operation status releaseAt } }", {"r": played.run_id})
        if body.get("errors"):
            code = body["errors"][0].get("extensions", {}).get("code")
            if code not in ("BREAKER_OPEN", "RUN_CLOSED"):
                raise RuntimeError(f"unexpected refusal: {body['errors']}")
            played.tripped = True
            break
        played.accepted += 1
        if step.reject:
            receipt = body["data"][mutation]
            played.rejections.append(asyncio.create_task(service.reject(played.run_id, receipt, svc, entity)))
    if played.rejections:
        await asyncio.gather(*played.rejections)
    if not played.tripped:
        await gateway.call(key, "mutation($r: ID!) { finishRun(runId: $r) { id } }", {"r": played.run_id})
    return played


INCIDENTS = """query($after: String) { incidents(first: 50, after: $after, kind: TRIP) {
  nodes { id runId openedAt escaped { count } } pageInfo { hasNextPage endCursor } } }"""
PROPOSALS = """query($i: ID!) { incident(id: $i) { entryPoint proposals { id status rationale
  backtest { goodRunsReplayed goodRunsTripped } } } }"""
LAYERS = """{ policy { layers { scope subject settings { maxWrites maxErrors maxServices maxVelocity
  operationWindows operationGates } } } }"""
RUN_COUNTS = "query($r: ID!) { run(id: $r) { counts { published held } } }"


async def trips_since(gateway: Gateway, since: datetime) -> dict[str, dict[str, Any]]:
    """The TRIP incidents opened since `since`, by run."""
    found: dict[str, dict[str, Any]] = {}
    after = None
    while True:
        page = (await gateway.data(OPERATOR_KEY, INCIDENTS, {"after": after}))["incidents"]
        for node in page["nodes"]:
            if datetime.fromisoformat(node["openedAt"]) < since:
                return found
            found.setdefault(node["runId"], node)
        if not page["pageInfo"]["hasNextPage"]:
            return found
        after = page["pageInfo"]["endCursor"]


async def run_round(gateway: Gateway, service: Service, shapes: list[Shape], seed: int, number: int,
                    concurrency: int) -> dict[str, Any]:
    since = datetime.now(UTC)
    rng = random.Random(seed * 1000 + number)
    gate = asyncio.Semaphore(concurrency)
    # Rogue runs first, so they meet the good runs of the round rather than an idle gateway.
    order = sorted(shapes, key=lambda s: not s.rogue)

    async def one(shape: Shape, jitter: random.Random) -> Played:
        async with gate:
            return await play(gateway, service, shape, jitter)

    started = time.monotonic()
    played = await asyncio.gather(*(one(s, random.Random(rng.random())) for s in order))
    elapsed = time.monotonic() - started
    trips = await trips_since(gateway, since)
    escaped_by_kind: dict[str, list[int]] = {}
    good = [p for p in played if not p.shape.rogue]
    for p in played:
        if not p.shape.rogue:
            continue
        incident = trips.get(p.run_id)
        if incident is not None:
            escaped = sum(e["count"] for e in incident["escaped"])
        else:  # never stopped: everything it wrote leaves (held writes once their window ends)
            counts = (await gateway.data(OPERATOR_KEY, RUN_COUNTS, {"r": p.run_id}))["run"]["counts"]
            escaped = int(counts["published"]) + int(counts["held"])
        escaped_by_kind.setdefault(p.shape.name, []).append(escaped)
    rogue_escaped = [n for values in escaped_by_kind.values() for n in values]
    good_tripped = sum(1 for p in good if p.run_id in trips)

    # The operator's part: accept what the recorded runs prove safe for the good runs.
    seen = accepted = 0
    rationales: list[str] = []
    for incident in trips.values():
        # Reading an incident's proposals drafts them from the recorded runs.
        found = await gateway.data(OPERATOR_KEY, PROPOSALS, {"i": incident["id"]})
        for proposal in found["incident"]["proposals"]:
            seen += 1
            backtest = proposal["backtest"]
            if proposal["status"] != "PROPOSED":
                continue
            if backtest["goodRunsTripped"] <= int(backtest["goodRunsReplayed"] * GOOD_SHARE + 1e-9):
                await gateway.data(OPERATOR_KEY, 'mutation($p: ID!) { acceptProposal(id: $p, reason: '
                                   '"bench: backtest keeps good runs") { status } }', {"p": proposal["id"]})
                accepted += 1
                rationales.append(f"{found['incident']['entryPoint']}: {proposal['rationale']}")
    return {
        "round": number,
        "seconds": round(elapsed, 1),
        "good_runs": len(good),
        "good_runs_tripped": good_tripped,
        "good_tripped_share": round(good_tripped / len(good), 4) if good else 0.0,
        "rogue_runs": len(rogue_escaped),
        "rogue_runs_tripped": sum(1 for p in played if p.shape.rogue and p.run_id in trips),
        "escaped_writes": sum(rogue_escaped),
        "escaped_per_rogue_run": round(sum(rogue_escaped) / len(rogue_escaped), 2) if rogue_escaped else 0.0,
        "escaped_per_rogue_kind": {k: round(sum(v) / len(v), 2) for k, v in sorted(escaped_by_kind.items())},
        "proposals_seen": seen,
        "proposals_accepted": accepted,
        "accepted": rationales,
    }


async def measure(url: str, bootstrap: str, args: argparse.Namespace) -> dict[str, Any]:
    from kinshasa.topics.producer import AsyncProducer

    shapes = population(args.seed, args.good, args.rogue_per_kind)
    limits = httpx.Limits(max_connections=args.concurrency * 4,
                          max_keepalive_connections=args.concurrency * 2, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http, \
            AsyncProducer(bootstrap, client_id="bench-antifragile-service") as producer:
        gateway = Gateway(http, url)
        settings = ", ".join(f"{k}: {json.dumps(v)}" for k, v in START_POLICY.items())
        await gateway.data(OPERATOR_KEY, f'mutation {{ setPolicy(scope: DEFAULT, reason: "bench start", '
                                         f"settings: {{{settings}}}) {{ version }} }}")
        service = Service(gateway, producer)
        rounds = []
        for number in range(1, args.rounds + 1):
            figures = await run_round(gateway, service, shapes, args.seed, number, args.concurrency)
            rounds.append(figures)
            print(f"round {number}: escaped per rogue run {figures['escaped_per_rogue_run']:>6} "
                  f"({figures['rogue_runs_tripped']}/{figures['rogue_runs']} rogue runs stopped); good runs "
                  f"tripped {figures['good_runs_tripped']}/{figures['good_runs']} "
                  f"({figures['good_tripped_share']:.1%}); proposals accepted {figures['proposals_accepted']}"
                  f"/{figures['proposals_seen']}; {figures['escaped_per_rogue_kind']}", flush=True)
        layers = (await gateway.data(OPERATOR_KEY, LAYERS))["policy"]["layers"]
    first, last = rounds[0]["escaped_per_rogue_run"], rounds[-1]["escaped_per_rogue_run"]
    reduction = round(1 - last / first, 4) if first else 0.0
    worst_good = max(r["good_tripped_share"] for r in rounds)
    return {
        "seed": args.seed,
        "rounds": rounds,
        "population": {"good_runs": args.good, "rogue_runs": 4 * args.rogue_per_kind,
                       "entry_points": len(ENTRY_POINTS), "agents": AGENTS},
        "start_policy": START_POLICY,
        # What the rounds taught, per entry point: the layers the accepted proposals appended.
        "learned_layers": {layer["subject"]: {k: v for k, v in layer["settings"].items() if v is not None}
                           for layer in layers if layer["scope"] == "ENTRY_POINT"},
        "escaped_reduction": reduction,
        "worst_good_tripped_share": worst_good,
        "target_met": reduction >= 0.8 and worst_good <= GOOD_SHARE,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="learning rounds (5; 3 with --small)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--good", type=int, default=None)
    parser.add_argument("--rogue-per-kind", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.small else 5
    if args.good is None:
        args.good = 36 if args.small else 240
    if args.rogue_per_kind is None:
        args.rogue_per_kind = 2 if args.small else 6
    root = Path(tempfile.mkdtemp(prefix="kinshasa-bench-antifragile-"))
    try:
        with contextlib.ExitStack() as cleanup:
            url, bootstrap = start_gateway(root, cleanup)
            figures = asyncio.run(measure(url, bootstrap, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures["mode"] = "small" if args.small else "full"
    path = write_result(NAME, figures)
    print(f"escaped writes per rogue run: round 1 {figures['rounds'][0]['escaped_per_rogue_run']} -> "
          f"round {len(figures['rounds'])} {figures['rounds'][-1]['escaped_per_rogue_run']} "
          f"({figures['escaped_reduction']:.0%} fewer); worst share of good runs tripped "
          f"{figures['worst_good_tripped_share']:.1%}; target {'met' if figures['target_met'] else 'MISSED'}")
    print(f"wrote {path}")
    return 0 if figures["target_met"] or args.small else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
