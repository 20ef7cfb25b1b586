// Policy: the effective breaker and quarantine policy, every version with its author, reason and the incident
// it came from, and the policy changes proposed for incidents with the backtest behind each, to Accept or
// Reject (acceptProposal / rejectProposal, each with the operator's reason).

import { gql } from "./api.js";
import { decide, errorBox, h, note, short, when } from "./ui.js";

const SETTINGS = `maxWrites maxErrors maxServices maxVelocity velocityWindowS quarantineWindowS operationWindows
  probeWrites holdTimeoutS autoRevert maxConcurrentRuns maxRunsPerHour maxAgentWritesPerHour operationGates`;
const BACKTEST = `runsReplayed incidentRunsReplayed incidentRunsCaught incidentRunsCaughtEarlier
  escapedWritesBefore escapedWritesAfter goodRunsReplayed goodRunsTripped`;
// Proposals are drafted on an incident's first read (a backtest each): the page reads the newest incidents.
const INCIDENTS = 10;

function settings(s) {
  const set = Object.entries(s).filter(([, v]) => v !== null && v !== undefined);
  return set.length ? h("dl", { class: "payload" }, set.map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))])) : h("span", { class: "muted" }, "inherits all");
}

function backtest(b) {
  return h("dl", { class: "facts" },
    h("dt", {}, "Runs replayed"), h("dd", {}, String(b.runsReplayed)),
    h("dt", {}, "Incident runs caught"),
    h("dd", {}, `${b.incidentRunsCaught} of ${b.incidentRunsReplayed} (${b.incidentRunsCaughtEarlier} earlier)`),
    h("dt", {}, "Escaped writes"), h("dd", {}, `${b.escapedWritesBefore} before → ${b.escapedWritesAfter} after`),
    h("dt", {}, "Good runs tripped"), h("dd", {}, `${b.goodRunsTripped} of ${b.goodRunsReplayed}`));
}

export function render(main) {
  const versions = h("div");
  const proposals = h("section", { "aria-labelledby": "proposals-title" });
  const outcome = h("p", { role: "status", "aria-live": "polite" });
  main.append(h("h1", {}, "Policy"), outcome, versions, proposals);

  function showVersions() {
    return gql(`query { policy { version effective { ${SETTINGS} }
        history { version scope subject author reason createdAt loosen incidentId settings { ${SETTINGS} } } } }`)
      .then(({ policy }) => versions.replaceChildren(
        h("section", { class: "panel", "aria-labelledby": "effective-title" },
          h("h2", { id: "effective-title" }, `Defaults in effect (version ${policy.version})`), settings(policy.effective)),
        h("h2", {}, "Versions, newest first"),
        h("table", { class: "list", "aria-label": "Policy versions" },
          h("thead", {}, h("tr", {}, ["Version", "Layer", "Settings", "Author", "Reason", "Incident", "When"]
            .map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, policy.history.map((v) => h("tr", { "data-version": v.version },
            h("td", {}, String(v.version)),
            h("td", {}, v.scope, v.subject ? ` ${v.subject}` : "", v.loosen ? " (loosens)" : ""),
            h("td", {}, settings(v.settings)), h("td", {}, v.author), h("td", {}, v.reason),
            h("td", { class: "mono" }, v.incidentId ?? "—"),
            h("td", {}, when(v.createdAt))))))))
      .catch((error) => versions.replaceChildren(errorBox(error)));
  }

  function decideOn(action, proposal) {
    const accept = action === "Accept";
    return decide({
      title: `${action} proposal ${short(proposal.id)}`,
      effect: accept
        ? `Append a version of the ${proposal.scope} ${proposal.subject} layer with these settings (each the ` +
          "stricter of the layer's and the proposal's), linked to its incident."
        : "Record that this proposal is rejected, and why; the policy does not change.",
      confirmLabel: `${action} proposal`,
      act: (why) => gql(`mutation($id: ID!, $why: String!) { ${accept ? "acceptProposal" : "rejectProposal"}(id: $id,
        reason: $why) { id status policyVersion } }`, { id: proposal.id, why }),
    }).then((done) => {
      if (!done) return;
      const decided = done.acceptProposal ?? done.rejectProposal;
      outcome.textContent = decided.policyVersion
        ? `Proposal ${short(proposal.id)} ${decided.status.toLowerCase()}: policy version ${decided.policyVersion}.`
        : `Proposal ${short(proposal.id)} ${decided.status.toLowerCase()}.`;
      showVersions();
      showProposals();
    });
  }

  function proposalCard(incident, p) {
    const open = p.status === "PROPOSED";
    return h("li", {}, h("article", { class: "card", "aria-label": `Proposal ${short(p.id)} for incident ${short(incident.id)}` },
      h("header", {}, h("strong", {}, `${p.scope} ${p.subject}`), " · ", p.status,
        p.policyVersion ? ` (version ${p.policyVersion})` : ""),
      h("p", { class: "summary" }, p.rationale),
      settings(p.settings),
      backtest(p.backtest),
      p.reason ? h("p", { class: "muted" }, `${p.decidedBy ?? ""}: ${p.reason}`) : null,
      open ? h("div", { class: "actions", role: "group", "aria-label": "Decision" },
        ["Accept", "Reject"].map((action) => h("button", {
          type: "button", class: action === "Reject" ? "danger" : "",
          "aria-label": `${action} proposal ${short(p.id)}`, onclick: () => decideOn(action, p),
        }, action))) : null));
  }

  function showProposals() {
    return gql(`query($first: Int!) { incidents(first: $first) { nodes { id kind runId agentId entryPoint openedAt
        proposals { id scope subject rationale status reason decidedBy policyVersion settings { ${SETTINGS} }
          backtest { ${BACKTEST} } } } } }`, { first: INCIDENTS })
      .then(({ incidents }) => {
        const withProposals = incidents.nodes.filter((i) => i.proposals.length);
        proposals.replaceChildren(h("h2", { id: "proposals-title" }, "Proposals, by incident, newest first"),
          withProposals.length ? h("ol", { class: "cards", "aria-label": "Proposals" }, withProposals.map((i) =>
            h("li", { "data-incident": i.id },
              h("h3", {}, `Incident ${i.kind} `, h("span", { class: "mono" }, i.id)),
              h("p", { class: "muted" }, `run ${i.runId ?? "—"} · agent ${i.agentId ?? "—"} · entry point ` +
                `${i.entryPoint ?? "—"} · ${when(i.openedAt)}`),
              h("ol", { class: "cards" }, i.proposals.map((p) => proposalCard(i, p))))))
            : note("No proposal: the recent incidents teach nothing the policy does not already know."));
      })
      .catch((error) => proposals.replaceChildren(h("h2", { id: "proposals-title" }, "Proposals"), errorBox(error)));
  }

  showVersions();
  showProposals();
  return () => {};
}
