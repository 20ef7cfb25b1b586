// Run: its breaker and counters, held commands, the ledger timeline newest first with each step's
// before -> after and compensation status, the state of what it touched now, and revert progress live.

import { gqlEach, gqlPartial, live } from "./api.js";
import { RUN_ACTIONS, decideOnRun } from "./decisions.js";
import { badge, diff, errorBox, h, note, progressText, short, when } from "./ui.js";

const QUERY = `query($id: ID!, $after: String) { run(id: $id) {
  id agentId entryPoint purpose status startedAt finishedAt revertReason revertRequestedAt
  breaker { state writes errors servicesTouched velocity velocityWindowS trippedReason trippedAt probesLeft tripCount }
  counts { held awaitingApproval published applied compensated discarded rejected }
  revertProgress { total compensated failing pending }
  held: commands(status: HELD, first: 200) { commandId operation entityId releaseAt reason }
  steps(first: 100, after: $after) {
    nodes { stepId operation service entity { service type id } appliedAt status attempts resolvedAt
            failureReason before after }
    pageInfo { hasNextPage endCursor } } } }`;
const STEP_STATUS = {
  APPLIED: "applied, not compensated",
  COMPENSATING: "compensating",
  COMPENSATED: "compensated",
  COMPENSATION_FAILED: "compensation refused",
  IRREVERSIBLE: "irreversible (egress: never compensated)",
};

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

async function currentStates(steps) {
  const entities = new Map();
  for (const s of steps) entities.set(`${s.entity.service}:${s.entity.type}:${s.entity.id}`, s.entity);
  const list = [...entities.values()];
  // ALIASES_PER_REQUEST entities to a request; one that cannot be read says why beside it.
  const results = await gqlEach(list, (e) => `entity(service: ${JSON.stringify(e.service)}, ` +
    `type: ${JSON.stringify(e.type)}, id: ${JSON.stringify(e.id)}) { state }`);
  const found = new Map();
  list.forEach((e, i) => {
    const { data, error } = results[i];
    found.set(`${e.service}:${e.type}:${e.id}`, error ? { error: error.message } : { state: data?.state ?? null });
  });
  return found;
}

