"""The soak: the whole stack under a steady agent load with a random fault about every 30 s, then the checks.

    python -m bench.soak [--minutes 10] [--seconds S] [--agents 3] [--rate 2] [--fault-every 30]
                         [--gateways 2] [--revert-share 0.25] [--seed N] [--results-dir DIR]

The stack is the e2e suite's (`tests.e2e.stack.running_stack`): every process of the launcher's plan
(gateway replicas, the example services, coordinator, SMTP sink), with a private Kafka broker and
Temporal dev server from `LocalInfra`. With two or more `--gateways` (the default), the replicas share
one PostgreSQL database and every component runs on PostgreSQL; `--gateways 1` runs the embedded SQLite
default. A few agents write through the GraphQL API, each in runs of its own (documents created and
renamed, an account opened and posted to, documents linked; quarantine window 0 by
`setPolicy(loosen: true)`), and the operator reverts a share of the finished runs. Each agent starts on
a replica of its own and, like a load balancer that drops a backend it cannot connect to, moves to the
next when its replica refuses the connection. Every write carries an idempotency key and is sent again
until a gateway answers, so a write in flight when a fault hits is accepted once or not at all, on
whichever replica, and its command id is always known.

About every `--fault-every` seconds one fault, dealt from a shuffled deck of six so that every kind
comes up in each six faults: a service or the coordinator SIGKILLed and restarted (two cards), one
gateway replica SIGKILLed and restarted, Temporal SIGKILLed and restarted, the broker SIGSTOPped for a
few seconds then SIGCONTed, or SIGKILLed and restarted on its data directory. A process that exits on
its own is started again (the soak is its supervisor) and noted.

At the end the load stops, the pipeline drains (bounded by `--drain-s`), and the soak checks:
* every accepted command's receipt is APPLIED, REJECTED or COMPENSATED (none still PUBLISHED);
* each applied or compensated command took effect exactly once in its service (one document or link
  version, one ledger entry or account version per command id), a rejected one not at all;
* every requested revert ended REVERTED;
* every component's DLQ is empty.

Writes bench/results/soak.json (write latency p50/p99 per minute, the fault log, the checks) and exits 1
naming each failed check.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import machine
from bench.bench_latency import percentiles
from kinshasa.infra.process import InfraError
from tests.e2e.api import Api, GraphQLError
from tests.e2e.stack import Stack, running_stack

NAME = "soak"
ENTRY_POINT = "soak"
POLICY = {"quarantineWindowS": 0.0, "maxWrites": 1_000_000, "maxVelocity": 1_000_000, "velocityWindowS": 1.0,
          "maxServices": 4, "maxErrors": 1_000, "autoRevert": False}
# Answers a keyed write may be sent again after: the gateway or what it needs is briefly away.
RETRYABLE_CODES = {"BACKEND_UNAVAILABLE", "INTERNAL", None}
SERVICE_FAULTS = ("documents", "ledger", "links", "notifier", "coordinator")
FINAL = {"APPLIED", "REJECTED", "COMPENSATED"}
# Which read tells how many times a command took effect, per operation.
EFFECTS = {"createDocument": "documents", "renameDocument": "documents", "link": "links",
           "openAccount": "ledger", "postEntry": "ledger"}


@dataclass
class Write:
    """One accepted command: what it was, on which entity, and how long the agent waited for it."""

    command_id: str
    run_id: str
    operation: str
    entity_id: str
    accepted_s: float  # since the load started
    latency_s: float  # first send to the answer, retries included


@dataclass
class Book:
    """Everything the load did, shared by the agent threads, the reverter and the checks."""

    started: float = field(default_factory=time.monotonic)
    writes: list[Write] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    to_revert: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Balanced(Api):
    """One principal behind a client-side balancer over the gateway replicas: a replica that refuses the
    connection is left for the next one, as a load balancer's health check would."""

    replicas: list[str] = field(default_factory=list)

    @classmethod
    def over(cls, urls: list[str], key: str, first: int = 0) -> Balanced:
        return cls(urls[first % len(urls)], key, list(urls))

    def call(self, query: str, **variables: Any) -> dict[str, Any]:
        for _ in range(len(self.replicas) - 1):
            try:
                return super().call(query, **variables)
            except httpx.ConnectError:
                self.url = self.replicas[(self.replicas.index(self.url) + 1) % len(self.replicas)]
        return super().call(query, **variables)


