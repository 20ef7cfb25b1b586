// Dead letters: each component's DLQ; inspect a letter and reprocess it (reprocessDlq).

import { gql } from "./api.js";
import { decide, errorBox, h, when } from "./ui.js";

const QUERY = "query { dlq(first: 50) { component count entries error } }";

export function render(main) {
  const body = h("div");
  const outcome = h("p", { role: "status", class: "note" });
  main.append(h("h1", {}, "Dead letters"),
    h("p", { class: "lead" }, "Messages a component gave up on, per component. Reprocess one once its cause is fixed."),
    h("button", { type: "button", onclick: () => load() }, "Refresh"), outcome, body);

  async function load() {
    try {
      const { dlq } = await gql(QUERY);
      body.replaceChildren(...dlq.map((d) => h("section", { class: "panel", "aria-labelledby": `dlq-${d.component}` },
        h("h2", { id: `dlq-${d.component}` }, `${d.component}: ${d.count ?? "?"} dead letter(s)`),
        d.error ? h("p", { class: "error" }, d.error) : null,
        d.entries.length ? h("ul", { class: "letters" }, d.entries.map((e) => {
          const id = e.message_id ?? e.id;
          return h("li", {},
            h("details", {}, h("summary", {}, h("span", { class: "mono" }, String(id)), ` ${e.kind} · ${e.status} · `,
              `${e.attempts} attempt(s) · ${when(e.last_failed_at)} · ${e.error ?? e.reason ?? ""}`),
              h("pre", {}, JSON.stringify(e, null, 2))),
            h("button", { type: "button", "aria-label": `Reprocess dead letter ${id} of ${d.component}`,
              disabled: e.status === "reprocessed",
              onclick: async () => {
                const done = await decide({ title: `Reprocess dead letter of ${d.component}`,
                  effect: `Run message ${id} through ${d.component} again; if it fails again it stays here.`,
                  confirmLabel: "Reprocess", reasonLabel: null,
                  act: () => gql("mutation($c: String!, $ids: [String!]!) { reprocessDlq(component: $c, messageIds: $ids) { count results } }",
                    { c: d.component, ids: [String(e.message_id ?? e.id)] }) });
                if (done) {
                  const r = done.reprocessDlq.results[0] || {};
                  outcome.textContent = `Reprocessed ${id} of ${d.component}: ${r.outcome ?? "done"}` +
                    (r.error ? ` (${r.error})` : "");
                  load();
                }
              } }, "Reprocess"));
        })) : h("p", { class: "muted" }, "none"))));
    } catch (error) {
      body.replaceChildren(errorBox(error));
    }
  }
  load();
  return () => {};
}
