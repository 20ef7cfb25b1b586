// Inbox: open alerts newest first, each with everything needed to decide and the decisions as buttons.
// New alerts arrive over the alertRaised subscription; the run of each open alert is followed with
// runChanged (until its alert is decided), so a revert's progress shows on its card as it happens.

import { gql, gqlPartial, live } from "./api.js";
import { RUN_ACTIONS, decideOnRun } from "./decisions.js";
import { badge, errorBox, h, note, progressText, runLink, short, when } from "./ui.js";

export const ALERT_FIELDS = `id runId kind source createdAt summary agentId entryPoint
  threshold { name count limit } servicesTouched held awaitingApproval propagated autoRevert failingCount`;
const RUN_FIELDS = `id status breaker { state }
  counts { held awaitingApproval published applied compensated discarded }
  revertProgress { total compensated failing pending }`;
// Runs whose alert still wants a decision; any other run's alert is listed as decided.
const OPEN_STATUSES = new Set(["TRIPPED", "REVERTING", "REVERT_FAILED"]);

function isOpen(alert, run) {
  if (!alert.runId || !run) return false;
  return OPEN_STATUSES.has(run.status) || run.counts.held + run.counts.awaitingApproval > 0;
}

async function loadRuns(ids) {
  if (!ids.length) return {};
  // One request for all of them: an alias per run, and a run that fails to read fails alone.
  const parts = ids.map((id, i) => `r${i}: run(id: ${JSON.stringify(id)}) { ${RUN_FIELDS} }`);
  let data = {};
  try {
    ({ data } = await gqlPartial(`query { ${parts.join("\n")} }`));
  } catch {
    return {};
  }
  const found = {};
  ids.forEach((id, i) => { if (data[`r${i}`]) found[id] = data[`r${i}`]; });
  return found;
}

export function render(main) {
  const alerts = new Map();
  const runs = {};
  const cards = new Map();
  const following = new Map();
  const openList = h("ol", { class: "cards", "aria-label": "Open alerts" });
  const decidedList = h("ol", { class: "cards decided", "aria-label": "Decided alerts" });
  const empty = note("Nothing waits for a decision.");
  const liveState = h("span", { class: "live", role: "status" }, "connecting live updates…");
  main.append(
    h("h1", {}, "Inbox"),
    h("p", { class: "lead" }, "Open alerts, newest first. Each decision says what it will do and asks why. ",
      liveState),
    openList, empty,
    h("h2", {}, "Decided and informational"), decidedList);

  function follow(runId) {
    if (!runId || following.has(runId)) return;
    // The gateway reads a followed run every half second: only runs still wanting a decision are followed.
    following.set(runId, live.subscribe(`subscription($id: ID!) { runChanged(id: $id) { ${RUN_FIELDS} } }`,
      { id: runId }, (data) => { runs[runId] = data.runChanged; refreshRun(runId); }, () => {}));
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
        const run = runs[alert.runId];
        if (!run) return;
        const done = await decideOnRun(action, run);
        if (done) {
          const fresh = await loadRuns([alert.runId]);
          if (fresh[alert.runId]) runs[alert.runId] = fresh[alert.runId];
          place(alert);
          follow(alert.runId);
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
    if (run) {
      c.status.replaceChildren(badge(run.status));
      const reverting = ["REVERTING", "REVERTED", "REVERT_FAILED"].includes(run.status);
      c.progress.textContent = reverting ? `Revert ${progressText(run.status, run.revertProgress)}` : "";
      c.buttons.forEach((b) => {
        b.disabled = reverting && b.textContent !== "Revert" || run.status === "REVERTED" || run.status === "REVERTING";
      });
    }
    const open = isOpen(alert, run);
    if (!open && run && following.has(alert.runId)) {
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

  async function add(found) {
    const fresh = found.filter((a) => !alerts.has(a.id));
    for (const a of fresh) alerts.set(a.id, a);
    const ids = [...new Set(fresh.map((a) => a.runId).filter((id) => id && !runs[id]))];
    Object.assign(runs, await loadRuns(ids));
    for (const a of fresh) {
      place(a);
      if (isOpen(a, runs[a.runId])) follow(a.runId);
    }
  }

  // Subscribe first, then list: an alert raised in between arrives by one or the other (ids dedupe).
  const stopAlerts = live.subscribe(`subscription { alertRaised { ${ALERT_FIELDS} } }`, {},
    (data) => add([data.alertRaised]), (error) => { liveState.textContent = `live updates stopped: ${error.message}`; });
  live.connect().then(() => { liveState.textContent = "live"; }, () => {});
  gql(`query { alerts(first: 100) { ${ALERT_FIELDS} } }`)
    .then((data) => add(data.alerts))
    .catch((error) => main.append(errorBox(error)));

  return () => {
    stopAlerts();
    for (const stop of following.values()) stop();
  };
}