def persist(call: Callable[[], Any], stop: threading.Event, book: Book, give_up_s: float = 300.0) -> Any:
    """Call until the gateway answers; resend only what is safe to resend (keyed writes, reads).

    Connection errors and retryable codes are waited out with capped backoff; any other error is raised.
    """
    delay, deadline = 0.2, time.monotonic() + give_up_s
    while True:
        try:
            return call()
        except (httpx.HTTPError, ValueError) as exc:
            with book.lock:
                book.errors[f"transport: {type(exc).__name__}"] += 1
        except GraphQLError as exc:
            if exc.code not in RETRYABLE_CODES:
                raise
            with book.lock:
                book.errors[f"retried: {exc.code}"] += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not answer for {give_up_s:.0f} s")
        stop.wait(delay)
        delay = min(delay * 2, 3.0)


class Agent(threading.Thread):
    """Runs of about `writes_per_run` writes at `rate` per second, each run on entities of its own.

    Entities never cross runs, so a revert never meets a later run's change to the same entity.
    """

    def __init__(self, index: int, api: Api, book: Book, rate: float, revert_share: float,
                 stop: threading.Event, rng: random.Random) -> None:
        super().__init__(name=f"agent-{index}", daemon=True)
        self.index, self.api, self.book, self.rate, self.share = index, api, book, rate, revert_share
        self.stop, self.rng = stop, rng
        self.keys = itertools.count()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.one_run()
        except BaseException as exc:  # reported by the main thread
            self.failure = exc

    def key(self) -> str:
        return f"soak-{os.getpid()}-{self.index}-{next(self.keys)}"

    def pace(self) -> None:
        self.stop.wait(self.rng.expovariate(self.rate))

    def write(self, run_id: str, operation: str,
              call: Callable[[str], dict[str, Any]]) -> dict[str, Any] | None:
        """One keyed write, resent until answered; None when it was refused (counted) or the load stopped."""
        if self.stop.is_set():
            return None
        key, sent = self.key(), time.monotonic()
        try:
            receipt: dict[str, Any] = persist(lambda: call(key), self.stop, self.book)
        except GraphQLError as exc:
            with self.book.lock:
                self.book.errors[f"refused {operation}: {exc.code}"] += 1
            return None
        with self.book.lock:
            self.book.writes.append(Write(receipt["commandId"], run_id, operation, receipt["entityId"],
                                          self.book.elapsed(), time.monotonic() - sent))
        self.pace()
        return receipt

    def one_run(self) -> None:
        api, rng = self.api, self.rng
        start_key = self.key()
        run_id = str(persist(lambda: api.call("mutation($e: String!, $k: String) { startRun(entryPoint: $e, "
                                              "idempotencyKey: $k) { id } }", e=ENTRY_POINT, k=start_key),
                             self.stop, self.book)["startRun"]["id"])
        with self.book.lock:
            self.book.runs.append(run_id)
        documents: list[str] = []
        for n in range(rng.randint(2, 3)):
            made = self.write(run_id, "createDocument", functools.partial(
                _input_write, api, run_id, "createDocument", title=f"soak {n}", body="soak"))
            if made:
                documents.append(made["entityId"])
        for n in range(rng.randint(2, 5)):
            if documents:
                doc = rng.choice(documents)
                self.write(run_id, "renameDocument", functools.partial(_rename, api, run_id, doc, f"r{n}"))
        account = self.write(run_id, "openAccount", lambda k: _input_write(
            api, run_id, "openAccount", k, name="soak", currency="EUR"))
        if account:
            for _ in range(rng.randint(1, 4)):
                self.write(run_id, "postEntry", lambda k: _input_write(
                    api, run_id, "postEntry", k, accountId=account["entityId"],
                    amountCents=rng.randint(1, 10_000), memo="soak"))
        for a, b in itertools.pairwise(documents):
            self.write(run_id, "link", functools.partial(
                _input_write, api, run_id, "link", fromId=a, toId=b, kind="next"))
        # Finishing is idempotent; a run left open when the load stops is fine too.
        with contextlib.suppress(GraphQLError, TimeoutError):
            persist(lambda: api.finish_run(run_id), self.stop, self.book, give_up_s=60)
        if rng.random() < self.share:
            with self.book.lock:
                self.book.to_revert.append(run_id)


