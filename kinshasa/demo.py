"""`kinshasa demo`: the rogue-agent story, told against a running stack through the public GraphQL only.

Two runs of the dev agent. The first behaves: a report, an account, a posting, a link, each waiting out
a short quarantine window and then applied. The second is a cleanup job gone into a loop: it writes
fast across documents, ledger and links until its breaker trips. The policy the operator sets first
makes the outcome deterministic on any machine: the breaker trips on the 11th write (10 per 5 minutes),
and the quarantine holds money and new links for two minutes while everything else goes straight
through, so some of the damage is still held when the breaker opens and some has escaped. The operator
reads the alert and reverts the run; the held writes are discarded, the escaped ones compensated, and
the demo reads every entity back to show the state restored.

Mount with `app.add_typer(demo.app)` (the app holds the single command `demo`); `run_demo()` is the
same story as a function, returning what happened for tests to check.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typer

from kinshasa.settings import GatewaySettings, StackSettings

app = typer.Typer(add_completion=False, help="Tell the rogue-agent story against a running stack.")

GOOD_ENTRY_POINT = "demo.weekly-report"
ROGUE_ENTRY_POINT = "demo.inbox-cleanup"
GOOD_WINDOW_S = 2.0
ROGUE_MAX_VELOCITY = 10
ROGUE_VELOCITY_WINDOW_S = 300.0
# Money and new relations wait two minutes; the rest of the rogue's operations go straight through.
ROGUE_HELD_WINDOW_S = 120.0
ROGUE_WINDOWS: dict[str, float] = {
    "ledger.post_entry": ROGUE_HELD_WINDOW_S,
    "links.link": ROGUE_HELD_WINDOW_S,
    "documents.create": 0.0,
    "documents.rename": 0.0,
    "documents.edit": 0.0,
    "ledger.open_account": 0.0,
    "links.unlink": 0.0,
}
REVERT_REASON = "demo: inbox-cleanup looped, renaming, unlinking and refunding what it should not"

# Types of the flat (non-input-object) arguments the story's mutations take.
FLAT_ARGUMENTS = {"documentId": "ID!", "linkId": "ID!", "title": "String!", "body": "String!"}
RECEIPT = "commandId runId operation entityId status releaseAt"
RUN_FIELDS = """id agentId entryPoint status startedAt finishedAt revertReason
  breaker { state writes errors servicesTouched velocity trippedReason }
  counts { held awaitingApproval published applied compensated discarded rejected }"""


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what to do."""


