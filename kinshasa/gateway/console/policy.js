// Policy: the effective breaker and quarantine policy and every version with its author and reason.
// (Proposals with backtest figures appear here once the policy-proposal API exists.)

import { gql } from "./api.js";
import { errorBox, h, when } from "./ui.js";

const SETTINGS = `maxWrites maxErrors maxServices maxVelocity velocityWindowS quarantineWindowS operationWindows
  probeWrites holdTimeoutS autoRevert maxConcurrentRuns maxRunsPerHour maxAgentWritesPerHour`;

function settings(s) {
  const set = Object.entries(s).filter(([, v]) => v !== null && v !== undefined);
  return set.length ? h("dl", { class: "payload" }, set.map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))])) : h("span", { class: "muted" }, "inherits all");
}

export function render(main) {
  main.append(h("h1", {}, "Policy"));
  gql(`query { policy { version effective { ${SETTINGS} }
      history { version scope subject author reason createdAt loosen settings { ${SETTINGS} } } } }`)
    .then(({ policy }) => {
      main.append(
        h("section", { class: "panel", "aria-labelledby": "effective-title" },
          h("h2", { id: "effective-title" }, `Defaults in effect (version ${policy.version})`), settings(policy.effective)),
        h("h2", {}, "Versions, newest first"),
        h("table", { class: "list", "aria-label": "Policy versions" },
          h("thead", {}, h("tr", {}, ["Version", "Layer", "Settings", "Author", "Reason", "When"]
            .map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, policy.history.map((v) => h("tr", {},
            h("td", {}, String(v.version)),
            h("td", {}, v.scope, v.subject ? ` ${v.subject}` : "", v.loosen ? " (loosens)" : ""),
            h("td", {}, settings(v.settings)), h("td", {}, v.author), h("td", {}, v.reason),
            h("td", {}, when(v.createdAt)))))));
    })
    .catch((error) => main.append(errorBox(error)));
  return () => {};
}