def _input_write(api: Api, run_id: str, mutation: str, key: str, /, **input: Any) -> dict[str, Any]:
    kind = f"{mutation[:1].upper()}{mutation[1:]}Input!"
    data = api.call(f"mutation($r: ID!, $i: {kind}, $k: String) {{ {mutation}(runId: $r, input: $i, "
                    "idempotencyKey: $k) { commandId entityId status } }", r=run_id, i=input, k=key)
    receipt: dict[str, Any] = data[mutation]
    return receipt


def _rename(api: Api, run_id: str, document_id: str, title: str, key: str, /) -> dict[str, Any]:
    data = api.call("mutation($r: ID!, $d: ID!, $t: String!, $k: String) { renameDocument(runId: $r, "
                    "documentId: $d, title: $t, idempotencyKey: $k) { commandId entityId status } }",
                    r=run_id, d=document_id, t=title, k=key)
    receipt: dict[str, Any] = data["renameDocument"]
    return receipt


def receipts(api: Api, run_id: str) -> list[dict[str, Any]]:
    data = api.call("query($id: ID!) { run(id: $id) { status commands(first: 200) { commandId status } } }",
                    id=run_id)
    found: list[dict[str, Any]] = data["run"]["commands"]
    return found


class Reverter(threading.Thread):
    """The operator: reverts each run picked for it once every command of the run has its outcome.

    Waiting for the outcomes keeps the check simple (every forward command applied, then compensated);
    a revert requested mid-flight is the fault suite's business.
    """

    def __init__(self, operator: Api, book: Book, stop: threading.Event) -> None:
        super().__init__(name="reverter", daemon=True)
        self.operator, self.book, self.stop = operator, book, stop
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(1.0):
                self.pass_once()
        except BaseException as exc:
            self.failure = exc

    def pass_once(self) -> None:
        with self.book.lock:
            waiting = [r for r in self.book.to_revert if r not in self.book.reverted]
        for run_id in waiting:
            try:
                settled = all(c["status"] in FINAL for c in receipts(self.operator, run_id))
                if not settled:
                    continue
                self.operator.call('mutation($id: ID!) { revertRun(runId: $id, reason: "soak") { status } }',
                                   id=run_id)
            except (httpx.HTTPError, ValueError, GraphQLError) as exc:
                why = getattr(exc, "code", None) or type(exc).__name__
                with self.book.lock:
                    self.book.errors[f"revert deferred: {why}"] += 1
                continue
            with self.book.lock:
                self.book.reverted.append(run_id)


