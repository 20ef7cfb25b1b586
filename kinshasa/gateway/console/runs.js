// Runs: filter by agent, entry point, status, breaker state and time range; select several and revert
// them together, with each one's progress live in its row.

import { gql, live } from "./api.js";
import { revertMany } from "./decisions.js";
import { badge, errorBox, feedRetryDelay, h, note, progressText, runLink, short, when } from "./ui.js";

const STATUSES = ["RUNNING", "FINISHED", "TRIPPED", "REVERTING", "REVERTED", "REVERT_FAILED"];
const BREAKERS = ["CLOSED", "OPEN", "HALF_OPEN"];
// A revert's end: its progress moves no more.
const SETTLED = new Set(["REVERTED", "REVERT_FAILED"]);
const RUN_FEED = `subscription($id: ID!) { runChanged(id: $id) { id status
    revertProgress { total compensated failing pending } } }`;
const QUERY = `query($f: RunFilter, $after: String) { runs(filter: $f, first: 50, after: $after) {
  nodes { id agentId entryPoint status startedAt breaker { state writes errors }
          counts { held published applied compensated } }
  pageInfo { hasNextPage endCursor } } }`;

function field(id, label, control) {
  control.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), control);
}

function choice(options) {
  return h("select", {}, h("option", { value: "" }, "any"), options.map((o) => h("option", { value: o }, o)));
}

export function render(main) {
  const agent = h("input", { type: "text" });
  const entry = h("input", { type: "text" });
  const status = choice(STATUSES);
  const breaker = choice(BREAKERS);
  const after = h("input", { type: "datetime-local" });
  const before = h("input", { type: "datetime-local" });
  const form = h("form", { class: "filters", "aria-label": "Filter runs" },
    field("f-agent", "Agent", agent), field("f-entry", "Entry point", entry), field("f-status", "Status", status),
    field("f-breaker", "Breaker", breaker), field("f-after", "Started after (UTC)", after),
    field("f-before", "Started before (UTC)", before), h("button", { type: "submit" }, "Filter"));
  const revert = h("button", { type: "button", class: "danger", disabled: true }, "Revert selected");
  const message = h("p", { role: "status", class: "note" });
  const body = h("tbody");
  const more = h("button", { type: "button", hidden: true }, "More runs");
  // Busy while a listing is on its way: its rows are about to replace those shown.
  const table = h("table", { class: "list", "aria-label": "Runs", "aria-busy": "true" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Select")),
      ["Run", "Agent", "Entry point", "Started", "Status", "Breaker", "Counts", "Revert progress"]
        .map((t) => h("th", { scope: "col" }, t)))),
    body);
  main.append(h("h1", {}, "Runs"), form, h("div", { class: "toolbar" }, revert), message, table, more);

  const rows = new Map();
  const watching = new Map();
  let cursor = null;
  const selected = () => [...rows.values()].filter((r) => r.box.checked).map((r) => r.run.id);
  const sync = () => {
    const n = selected().length;
    revert.disabled = n === 0;
    revert.textContent = n ? `Revert selected (${n})` : "Revert selected";
  };
  const utc = (input) => (input.value ? new Date(`${input.value}Z`).toISOString() : null);
  const filter = () => ({
    agentId: agent.value.trim() || null, entryPoint: entry.value.trim() || null,
    status: status.value || null, breakerState: breaker.value || null,
    startedAfter: utc(after), startedBefore: utc(before),
  });

  function row(run) {
    const box = h("input", { type: "checkbox", id: `select-run-${run.id}`, onchange: sync });
    const statusCell = h("td", {}, badge(run.status));
    const progressCell = h("td", { role: "status" });
    const tr = h("tr", { "data-run": run.id },
      h("td", {}, h("label", { for: box.id, class: "sr-only" }, `Select run ${short(run.id)}`), box),
      h("td", {}, runLink(run.id)), h("td", {}, run.agentId), h("td", {}, run.entryPoint),
      h("td", {}, when(run.startedAt)), statusCell, h("td", {}, badge(run.breaker.state)),
      h("td", {}, `${run.breaker.writes} writes, ${run.counts.held} held, ${run.counts.applied} applied, ` +
        `${run.counts.compensated} compensated`),
      progressCell);
    return { run, box, tr, statusCell, progressCell };
  }

  // Each new listing (the first, or a Filter) outdates any still on its way: a slow answer to an earlier
  // one must not replace the rows the operator is already selecting in.
  let listing = 0;

  async function load(next = null) {
    const mine = next ? listing : ++listing;
    table.setAttribute("aria-busy", "true");
    try {
      const page = (await gql(QUERY, { f: filter(), after: next })).runs;
      if (mine !== listing) return;
      const keep = new Set(selected());
      if (!next) { rows.clear(); body.replaceChildren(); }
      for (const run of page.nodes) {
        const r = row(run);
        r.box.checked = keep.has(run.id);  // a run still listed stays selected
        rows.set(run.id, r);
        body.append(r.tr);
      }
      if (!rows.size) body.append(h("tr", {}, h("td", { colspan: 9 }, "No run matches.")));
      cursor = page.pageInfo.hasNextPage ? page.pageInfo.endCursor : null;
      more.hidden = !cursor;
      sync();
    } catch (error) {
      message.replaceChildren(errorBox(error));
    } finally {
      if (mine === listing) table.setAttribute("aria-busy", "false");
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  more.addEventListener("click", () => load(cursor));
  revert.addEventListener("click", async () => {
    const ids = selected();
    const done = await revertMany(ids);
    if (!done) return;
    const result = done.revertRuns;
    message.textContent = `Revert requested for ${result.requested.length} run(s); ` +
      `${result.unchanged.length} already reverting or reverted.`;
    for (const id of ids) if (!watching.has(id)) follow(id);
  });

  /**
   * Show a run's status and revert progress in its row as they change, until its revert ends. A feed that
   * fails is opened again (`feedRetryDelay`); `failures` counts those in a row.
   */
  function follow(id, failures = 0) {
    const show = (run, problem = null) => {
      const r = rows.get(id);
      if (!r) return;
      if (run) r.statusCell.replaceChildren(badge(run.status));
      r.progressCell.textContent = problem
        ? `${run ? `${run.status}: progress` : "Progress"} unknown for now (${problem.message}); asking again`
        : progressText(run.status, run.revertProgress);
    };
    let retry = null;
    const end = () => { clearTimeout(retry); watching.delete(id); stop(); };
    const stop = live.subscribe(RUN_FEED, { id }, (data) => {
      failures = 0;
      show(data.runChanged);
      // Nothing moves after these: stop watching (the gateway ends the feed there too).
      if (SETTLED.has(data.runChanged.status)) end();
    }, (error, data) => {
      show(data?.runChanged ?? null, error);
      stop();
      retry = setTimeout(() => { watching.delete(id); follow(id, failures + 1); }, feedRetryDelay(failures + 1));
    }, () => watching.delete(id));
    watching.set(id, end);
  }

  load();
  return () => [...watching.values()].forEach((stop) => stop());
}
