// The operator's decisions on a run (Release, Discard, Revert, Hold) and on egress (Approve, Deny): each
// says what it will do, asks for a reason, then calls the one GraphQL mutation that does it.

import { gql } from "./api.js";
import { decide, short } from "./ui.js";

const n = (count, what) => `${count} ${what}${count === 1 ? "" : "s"}`;

export const RUN_ACTIONS = ["Release", "Discard", "Revert", "Hold"];

function effect(action, run) {
  const c = run.counts;
  const id = short(run.id);
  switch (action) {
    case "Release":
      return `Publish the ${n(c.held, "held command")} of run ${id} now: they reach their services. ` +
        "Nothing already escaped changes.";
    case "Discard":
      return `Discard the ${n(c.held, "held command")} and ${n(c.awaitingApproval, "egress write")} awaiting ` +
        `approval of run ${id}: nothing downstream ever sees them. The ${n(c.published, "command")} ` +
        "already propagated stay as they are.";
    case "Revert":
      return `Discard what run ${id} still holds (${c.held} held, ${c.awaitingApproval} awaiting approval) ` +
        `and compensate the ${n(c.applied, "applied step")} that escaped, newest first. The run ends ` +
        "REVERTED; you can watch the progress here.";
    case "Hold":
      return `Keep the ${n(c.held, "held command")} of run ${id} (and any later ones) on hold until an ` +
        "operator releases them: no timer ever releases a held write.";
    default:
      throw new Error(`unknown action ${action}`);
  }
}

const MUTATIONS = {
  Release: "mutation($id: ID!, $why: String) { releaseRun(runId: $id, reason: $why) { count run { id status } } }",
  Discard: "mutation($id: ID!, $why: String) { discardRun(runId: $id, reason: $why) { count run { id status } } }",
  Hold: "mutation($id: ID!, $why: String) { holdRun(runId: $id, reason: $why) { count run { id status } } }",
  Revert: "mutation($id: ID!, $why: String!) { revertRun(runId: $id, reason: $why) { id status } }",
};

/** Ask, then act on one run; resolves to the mutation's data, or null when the operator cancelled. */
export function decideOnRun(action, run) {
  return decide({
    title: `${action} run ${short(run.id)}`,
    effect: effect(action, run),
    confirmLabel: `${action} run`,
    act: (why) => gql(MUTATIONS[action], { id: run.id, why }),
  });
}

/** Revert several runs at once with one reason (revertRuns). */
export function revertMany(runIds) {
  return decide({
    title: `Revert ${n(runIds.length, "run")}`,
    effect: `Discard what each of ${n(runIds.length, "run")} still holds and compensate what escaped, newest ` +
      "first; a run already reverting or reverted is left as it is.",
    confirmLabel: `Revert ${n(runIds.length, "run")}`,
    act: (why) => gql(`mutation($ids: [ID!]!, $why: String!) { revertRuns(selector: {runIds: $ids}, reason: $why) {
      requested { id status } unchanged { id status } } }`, { ids: runIds, why }),
  });
}

/**
 * Approve (no reason: approveEgress takes none) or deny (with its reason) one or more egress commands.
 * Each command is its own mutation: one that fails (decided meanwhile, a backend down) does not stop the
 * others. Resolves to { done, failed: [{ approval, error }] }, or null when cancelled.
 */
export function decideOnEgress(action, approvals) {
  const many = approvals.length > 1;
  const what = many ? n(approvals.length, "egress write") : `this ${approvals[0].command.operation} write`;
  const approve = action === "Approve";
  return decide({
    title: `${action} ${many ? n(approvals.length, "write") : approvals[0].command.operation}`,
    effect: approve
      ? `Publish ${what} now. It leaves for real and can never be called back.`
      : `Discard ${what}: it never leaves, and the agent sees DISCARDED with your reason.`,
    confirmLabel: approve ? `Approve ${many ? "all" : "write"}` : `Deny ${many ? "all" : "write"}`,
    reasonLabel: approve ? null : "Reason",
    act: async (why) => {
      const done = [];
      const failed = [];
      for (const a of approvals) {
        try {
          done.push(approve
            ? await gql("mutation($id: ID!) { approveEgress(commandId: $id) { commandId status } }",
              { id: a.command.commandId })
            : await gql("mutation($id: ID!, $why: String!) { denyEgress(commandId: $id, reason: $why) { commandId status } }",
              { id: a.command.commandId, why }));
        } catch (error) {
          failed.push({ approval: a, error });
        }
      }
      // A single write that failed stays in the dialog with the gateway's words, as any decision does.
      if (!many && failed.length) throw failed[0].error;
      return { done, failed };
    },
  });
}

/** "Approved 2 write(s)." or "Approved 2 write(s); 1 failed: notifier.send_email 1a2b3c4d: why." */
export function egressOutcome(action, { done, failed }) {
  const verb = action === "Approve" ? "Approved" : "Denied";
  if (!failed.length) return `${verb} ${done.length} write(s).`;
  const why = failed.map(({ approval, error }) =>
    `${approval.command.operation} ${short(approval.command.commandId)}: ${error.message}`).join("; ");
  return `${verb} ${done.length} write(s); ${failed.length} failed: ${why}`;
}