export function render(main, [runId]) {
  const head = h("div");
  const warnings = h("div");
  const progress = h("section", { "aria-labelledby": "progress-title", class: "panel" },
    h("h2", { id: "progress-title" }, "Revert progress"), h("p", { id: "revert-progress", role: "status", "aria-live": "polite" }, "—"));
  const breakerBox = h("section", { class: "panel", "aria-labelledby": "breaker-title" });
  const heldBox = h("section", { class: "panel", "aria-labelledby": "held-title" });
  const timeline = h("section", { "aria-labelledby": "timeline-title" });
  const stateBox = h("section", { "aria-labelledby": "state-title" });
  main.append(head, warnings, h("div", { class: "panels" }, breakerBox, progress, heldBox), timeline, stateBox);
  let run = null;
  let loading = null;

  async function load() {
    let result;
    try {
      result = await gqlPartial(QUERY, { id: runId });
    } catch (error) {
      head.replaceChildren(h("h1", {}, `Run ${short(runId)}`), errorBox(error));
      return;
    }
    run = result.data.run;
    if (!run) {
      head.replaceChildren(h("h1", {}, `Run ${short(runId)}`), errorBox(new Error(result.errors[0]?.message)));
      return;
    }
    warnings.replaceChildren(...result.errors.map((e) => note(`Part of this page could not be read: ${e.message}`)));
    const buttons = RUN_ACTIONS.map((action) => h("button", {
      type: "button", class: action === "Revert" ? "danger" : "", "aria-label": `${action} run ${short(run.id)}`,
      disabled: ["REVERTING", "REVERTED"].includes(run.status) || (run.status === "REVERT_FAILED" && action !== "Revert"),
      onclick: async () => { if (await decideOnRun(action, run)) { refresh(); watch(); } },
    }, action));
    head.replaceChildren(
      h("h1", {}, "Run ", h("span", { class: "mono" }, run.id), " ", badge(run.status)),
      facts([["Agent", run.agentId], ["Entry point", run.entryPoint], ["Purpose", run.purpose ?? "—"],
        ["Started", when(run.startedAt)], ["Finished", when(run.finishedAt)],
        ["Revert reason", run.revertReason ?? "—"]]),
      h("div", { class: "actions", role: "group", "aria-label": "Decision" }, buttons));
    const b = run.breaker;
    const c = run.counts;
    breakerBox.replaceChildren(h("h2", { id: "breaker-title" }, "Breaker ", badge(b.state)), facts([
      ["Writes", b.writes], ["Errors", b.errors], ["Velocity", `${b.velocity} in ${b.velocityWindowS} s`],
      ["Services touched", b.servicesTouched.join(", ") || "none"], ["Tripped", b.trippedReason ?? "no"],
      ["Counts", `${c.held} held, ${c.awaitingApproval} awaiting approval, ${c.published} published, ` +
        `${c.applied} applied, ${c.compensated} compensated, ${c.discarded} discarded, ${c.rejected} rejected`]]));
    showProgress(run);
    heldBox.replaceChildren(h("h2", { id: "held-title" }, `Held commands (${run.held.length})`),
      run.held.length ? h("ul", {}, run.held.map((cmd) => h("li", {}, h("span", { class: "mono" }, cmd.operation),
        ` on ${cmd.entityId}`, cmd.releaseAt ? ` until ${when(cmd.releaseAt)}` : " (held until an operator decides)")))
        : h("p", { class: "muted" }, "none"));
    const steps = run.steps ? run.steps.nodes : [];
    timeline.replaceChildren(h("h2", { id: "timeline-title" }, `Ledger timeline, newest first (${steps.length})`),
      steps.length ? h("ol", { class: "timeline", reversed: true }, steps.map((s) => h("li", { "data-step": s.stepId },
        h("article", { class: "step", "aria-label": `Step ${s.stepId}: ${s.operation} on ${s.entity.id}` },
          h("header", {}, h("strong", {}, `#${s.stepId} ${s.operation}`), " on ",
            h("span", { class: "mono" }, `${s.entity.type} ${s.entity.id}`), " · ", when(s.appliedAt), " · ",
            badge(STEP_STATUS[s.status] ?? s.status, s.status.toLowerCase()),
            s.attempts ? h("span", { class: "muted" }, ` (${s.attempts} compensate attempt(s))`) : null,
            s.failureReason ? h("span", { class: "error" }, ` ${s.failureReason}`) : null),
          diff(s.before, s.after)))))
        : h("p", { class: "muted" }, "The ledger holds no step of this run yet."));
    const states = await currentStates(steps);
    stateBox.replaceChildren(h("h2", { id: "state-title" }, "State now of what the run touched"),
      states.size ? h("table", { class: "list", "aria-label": "State now" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Entity"), h("th", { scope: "col" }, "Now"))),
        h("tbody", {}, [...states.entries()].map(([key, v]) => h("tr", { "data-entity": key },
          h("th", { scope: "row", class: "mono" }, key),
          h("td", {}, v.error ? h("span", { class: "error" }, v.error)
            : v.state === null ? h("em", {}, "absent (never created, or undone)") : h("code", {}, JSON.stringify(v.state)))))))
        : h("p", { class: "muted" }, "Nothing yet."));
  }

  function showProgress(r) {
    const text = progress.querySelector("#revert-progress");
    text.textContent = r.revertProgress ? progressText(r.status, r.revertProgress) : `${r.status} (progress unavailable)`;
  }

  function refresh() {
    // One load at a time; a change during a load loads once more after it.
    if (loading) { loading.again = true; return; }
    loading = { again: false };
    load().finally(() => {
      const again = loading.again;
      loading = null;
      if (again) refresh();
    });
  }

  // The gateway ends runChanged once the run settles (reverted, revert given up, or finished holding
  // nothing); a decision taken here afterwards (a new revert) subscribes again.
  let stop = null;
  function watch() {
    if (stop) return;
    stop = live.subscribe(`subscription($id: ID!) { runChanged(id: $id) { id status
        revertProgress { total compensated failing pending } } }`, { id: runId }, (data) => {
      if (run) showProgress({ ...run, ...data.runChanged });
      refresh();
    }, () => refresh(), () => { stop = null; });  // an event that failed: read the run as it is instead
  }

  refresh();
  watch();
  return () => { if (stop) stop(); };
}