class Faults:
    """Injects one fault at a time and records it; runs in the main thread (processes are started there,
    because their parent-death signal follows the starting thread)."""

    def __init__(self, stack: Stack, book: Book, rng: random.Random, first: str | None = None) -> None:
        self.stack, self.book, self.rng = stack, book, rng
        self.log: list[dict[str, Any]] = []
        self.gateways = [name for name in stack.processes if name.startswith("gateway")]
        # Fault kinds are dealt from a shuffled deck, so a run of a few cycles meets every kind.
        self.deck: list[str] = []
        self.first = first

    def inject(self) -> None:
        if not self.deck:
            self.deck = ["service", "service", "gateway", "temporal", "broker-pause", "broker-kill"]
            self.rng.shuffle(self.deck)
        kind = self.deck.pop()
        if kind in ("service", "gateway"):
            target = self.rng.choice(SERVICE_FAULTS if kind == "service" else self.gateways)
            kind = "process"
        else:
            target = kind.split("-")[0]
        if self.first is not None:
            kind, target, self.first = "process", self.first, None
        entry: dict[str, Any] = {"at_s": round(self.book.elapsed(), 1), "target": target}
        t0 = time.monotonic()
        if kind == "process":
            entry["fault"] = "SIGKILL, restart"
            self.stack.kill(target)
            self.stack.restart(target)
        elif kind == "temporal":
            entry["fault"] = "SIGKILL, restart"
            server = self.stack.infra.temporal()
            pid = server.process.pid
            server.kill()
            if pid is not None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # our child (LocalInfra started it attached): reap it
            server.start(attached=True)
        elif kind == "broker-pause":
            pause = round(self.rng.uniform(3.0, 8.0), 1)
            entry["fault"] = f"SIGSTOP {pause} s, SIGCONT"
            pid = self._broker_pid()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(pause)
            finally:
                os.kill(pid, signal.SIGCONT)
        else:
            entry["fault"] = "SIGKILL, restart on the same data dir"
            pid = self._broker_pid()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # our child (LocalInfra started it attached): reap it
            self.stack.infra.kafka().start(attached=True)
        entry["recovered_in_s"] = round(time.monotonic() - t0, 1)
        self.log.append(entry)
        print(f"[{entry['at_s']:7.1f} s] {target}: {entry['fault']} (back in {entry['recovered_in_s']} s)",
              flush=True)

    def _broker_pid(self) -> int:
        pid = self.stack.infra.kafka().process.pid
        if pid is None:
            raise RuntimeError("the broker's pid file is gone: is the broker running?")
        return pid

    def revive(self) -> None:
        """Start whatever exited on its own (a supervised task gave up): a supervisor would, so do we."""
        for name in self.stack.revive():
            self.log.append({"at_s": round(self.book.elapsed(), 1), "target": name,
                             "fault": "exited by itself, restarted"})
            print(f"[{self.book.elapsed():7.1f} s] {name} had exited by itself: restarted", flush=True)


def drain(operator: Api, book: Book, reverter: Reverter, deadline_s: float) -> dict[str, str]:
    """Wait (bounded) until every command has its outcome and every revert is done; the last statuses."""
    deadline = time.monotonic() + deadline_s
    statuses: dict[str, str] = {}
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, GraphQLError):
            reverter.pass_once()
        with contextlib.suppress(httpx.HTTPError, ValueError, GraphQLError):
            open_runs = {w.run_id for w in book.writes if statuses.get(w.command_id) not in FINAL}
            for run_id in open_runs | set(book.reverted):
                statuses |= {c["commandId"]: c["status"] for c in receipts(operator, run_id)}
            runs_done = all(operator.run(r)["status"] in ("REVERTED", "REVERT_FAILED") for r in book.reverted)
            settled = all(statuses.get(w.command_id) in FINAL for w in book.writes)
            if settled and runs_done and len(book.reverted) == len(book.to_revert):
                return statuses
        if time.monotonic() > deadline:
            return statuses
        time.sleep(2.0)


def effects(stack: Stack, writes: list[Write]) -> dict[str, int]:
    """How many times each command id took effect, read from the services' own read APIs."""
    seen: Counter[str] = Counter()
    # A rename reads the same versions as its create: each history is counted once.
    reads = {(EFFECTS[w.operation], "entries" if w.operation == "postEntry" else "versions", w.entity_id)
             for w in writes}
    with httpx.Client(timeout=30.0) as http:
        for service, read, entity_id in sorted(reads):
            base = stack.service_url(service)
            if read == "entries":
                account = http.get(f"{base}/entities/account/{entity_id}")
                if account.status_code == 404:  # its openAccount was rejected: nothing to count
                    continue
                account.raise_for_status()
                seen.update(e["command_id"] for e in account.json()["entries"] if e["kind"] == "posted")
                continue
            kind = {"documents": "document", "links": "link", "ledger": "account"}[service]
            response = http.get(f"{base}/entities/{kind}/{entity_id}/versions")
            if response.status_code == 404:  # its create was rejected: nothing to count
                continue
            response.raise_for_status()
            seen.update(v["command_id"] for v in response.json()["versions"])
    return dict(seen)