class GraphQLFailure(DemoError):
    """The gateway refused a call; `code` is its `extensions.code`."""

    def __init__(self, message: str, code: str | None, extensions: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.extensions = extensions


@dataclass
class Gateway:
    """One principal's view of the gateway: a GraphQL POST per call, errors raised with their code."""

    url: str
    key: str
    http: httpx.Client

    def call(self, query: str, **variables: Any) -> dict[str, Any]:
        try:
            response = self.http.post(self.url, json={"query": query, "variables": variables},
                                      headers={"Authorization": f"Bearer {self.key}"})
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise DemoError(f"{self.url} answered {response.status_code} without JSON: is this the "
                            "gateway's /graphql URL?") from exc
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            extensions = errors[0].get("extensions") or {}
            code = extensions.get("code")
            raise GraphQLFailure(f"{code or 'ERROR'}: {errors[0].get('message')}", code, extensions)
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise DemoError(f"{self.url} answered {response.status_code}: {str(body)[:300]}")
        data: dict[str, Any] = body["data"]
        return data


@dataclass
class Write:
    """One agent write in the story: what it meant, and what the gateway answered."""

    label: str
    operation: str
    receipt: dict[str, Any] | None = None
    refused: str | None = None

    @property
    def status(self) -> str:
        return str(self.receipt["status"]) if self.receipt else "REFUSED"


@dataclass
class DemoResult:
    """What happened, for a test to check without parsing the story."""

    good_run: dict[str, Any]
    rogue_run: dict[str, Any]
    rogue_writes: list[Write]
    alert: dict[str, Any]
    reverted_run: dict[str, Any]
    entities: dict[str, str] = field(default_factory=dict)
    restored: dict[str, Any] = field(default_factory=dict)

    @property
    def escaped(self) -> list[Write]:
        return [w for w in self.rogue_writes if w.status == "PUBLISHED"]

    @property
    def held(self) -> list[Write]:
        return [w for w in self.rogue_writes if w.status == "HELD"]

    @property
    def refused(self) -> list[Write]:
        return [w for w in self.rogue_writes if w.receipt is None]


def unreachable(url: str, exc: Exception) -> DemoError:
    return DemoError(
        f"the gateway at {url} did not answer ({type(exc).__name__}): start the stack with `kinshasa up` "
        "(or `make run`) in another terminal, or pass --gateway with its GraphQL URL")


def check_reachable(url: str) -> None:
    """Fail with what to do when nothing answers at `url`; any HTTP answer will do here."""
    try:
        httpx.post(url, json={"query": "{ __typename }"}, timeout=10.0)
    except httpx.HTTPError as exc:
        raise unreachable(url, exc) from exc


def default_gateway_url() -> str:
    settings = GatewaySettings()
    return f"http://{settings.host}:{settings.port}/graphql"


def default_credentials() -> Path:
    return StackSettings().data_dir / "credentials.json"


def load_keys(path: Path) -> tuple[str, str]:
    """The first agent key and the first operator key of a dev stack's credentials file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DemoError(f"could not read the stack's keys from {path} ({exc}): pass --credentials with the "
                        "file `kinshasa up` wrote, or --agent-key and --operator-key") from exc
    keys: dict[str, str] = {}
    for principal in document.get("principals", []) if isinstance(document, dict) else []:
        kind, key = principal.get("kind"), principal.get("key")
        if isinstance(key, str) and kind in ("agent", "operator"):
            keys.setdefault(kind, key)
    missing = [k for k in ("agent", "operator") if k not in keys]
    if missing:
        raise DemoError(f"{path} has no plain {' or '.join(missing)} key: pass "
                        + " and ".join(f"--{k}-key" for k in missing))
    return keys["agent"], keys["operator"]


def money(cents: int | None, currency: str = "EUR") -> str:
    if cents is None:
        return "-"
    sign = "-" if cents < 0 else "+"
    return f"{sign}{abs(cents) // 100:,}.{abs(cents) % 100:02d} {currency}"


def poll(what: str, probe: Callable[[], Any], timeout_s: float, interval_s: float = 0.3) -> Any:
    """Call `probe` until it returns something truthy; DemoError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"gave up after {timeout_s:.0f}s waiting for {what}: is every process of the "
                            "stack running? (`kinshasa up` shows their logs)")
        time.sleep(interval_s)


