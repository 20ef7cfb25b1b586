// Approvals: every egress command (irreversible: an email, a payment) AWAITING_APPROVAL across runs,
// with its payload, run and agent; Approve or Deny (with a reason) one at a time, or several together.

import { gql } from "./api.js";
import { decideOnEgress, egressOutcome } from "./decisions.js";
import { errorBox, h, note, runLink, short, when } from "./ui.js";

const QUERY = `query($after: String) { approvals(first: 200, after: $after) {
  nodes { runId agentId entryPoint payload command { commandId operation acceptedAt entityId } }
  pageInfo { hasNextPage endCursor } } }`;

function payloadView(payload) {
  return h("dl", { class: "payload" }, Object.entries(payload).map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))]));
}

export function render(main) {
  const status = h("p", { role: "status", class: "note" });
  const body = h("tbody");
  const selectAll = h("input", { type: "checkbox", id: "select-all-approvals" });
  const approveSelected = h("button", { type: "button", disabled: true }, "Approve selected");
  const denySelected = h("button", { type: "button", class: "danger", disabled: true }, "Deny selected");
  const table = h("table", { class: "list", "aria-label": "Writes awaiting approval" },
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, h("label", { for: "select-all-approvals", class: "sr-only" }, "Select all"), selectAll),
      h("th", { scope: "col" }, "Write"), h("th", { scope: "col" }, "Payload"), h("th", { scope: "col" }, "Agent"), h("th", { scope: "col" }, "Run"),
      h("th", { scope: "col" }, "Waiting since"), h("th", { scope: "col" }, "Decide"))),
    body);
  main.append(h("h1", {}, "Approvals"),
    h("p", { class: "lead" }, "Irreversible writes wait here for an operator, whatever their run's window. " +
      "Approved, they leave for real; denied, they never leave."),
    h("div", { class: "toolbar", role: "group", "aria-label": "Selected writes" }, approveSelected, denySelected,
      h("button", { type: "button", onclick: () => load() }, "Refresh")),
    status, table);

  let rows = [];
  const selected = () => rows.filter((r) => r.box.checked).map((r) => r.approval);
  const sync = () => {
    const n = selected().length;
    approveSelected.disabled = denySelected.disabled = n === 0;
    approveSelected.textContent = n ? `Approve selected (${n})` : "Approve selected";
    denySelected.textContent = n ? `Deny selected (${n})` : "Deny selected";
    selectAll.checked = rows.length > 0 && n === rows.length;
  };
  selectAll.addEventListener("change", () => { rows.forEach((r) => { r.box.checked = selectAll.checked; }); sync(); });

  async function act(action, approvals) {
    const outcome = await decideOnEgress(action, approvals);
    if (outcome) {
      status.textContent = egressOutcome(action, outcome);
      await load(false);
    }
  }
  approveSelected.addEventListener("click", () => act("Approve", selected()));
  denySelected.addEventListener("click", () => act("Deny", selected()));

  async function load(announce = true) {
    try {
      const found = [];
      let after = null;
      do {
        const page = (await gql(QUERY, { after })).approvals;
        found.push(...page.nodes);
        after = page.pageInfo.hasNextPage ? page.pageInfo.endCursor : null;
      } while (after);
      rows = found.map((a) => {
        const what = `${a.command.operation} ${short(a.command.commandId)}`;
        const box = h("input", { type: "checkbox", id: `select-${a.command.commandId}`, onchange: sync });
        const tr = h("tr", {},
          h("td", {}, h("label", { for: box.id, class: "sr-only" }, `Select ${what}`), box),
          h("td", { class: "mono" }, a.command.operation),
          h("td", {}, payloadView(a.payload)),
          h("td", {}, a.agentId, h("br"), h("span", { class: "muted" }, a.entryPoint)),
          h("td", {}, runLink(a.runId)),
          h("td", {}, when(a.command.acceptedAt)),
          h("td", {}, h("div", { class: "actions" },
            h("button", { type: "button", "aria-label": `Approve ${what}`, onclick: () => act("Approve", [a]) }, "Approve"),
            h("button", { type: "button", class: "danger", "aria-label": `Deny ${what}`, onclick: () => act("Deny", [a]) }, "Deny"))));
        return { approval: a, box, tr };
      });
      body.replaceChildren(...rows.map((r) => r.tr));
      if (!rows.length) body.append(h("tr", {}, h("td", { colspan: 7 }, "Nothing awaits approval.")));
      if (announce) status.textContent = `${rows.length} write(s) awaiting approval.`;
      sync();
    } catch (error) {
      main.append(errorBox(error));
    }
  }
  load();
  return () => {};
}