def check(stack: Stack, operator: Api, book: Book, statuses: dict[str, str]) -> dict[str, Any]:
    """Every check the issue names; each entry says what was found and whether it passed."""
    checks: dict[str, Any] = {}
    outcome = Counter(statuses.get(w.command_id, "UNKNOWN") for w in book.writes)
    unsettled = [w.command_id for w in book.writes if statuses.get(w.command_id) not in FINAL]
    checks["commands_settled"] = {"passed": not unsettled, "by_status": dict(outcome),
                                  "unsettled": unsettled[:20]}
    seen = effects(stack, book.writes)
    wrong = []
    for w in book.writes:
        want = 0 if statuses.get(w.command_id) == "REJECTED" else 1
        if statuses.get(w.command_id) in FINAL and seen.get(w.command_id, 0) != want:
            wrong.append({"command": w.command_id, "operation": w.operation, "status": statuses[w.command_id],
                          "effects": seen.get(w.command_id, 0)})
    checks["applied_exactly_once"] = {"passed": not wrong, "wrong": wrong[:20]}
    run_status = {r: operator.run(r)["status"] for r in book.reverted}
    not_reverted = {r: s for r, s in run_status.items() if s != "REVERTED"}
    never_requested = [r for r in book.to_revert if r not in book.reverted]
    checks["reverts_reverted"] = {"passed": not not_reverted and not never_requested,
                                  "requested": len(book.reverted), "not_reverted": not_reverted,
                                  "never_requested": never_requested}
    dlq = operator.call("{ dlq { component count error } }")["dlq"]
    bad = [d for d in dlq if d["count"] or d["error"]]
    checks["dlq_empty"] = {"passed": not bad, "components": len(dlq), "not_empty": bad}
    return checks


