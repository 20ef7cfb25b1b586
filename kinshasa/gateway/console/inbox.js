// Inbox: open alerts newest first, each with everything needed to decide and the decisions as buttons.
// New alerts arrive over the alertRaised subscription; the run of each open alert is followed with
// runChanged (until its alert is decided), so a revert's progress shows on its card as it happens.

import { gql, gqlEach, live } from "./api.js";
import { RUN_ACTIONS, decideOnRun } from "./decisions.js";
import { badge, errorBox, feedRetryDelay, h, note, progressText, runLink, short, when } from "./ui.js";

export const ALERT_FIELDS = `id runId kind source createdAt summary agentId entryPoint
  threshold { name count limit } servicesTouched held awaitingApproval propagated autoRevert failingCount`;
const RUN_FIELDS = `id status breaker { state }
  counts { held awaitingApproval published applied compensated discarded }
  revertProgress { total compensated failing pending }`;
// Runs whose alert still wants a decision; any other run's alert is listed as decided. A run that could not
// be read is listed as open: an alert is never shown as decided on a guess.
const OPEN_STATUSES = new Set(["TRIPPED", "REVERTING", "REVERT_FAILED"]);
const FOLLOW_MAX = 24;
const RUNS_PER_REQUEST = 20;
const REMEMBER_MS = 50;

function isOpen(alert, run) {
  if (!alert.runId) return false;
  if (!run) return true;
  return OPEN_STATUSES.has(run.status) || run.counts.held + run.counts.awaitingApproval > 0;
}

/** The runs by id, ALIASES_PER_REQUEST to a request; `failed` holds why each unread run could not be read. */
async function loadRuns(ids) {
  const found = {};
  const failed = {};
  // A run with its breaker, counts and revert progress costs the gateway about 400: 20 fit in a request.
  const results = await gqlEach(ids, (id) => `run(id: ${JSON.stringify(id)}) { ${RUN_FIELDS} }`, RUNS_PER_REQUEST);
  ids.forEach((id, i) => {
    if (results[i].data) found[id] = results[i].data;
    else failed[id] = results[i].error ?? new Error("the gateway answered no run");
  });
  return { found, failed };
}