class Story:
    """The demo's steps, each a short paragraph; `say` prints (or collects) a line."""

    def __init__(self, agent: Gateway, operator: Gateway, say: Callable[[str], None], timeout_s: float,
                 operator_prefix: str = "", operator_flags: str = "") -> None:
        self.agent = agent
        self.operator = operator
        self.say = say
        self.timeout_s = timeout_s
        self.prefix = operator_prefix
        self.flags = operator_flags

    # --- helpers -------------------------------------------------------------------------------------

    def run(self, gateway: Gateway, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = gateway.call(f"query($id: ID!) {{ run(id: $id) {{ {RUN_FIELDS} }} }}",
                                              id=run_id)["run"]
        return result

    def write(self, run_id: str, label: str, mutation: str, **variables: Any) -> Write:
        """One agent mutation; a refusal (BREAKER_OPEN, ...) is part of the story, not an error."""
        if "input" in variables:
            types = {"input": f"{mutation[:1].upper()}{mutation[1:]}Input!"}
        else:
            types = {name: FLAT_ARGUMENTS[name] for name in variables}
        declared = "".join(f", ${name}: {kind}" for name, kind in types.items())
        passed = "".join(f", {name}: ${name}" for name in types)
        query = f"mutation($runId: ID!{declared}) {{ {mutation}(runId: $runId{passed}) {{ {RECEIPT} }} }}"
        entry = Write(label=label, operation=mutation)
        try:
            entry.receipt = self.agent.call(query, runId=run_id, **variables)[mutation]
        except GraphQLFailure as exc:
            if exc.code in ("BREAKER_OPEN", "RUN_CLOSED"):
                entry.refused = str(exc)
            else:
                raise
        return entry

    def start_run(self, entry_point: str, purpose: str) -> str:
        data = self.agent.call(
            "mutation($e: String!, $p: String) { startRun(entryPoint: $e, purpose: $p) { id } }",
            e=entry_point, p=purpose)
        return str(data["startRun"]["id"])

    def _line(self, w: Write, number: int | None = None) -> None:
        prefix = f"#{number:<3}" if number is not None else "  "
        if w.receipt is None:
            outcome = f"REFUSED ({(w.refused or '').split(':')[0]})"
        elif w.status == "HELD":
            outcome = f"HELD until {_clock(w.receipt['releaseAt'])} UTC"
        else:
            outcome = w.status
        self.say(f"   {prefix} {w.label:<52} {outcome}")

    def set_policy(self, entry_point: str, settings: dict[str, Any], reason: str) -> int:
        # loosen: the demo's entry point gets exactly these settings (quarantine 0 for most operations,
        # a generous write limit), where by default a layer may only tighten the one below it.
        data = self.operator.call(
            """mutation($subject: String!, $settings: PolicyInput!, $reason: String!) {
                 setPolicy(scope: ENTRY_POINT, subject: $subject, settings: $settings, reason: $reason,
                           loosen: true)
                 { version } }""",
            subject=entry_point, settings=settings, reason=reason)
        return int(data["setPolicy"]["version"])

    def document(self, document_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.operator.call(
            "query($id: ID!) { document(id: $id) { id title body status version } }", id=document_id
        )["document"]
        return found

    def account(self, account_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.operator.call(
            "query($id: ID!) { account(id: $id) { id name currency status balanceCents } }", id=account_id
        )["account"]
        return found

    def links(self, entity_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.operator.call(
            "query($id: ID!) { links(entityId: $id) { id fromId toId kind status } }", id=entity_id
        )["links"]
        return found

    # --- the story -----------------------------------------------------------------------------------

    def check_stack(self) -> None:
        me = "{ me { id kind } }"
        for gateway, kind in ((self.agent, "agent"), (self.operator, "operator")):
            try:
                who = gateway.call(me)["me"]
            except GraphQLFailure as exc:
                raise DemoError(f"the gateway refused the {kind} key ({exc}): pass the stack's "
                                f"--credentials file or a valid --{kind}-key") from exc
            if who["kind"] != kind:
                raise DemoError(
                    f"the {kind} key belongs to {who['kind']} {who['id']!r}: pass an {kind}'s key")

    def good_run(self) -> tuple[dict[str, Any], dict[str, str]]:
        say = self.say
        version = self.set_policy(GOOD_ENTRY_POINT, {
            "quarantineWindowS": GOOD_WINDOW_S,
            "operationWindows": {op: GOOD_WINDOW_S for op in (
                "documents.create", "ledger.open_account", "ledger.post_entry", "links.link")},
            "maxWrites": 100, "maxVelocity": 100, "velocityWindowS": 10.0, "maxServices": 4, "maxErrors": 10,
        }, "demo: a short quarantine window for the weekly report")
        run_id = self.start_run(GOOD_ENTRY_POINT, "write the weekly report")
        say(f"1. An agent run that behaves (entry point {GOOD_ENTRY_POINT}; policy v{version} holds every "
            f"write {GOOD_WINDOW_S:g}s in quarantine)")
        say(f"   startRun -> run {run_id}")
        ids: dict[str, str] = {}

        def go(key: str | None, label: str, mutation: str, **variables: Any) -> None:
            w = self.write(run_id, label, mutation, **variables)
            self._line(w)
            if key:
                ids[key] = _receipt(w)["entityId"]

        go("report", 'createDocument "Q3 report"', "createDocument",
           input={"title": "Q3 report", "body": "Revenue up 4%; churn flat."})
        go("marketing", 'openAccount "Marketing" (EUR)', "openAccount",
           input={"name": "Marketing", "currency": "EUR"})
        go(None, 'postEntry +2,500.00 EUR to Marketing "Q3 budget"', "postEntry",
           input={"accountId": ids["marketing"], "amountCents": 250_000, "memo": "Q3 budget"})
        go("funding_link", "link report -> Marketing (funded-by)", "link",
           input={"fromId": ids["report"], "toId": ids["marketing"], "kind": "funded-by"})
        self.agent.call("mutation($id: ID!) { finishRun(runId: $id) { id status } }", id=run_id)
        final = poll("the weekly report's 4 writes to be applied",
                     lambda: (r := self.run(self.agent, run_id))["counts"]["applied"] >= 4 and r,
                     self.timeout_s)
        say(f"   finishRun -> {final['status']}; once their window passed, all {final['counts']['applied']} "
            "writes were published and applied by the services.")
        say("")
        return final, ids

    def tighten_policy(self) -> int:
        version = self.set_policy(ROGUE_ENTRY_POINT, {
            "maxVelocity": ROGUE_MAX_VELOCITY, "velocityWindowS": ROGUE_VELOCITY_WINDOW_S,
            "maxWrites": 100, "maxServices": 4, "maxErrors": 10,
            "quarantineWindowS": 0.0, "operationWindows": ROGUE_WINDOWS, "autoRevert": False,
        }, "demo: cleanup jobs write little; hold money and new links for two minutes")
        say = self.say
        say(f"2. The operator sets the policy for entry point {ROGUE_ENTRY_POINT} (setPolicy, v{version}):")
        say(f"   breaker: at most {ROGUE_MAX_VELOCITY} writes per {ROGUE_VELOCITY_WINDOW_S:g}s;")
        say(f"   quarantine: ledger.post_entry and links.link held {ROGUE_HELD_WINDOW_S:g}s (money and new "
            "relations wait), every other write goes straight through;")
        say("   auto-revert off, so the operator decides what happens after a trip.")
        say("")
        return version

    def rogue_run(self, ids: dict[str, str]) -> tuple[str, list[Write]]:
        run_id = self.start_run(ROGUE_ENTRY_POINT, "tidy the inbox")
        self.say(f"3. A rogue run: the inbox cleanup goes into a loop (run {run_id})")
        writes: list[Write] = []

        def go(label: str, mutation: str, **variables: Any) -> Write:
            w = self.write(run_id, label, mutation, **variables)
            writes.append(w)
            self._line(w, len(writes))
            return w

        go('renameDocument "Q3 report" -> "ZZ old - delete"', "renameDocument",
           documentId=ids["report"], title="ZZ old - delete")
        go("unlink the report's funded-by link", "unlink", linkId=ids["funding_link"])
        ids["refunds"] = _receipt(go('openAccount "Cleanup refunds" (EUR)', "openAccount",
                                     input={"name": "Cleanup refunds", "currency": "EUR"}))["entityId"]
        go("postEntry -1,250.00 EUR from Marketing", "postEntry",
           input={"accountId": ids["marketing"], "amountCents": -125_000, "memo": "cleanup refund"})
        go("postEntry +1,250.00 EUR to Cleanup refunds", "postEntry",
           input={"accountId": ids["refunds"], "amountCents": 125_000, "memo": "cleanup refund"})
        # The loop: a note, a link from it to the report, the report emptied... until the gateway says no.
        n = 0
        while len(writes) < 40:
            n += 1
            note = go(f'createDocument "cleanup note {n}"', "createDocument",
                      input={"title": f"cleanup note {n}", "body": "supersedes the Q3 report"})
            if note.refused:
                break
            ids[f"note{n}"] = _receipt(note)["entityId"]
            if go(f"link cleanup note {n} -> report (supersedes)", "link",
                  input={"fromId": ids[f"note{n}"], "toId": ids["report"], "kind": "supersedes"}).refused:
                break
            if n == 2 and go('editDocument report body -> ""', "editDocument",
                             documentId=ids["report"], body="").refused:
                break
        # Agents retry what failed; the breaker stays open.
        go(f'createDocument "cleanup note {n}" (retry)', "createDocument",
           input={"title": f"cleanup note {n}", "body": "supersedes the Q3 report"})
        return run_id, writes

    def after_trip(self, run_id: str, writes: list[Write]) -> tuple[dict[str, Any], dict[str, Any]]:
        say = self.say
        run = self.run(self.operator, run_id)
        accepted = [w for w in writes if w.receipt]
        escaped = [w for w in accepted if w.status == "PUBLISHED"]
        held = [w for w in accepted if w.status == "HELD"]
        breaker = run["breaker"]
        refused = next((w.refused for w in writes if w.refused), None)
        say(f"   The gateway refused write #{len(accepted) + 1} and every one after it: {refused}")
        say(f"   Breaker {breaker['state']} after {breaker['writes']} accepted writes to "
            f"{', '.join(breaker['servicesTouched'])}.")
        say(f"   Escaped ({len(escaped)}): published before the trip, applied by "
            f"{', '.join(_services(escaped))}:")
        for w in escaped:
            say(f"     - {w.label}")
        say(f"   Held ({run['counts']['held']}): still in quarantine, moved to a manual hold; nothing "
            "downstream has seen them:")
        for w in held:
            say(f"     - {w.label}")
        say("")
        alerts = self.operator.call(
            """query($id: ID!) { alerts(runId: $id, kind: "run_tripped") { id kind summary
                 threshold { name count limit } servicesTouched held propagated autoRevert } }""",
            id=run_id)["alerts"]
        if not alerts:
            raise DemoError(f"run {run_id} tripped but the alerts query has no alert for it")
        alert: dict[str, Any] = alerts[0]
        say("4. The operator's alert (alerts query):")
        for line in textwrap.wrap(alert["summary"], 96):
            say(f"   | {line}")
        say("")
        return run, alert

    def revert(self, run_id: str, applied_expected: int) -> dict[str, Any]:
        say = self.say
        say("5. The operator looks, then reverts. At a terminal that is:")
        say(f"   $ {self.prefix}kinshasa run {run_id}{self.flags}")
        say(f"   $ {self.prefix}kinshasa revert --run {run_id} --reason \"{REVERT_REASON}\"{self.flags}")
        started = time.monotonic()
        run = self.operator.call(
            "mutation($id: ID!, $reason: String!) { revertRun(runId: $id, reason: $reason) { "
            f"{RUN_FIELDS} }} }}", id=run_id, reason=REVERT_REASON)["revertRun"]
        say(f"   revertRun -> {run['status']}: {run['counts']['discarded']} held write(s) discarded at once; "
            "the coordinator now undoes the escaped ones, newest first.")

        def settled() -> dict[str, Any] | None:
            # The gateway learns REVERTED and each step's compensation from different topics.
            r = self.run(self.operator, run_id)
            done = r["status"] == "REVERT_FAILED" or (
                r["status"] == "REVERTED" and r["counts"]["compensated"] >= applied_expected)
            return r if done else None

        final = poll("the revert to settle", settled, self.timeout_s)
        took = time.monotonic() - started
        c = final["counts"]
        say(f"   {final['status']} after {took:.1f}s: {c['compensated']} of {c['applied']} applied step(s) "
            f"compensated, {c['discarded']} discarded, {c['held']} still held.")
        if final["status"] != "REVERTED":
            raise DemoError(
                f"run {run_id} ended {final['status']}: `kinshasa run {run_id}` shows the refused steps")
        steps = self.operator.call(
            "query($id: ID!) { run(id: $id) { steps(first: 12) { nodes { operation entityKey status } } } }",
            id=run_id)["run"]["steps"]
        say("   The coordinator's ledger for the run, newest first:")
        for step in (steps or {}).get("nodes", []):
            say(f"     {step['operation']:<22} {step['entityKey']}  {str(step['status']).lower()}")
        say("")
        return final

    def restored(self, ids: dict[str, str], notes: list[str]) -> dict[str, Any]:
        say = self.say
        report = self.document(ids["report"])
        marketing = self.account(ids["marketing"])
        refunds = self.account(ids["refunds"])
        report_links = self.links(ids["report"])
        gone = {note: self.document(ids[note]) for note in notes}
        state = {"report": report, "marketing": marketing, "refunds": refunds, "report_links": report_links,
                 "notes": gone}
        say("6. The state, read back through the gateway (document / account / links queries):")
        if report:
            say(f"   report {ids['report']}: title \"{report['title']}\", body \"{report['body']}\" "
                f"(version {report['version']})")
        if marketing:
            balance = money(marketing["balanceCents"], marketing["currency"])
            say(f"   account Marketing: {marketing['status']}, balance {balance} (the refund never left "
                "quarantine)")
        if refunds:
            say(f"   account Cleanup refunds: {refunds['status']}, balance "
                f"{money(refunds['balanceCents'], refunds['currency'])}")
        else:
            say("   account Cleanup refunds: gone (the revert closed it before any money moved; its history "
                "stays in the ledger)")
        shown = [f"{lk['kind']} {lk['fromId']} -> {lk['toId']} ({lk['status']})" for lk in report_links]
        say(f"   links of the report: {'; '.join(shown) or 'none'}")
        for note, found in gone.items():
            say(f"   {note.replace('note', 'cleanup note ')}: "
                + ("gone (tombstoned by its compensation)" if found is None else f"still there: {found}"))
        say("")
        return state


def _clock(value: Any) -> str:
    text = str(value or "")
    return text[11:19] if len(text) >= 19 else text or "-"


def _receipt(w: Write) -> dict[str, Any]:
    if w.receipt is None:
        raise DemoError(f"the gateway refused {w.label} before the story expected it: {w.refused}")
    return w.receipt


def _services(writes: list[Write]) -> list[str]:
    return sorted({str(w.receipt["operation"]).split(".")[0] for w in writes if w.receipt})


def run_demo(gateway_url: str, agent_key: str, operator_key: str, *, say: Callable[[str], None] = print,
             timeout_s: float = 120.0, operator_prefix: str = "", operator_flags: str = "") -> DemoResult:
    """Tell the whole story against the gateway at `gateway_url`; raise DemoError if it cannot."""
    with httpx.Client(timeout=30.0) as http:
        story = Story(Gateway(gateway_url, agent_key, http), Gateway(gateway_url, operator_key, http), say,
                      timeout_s, operator_prefix, operator_flags)
        story.check_stack()
        say(f"Kinshasa demo against {gateway_url}")
        say("")
        good, ids = story.good_run()
        story.tighten_policy()
        rogue_id, writes = story.rogue_run(ids)
        tripped, alert = story.after_trip(rogue_id, writes)
        escaped = sum(1 for w in writes if w.status == "PUBLISHED")
        reverted = story.revert(rogue_id, escaped)
        notes = sorted(k for k in ids if k.startswith("note"))
        restored = story.restored(ids, notes)
        say("What an operator types, at any time:")
        say(f"   $ {operator_prefix}kinshasa runs --entry-point {ROGUE_ENTRY_POINT}{operator_flags}")
        say(f"   $ {operator_prefix}kinshasa run {rogue_id}{operator_flags}")
        say(f"   $ {operator_prefix}kinshasa revert --run {rogue_id} --reason \"...\"{operator_flags}")
        say(f"   $ {operator_prefix}kinshasa revert --entry-point {ROGUE_ENTRY_POINT} --reason \"...\""
            f"{operator_flags}   (every run of the entry point)")
        return DemoResult(good_run=good, rogue_run=tripped, rogue_writes=writes, alert=alert,
                          reverted_run=reverted, entities=dict(ids), restored=restored)


@app.command("demo")
def demo(
    gateway: str | None = typer.Option(None, "--gateway", help="The gateway's GraphQL URL (default from "
                                       "KINSHASA_GATEWAY_HOST/PORT: http://127.0.0.1:8000/graphql)."),
    credentials: Path | None = typer.Option(None, "--credentials", help="The dev stack's credentials file "
                                            "(default <KINSHASA_DATA_DIR>/credentials.json)."),
    agent_key: str | None = typer.Option(None, "--agent-key", envvar="KINSHASA_AGENT_KEY",
                                         help="An agent's key, instead of the credentials file's."),
    operator_key: str | None = typer.Option(None, "--operator-key", envvar="KINSHASA_OPERATOR_KEY",
                                            help="An operator's key, instead of the credentials file's."),
    timeout: float = typer.Option(120.0, "--timeout", min=1.0,
                                  help="Seconds to wait for each asynchronous step before giving up."),
) -> None:
    """Tell the rogue-agent story against a running stack (`kinshasa up` in another terminal)."""
    url = gateway or default_gateway_url()
    path = credentials or default_credentials()
    given_operator_key = operator_key is not None
    try:
        check_reachable(url)
        if not (agent_key and operator_key):
            found_agent, found_operator = load_keys(path)
            agent_key, operator_key = agent_key or found_agent, operator_key or found_operator
        # The operator CLI finds the key the way the demo did: say where, unless it is the default.
        prefix = ""
        if not given_operator_key and path.resolve() != default_credentials().resolve():
            prefix = f"KINSHASA_DATA_DIR={path.resolve().parent} "
        flags = "" if url == default_gateway_url() else f" --gateway {url}"
        run_demo(url, agent_key, operator_key, say=typer.echo, timeout_s=timeout,
                 operator_prefix=prefix, operator_flags=flags)
    except DemoError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from exc


if __name__ == "__main__":
    app()