def per_minute(writes: list[Write]) -> list[dict[str, Any]]:
    minutes: dict[int, list[float]] = {}
    for w in writes:
        minutes.setdefault(int(w.accepted_s // 60), []).append(w.latency_s)
    return [{"minute": m + 1, "writes": len(v)} | {k: p for k, p in percentiles(v).items()
                                                  if k in ("p50", "p99")}
            for m, v in sorted(minutes.items())]


def soak(seconds: float, agents: int, rate: float, fault_every_s: float, revert_share: float,
         drain_s: float, seed: int, gateways: int = 2, first_fault: str | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    with running_stack(keep_data=True, gateway_replicas=gateways) as stack:
        operator = Balanced.over(stack.gateway_urls, stack.key("operator"))
        agent_key = stack.key("agent")
        operator.set_policy(ENTRY_POINT, **POLICY)
        print(f"stack up ({gateways} gateway replica{'s' if gateways > 1 else ''}); {agents} agents at "
              f"{rate:g} writes/s each for {seconds:g} s, a fault about every {fault_every_s:g} s "
              f"(seed {seed})", flush=True)
        book, stop = Book(), threading.Event()
        faults = Faults(stack, book, rng, first_fault)
        recovered: dict[str, Any] = {"passed": True}
        workers = [Agent(i, Balanced.over(stack.gateway_urls, agent_key, first=i), book, rate, revert_share,
                         stop, random.Random(rng.random()))
                   for i in range(agents)]
        reverter = Reverter(operator, book, stop)
        crew: list[Agent | Reverter] = [*workers, reverter]
        for worker in crew:
            worker.start()
        try:
            next_fault = rng.uniform(0.5, 1.0) * fault_every_s
            while book.elapsed() < seconds:
                time.sleep(0.5)
                try:
                    faults.revive()
                    if book.elapsed() >= next_fault:
                        faults.inject()
                        next_fault = book.elapsed() + rng.uniform(0.7, 1.3) * fault_every_s
                except (AssertionError, InfraError) as exc:
                    # Something did not come back: stop the load and report it with the checks.
                    recovered = {"passed": False, "why": str(exc)[-4000:]}
                    break
        finally:
            stop.set()
            for worker in crew:
                worker.join(timeout=60)
        failures = [f"{w.name}: {w.failure!r}" for w in crew if w.failure]
        with contextlib.suppress(AssertionError, InfraError):  # already reported
            faults.revive()
        print(f"load stopped: {len(book.writes)} writes accepted in {len(book.runs)} runs; draining "
              f"(at most {drain_s:g} s)", flush=True)
        t0 = time.monotonic()
        statuses = drain(operator, book, reverter, drain_s)
        drained_s = time.monotonic() - t0
        try:
            checks = check(stack, operator, book, statuses)
        except (httpx.HTTPError, ValueError, GraphQLError) as exc:
            checks = {"checks_ran": {"passed": False, "why": f"a read the checks need failed: {exc!r}"}}
        checks["faults_recovered"] = recovered
        if failures:
            checks["load_ran"] = {"passed": False, "failures": failures}
        if not faults.log:
            checks["faults_injected"] = {"passed": False, "why": "the run was too short for a fault"}
    passed = all(c["passed"] for c in checks.values())
    if passed:
        shutil.rmtree(stack.data_dir, ignore_errors=True)
    latencies = [w.latency_s for w in book.writes]
    return {
        "seconds": seconds, "agents": agents, "rate_per_agent": rate, "fault_every_s": fault_every_s,
        "revert_share": revert_share, "seed": seed, "gateways": gateways,
        "database": "postgresql" if gateways > 1 else "sqlite",
        "writes": len(book.writes), "runs": len(book.runs), "reverts": len(book.reverted),
        "faults": len(faults.log), "fault_log": faults.log, "drain_s": round(drained_s, 1),
        "write_ms": percentiles(latencies), "write_ms_per_minute": per_minute(book.writes),
        "errors": dict(book.errors.most_common(20)), "checks": checks,
        "passed": passed, "logs": None if passed else str(stack.data_dir / "logs"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load and the faults run")
    parser.add_argument("--seconds", type=float, default=None,
                        help="the same in seconds (overrides --minutes)")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rate", type=float, default=2.0, help="writes per second per agent (on average)")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults (on average)")
    parser.add_argument("--gateways", type=int, default=2,
                        help="gateway replicas (two or more run every component on PostgreSQL)")
    parser.add_argument("--first-fault", default=None, metavar="PROCESS",
                        help="make the first fault a SIGKILL of this process (e.g. gateway-2), then random")
    parser.add_argument("--revert-share", type=float, default=0.25, help="share of finished runs reverted")
    parser.add_argument("--drain-s", type=float, default=240.0,
                        help="how long the pipeline may take to drain")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="write soak.json here instead of bench/results (the test suite's run)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    if args.gateways < 1:
        parser.error("--gateways must be at least 1")
    processes = [*SERVICE_FAULTS, "gateway", *(f"gateway-{i}" for i in range(2, args.gateways + 1))]
    if args.first_fault is not None and args.first_fault not in processes:
        parser.error(f"--first-fault {args.first_fault!r} is not a process of this stack: "
                     f"{', '.join(processes)}")
    figures = soak(seconds, args.agents, args.rate, args.fault_every, args.revert_share, args.drain_s, seed,
                   args.gateways, args.first_fault)
    figures["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    if args.results_dir is not None:
        machine.RESULTS = args.results_dir
    path = machine.write_result(NAME, figures)
    w = figures["write_ms"]
    print(f"{figures['writes']} writes in {figures['runs']} runs, {figures['reverts']} reverted, "
          f"{figures['faults']} faults; write p50 {w['p50']} ms, p99 {w['p99']} ms; drained in "
          f"{figures['drain_s']} s")
    for minute in figures["write_ms_per_minute"]:
        print(f"  minute {minute['minute']}: {minute['writes']} writes, p50 {minute['p50']} ms, "
              f"p99 {minute['p99']} ms")
    print(f"wrote {path}")
    failed = {name: c for name, c in figures["checks"].items() if not c["passed"]}
    for name, found in failed.items():
        print(f"soak check failed: {name}: {found}", file=sys.stderr)
    if failed:
        print(f"the stack's logs are kept under {figures['logs']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