export function render(main) {
  const alerts = new Map();
  const runs = {};
  const unread = {};
  // Runs whose last event came with an error, by that error, until the feed opened again says where they are,
  // and how many times in a row each run's feed failed.
  const stale = {};
  const failures = {};
  let closed = false;
  const cards = new Map();
  const following = new Map();
  const openList = h("ol", { class: "cards", "aria-label": "Open alerts" });
  const decidedList = h("ol", { class: "cards decided", "aria-label": "Decided alerts" });
  const empty = note("Nothing waits for a decision.");
  const problems = h("div", { class: "problems" });
  const incidentList = h("ol", { class: "cards", "aria-label": "Open incidents" });
  const incidentsNote = h("div");
  const liveState = h("span", { class: "live", role: "status" }, "connecting live updates…");
  main.append(
    h("h1", {}, "Inbox"),
    h("p", { class: "lead" }, "Open alerts, newest first. Each decision says what it will do and asks why. ",
      liveState),
    problems, openList, empty,
    h("h2", {}, "Open incidents"), incidentsNote, incidentList,
    h("h2", {}, "Decided and informational"), decidedList);

  function follow(runId, decided = false) {
    // The gateway reads a followed run every half second: only runs still wanting a decision are followed,
    // at most FOLLOW_MAX of them unasked (the gateway allows a connection 64 subscriptions), and any run the
    // operator just decided on, to show its revert live; the feed ends by itself once the run settles.
    // A feed that fails is opened again (`feedRetryDelay`), so no card keeps a stale progress.
    if (closed || !runId || following.has(runId) || (!decided && following.size >= FOLLOW_MAX)) return;
    const stop = live.subscribe(`subscription($id: ID!) { runChanged(id: $id) { ${RUN_FIELDS} } }`,
      { id: runId }, (data) => {
        runs[runId] = data.runChanged;
        delete stale[runId];
        delete failures[runId];
        if (unread[runId]) { delete unread[runId]; showProblems(); }
        refreshRun(runId);
      }, (error, data) => {
        stop();
        // The event's run, when it came with one, still says where the run is (its progress is what failed).
        if (data?.runChanged?.counts) runs[runId] = data.runChanged;
        stale[runId] = error;
        refreshRun(runId);
        failures[runId] = (failures[runId] ?? 0) + 1;
        // The run keeps its place among those followed while it waits to be asked again.
        const retry = setTimeout(() => { following.delete(runId); follow(runId, true); },
          feedRetryDelay(failures[runId]));
        following.set(runId, () => clearTimeout(retry));
      }, () => following.delete(runId));
    following.set(runId, stop);
  }

  function refreshRun(runId) {
    for (const alert of alerts.values()) if (alert.runId === runId) place(alert);
  }

  function card(alert) {
    const status = h("span", { class: "run-status" });
    const progress = h("p", { class: "progress", role: "status", "aria-live": "polite" });
    const buttons = RUN_ACTIONS.map((action) => h("button", {
      type: "button", class: action === "Revert" ? "danger" : "",
      "aria-label": `${action} run ${short(alert.runId)} (${alert.kind} alert)`,
      onclick: async () => {
        if (!runs[alert.runId]) await remember([alert.runId]);
        const run = runs[alert.runId];
        if (!run) return;
        const done = await decideOnRun(action, run);
        if (done) {
          await remember([alert.runId]);
          place(alert);
          follow(alert.runId, true);
        }
      },
    }, action));
    const t = alert.threshold;
    const facts = h("dl", { class: "facts" },
      h("dt", {}, "Agent"), h("dd", {}, alert.agentId ?? "—"),
      h("dt", {}, "Entry point"), h("dd", {}, alert.entryPoint ?? "—"),
      h("dt", {}, "What tripped"), h("dd", {}, t ? `${t.name}: ${t.count} against a limit of ${t.limit}` : alert.kind),
      h("dt", {}, "Services touched"), h("dd", {}, alert.servicesTouched.join(", ") || "none"),
      h("dt", {}, "Held vs escaped"),
      h("dd", {}, `${alert.held} held, ${alert.awaitingApproval} awaiting approval, ${alert.propagated} escaped`),
      alert.failingCount != null ? [h("dt", {}, "Failing steps"), h("dd", {}, String(alert.failingCount))] : null,
      h("dt", {}, "Run"), h("dd", {}, alert.runId ? runLink(alert.runId) : "none", " ", status));
    const el = h("li", {}, h("article", { class: "card", "aria-label": `${alert.kind} alert for run ${short(alert.runId)}` },
      h("header", {}, badge(alert.kind), " ", h("time", { datetime: alert.createdAt }, when(alert.createdAt)),
        h("span", { class: "muted" }, ` from ${alert.source}`)),
      h("p", { class: "summary" }, alert.summary),
      facts, progress,
      alert.runId ? h("div", { class: "actions", role: "group", "aria-label": "Decision" }, buttons) : null));
    return { el, status, progress, buttons };
  }

  function place(alert) {
    let c = cards.get(alert.id);
    if (!c) { c = card(alert); cards.set(alert.id, c); }
    const run = runs[alert.runId];
    if (!run && unread[alert.runId]) {
      c.status.replaceChildren(h("span", { class: "error" },
        `run could not be read (${unread[alert.runId].message}): listed as open until it can be`));
    }
    if (run) {
      c.status.replaceChildren(badge(run.status));
      const reverting = ["REVERTING", "REVERTED", "REVERT_FAILED"].includes(run.status);
      c.progress.textContent = stale[alert.runId]
        ? `This run's latest update failed (${stale[alert.runId].message}); asking again`
        : reverting ? `Revert ${progressText(run.status, run.revertProgress)}` : "";
      c.buttons.forEach((b) => {
        b.disabled = reverting && b.textContent !== "Revert" || run.status === "REVERTED" || run.status === "REVERTING";
      });
    }
    const open = isOpen(alert, run);
    // A run whose feed failed stays followed until the feed, opened again, says where it is.
    if (!open && run && !stale[alert.runId] && following.has(alert.runId)) {
      following.get(alert.runId)();
      following.delete(alert.runId);
    }
    const target = open ? openList : decidedList;
    if (c.el.parentElement !== target) {
      const newer = [...target.children].find((li) => {
        const other = [...alerts.values()].find((a) => cards.get(a.id)?.el === li);
        return other && other.createdAt < alert.createdAt;
      });
      target.insertBefore(c.el, newer ?? null);
    }
    empty.hidden = openList.children.length > 0;
  }

  // Runs wanted within REMEMBER_MS of each other are read together: alerts replayed by the subscription
  // arrive one by one, and a request per run would spend the operator's rate for nothing.
  let queued = null;
  function remember(ids) {
    if (!ids.length) return Promise.resolve();
    if (!queued) {
      const batch = { ids: new Set() };
      batch.done = new Promise((resolve) => { setTimeout(resolve, REMEMBER_MS); }).then(() => {
        if (queued === batch) queued = null;
        return readRuns([...batch.ids]);
      });
      queued = batch;
    }
    for (const id of ids) queued.ids.add(id);
    return queued.done;
  }

  /** Read these runs into `runs`; one that cannot be read is kept in `unread` and its alert stays open. */
  async function readRuns(ids) {
    const { found, failed } = await loadRuns(ids);
    for (const [id, run] of Object.entries(found)) { runs[id] = run; delete unread[id]; delete stale[id]; }
    Object.assign(unread, failed);
    showProblems();
  }

  function showProblems() {
    const count = Object.keys(unread).length;
    problems.replaceChildren(...(count ? [errorBox(new Error(`${count} run(s) could not be read, their alerts ` +
      `are listed as open: ${[...new Set(Object.values(unread).map((e) => e.message))].join("; ")}`))] : []));
  }

  function incidentCard(i) {
    const t = i.trigger;
    const escaped = i.escaped.map((e) => `${e.count} ${e.operation}`).join(", ");
    return h("li", { "data-incident": i.id }, h("article", { class: "card",
      "aria-label": `${i.kind} incident ${short(i.id)}${i.runId ? ` for run ${short(i.runId)}` : ""}` },
    h("header", {}, badge(i.kind), " ", h("time", { datetime: i.openedAt }, when(i.openedAt))),
    h("dl", { class: "facts" },
      h("dt", {}, "Agent"), h("dd", {}, i.agentId ?? "—"),
      h("dt", {}, "Entry point"), h("dd", {}, i.entryPoint ?? "—"),
      h("dt", {}, "What tripped"), h("dd", {}, t ? `${t.threshold}: ${t.count} against a limit of ${t.limit}` : i.kind),
      h("dt", {}, "Services touched"), h("dd", {}, i.servicesTouched.join(", ") || "none"),
      h("dt", {}, "Held vs escaped"), h("dd", {}, `${i.held} held, escaped: ${escaped || "none"}`),
      h("dt", {}, "Policy version"), h("dd", {}, i.policyVersion ?? "—"),
      h("dt", {}, "Run"), h("dd", {}, i.runId ? runLink(i.runId) : "none")),
    h("p", {}, h("a", { href: "#/policy" }, "Proposals for it on the Policy page"))));
  }

  /** Incidents no proposal decided yet, newest first (the gateway lists them so). */
  function loadIncidents() {
    return gql(`query { incidents(first: 50) { nodes { id kind runId agentId entryPoint policyVersion openedAt
        decision trigger { threshold count limit } escaped { operation count } held servicesTouched } } }`)
      .then(({ incidents }) => {
        const open = incidents.nodes.filter((i) => i.decision === null);
        incidentList.replaceChildren(...open.map(incidentCard));
        incidentsNote.replaceChildren(...(open.length ? [] : [note("No open incident.")]));
      })
      .catch((error) => incidentsNote.replaceChildren(errorBox(error)));
  }

  async function add(found) {
    const fresh = found.filter((a) => !alerts.has(a.id));
    for (const a of fresh) alerts.set(a.id, a);
    await remember([...new Set(fresh.map((a) => a.runId).filter((id) => id && !runs[id]))]);
    for (const a of fresh) {
      place(a);
      if (isOpen(a, runs[a.runId])) follow(a.runId);
    }
  }

  // Subscribe first, then list: an alert raised in between arrives by one or the other (ids dedupe).
  const stopAlerts = live.subscribe(`subscription { alertRaised { ${ALERT_FIELDS} } }`, {},
    (data) => { add([data.alertRaised]); loadIncidents(); },
    (error) => { liveState.textContent = `live updates stopped: ${error.message}`; });
  const listProblem = h("div");
  main.append(listProblem);

  /** List what is there: on opening the page, and after live updates come back (what was raised while they
   * were down arrives by neither the subscription's 30 s replay nor anything else). */
  function list() {
    gql(`query { alerts(first: 100) { ${ALERT_FIELDS} } }`)
      .then((data) => { listProblem.replaceChildren(); return add(data.alerts); })
      .catch((error) => listProblem.replaceChildren(errorBox(error)));
    loadIncidents();
  }

  const stopState = live.onState((state) => { liveState.textContent = state.message; });
  const stopReconnect = live.onReconnect(() => {
    // Runs may have moved meanwhile too: read those still open again.
    remember([...new Set([...alerts.values()].filter((a) => isOpen(a, runs[a.runId])).map((a) => a.runId))])
      .then(() => { for (const a of alerts.values()) place(a); });
    list();
  });
  list();

  return () => {
    closed = true;  // a follow still on its way (a decision, alerts being added) opens no feed now
    stopAlerts();
    stopState();
    stopReconnect();
    for (const stop of following.values()) stop();
  };
}
