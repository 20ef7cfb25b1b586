// Small DOM helpers shared by the pages: element building, the decision dialog, times and diffs.

/** h("button", {onclick, "aria-label": ...}, "Text", child...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function short(id) {
  return id ? String(id).slice(0, 8) : "";
}

export function runLink(id) {
  return h("a", { href: `#/run/${encodeURIComponent(id)}`, class: "mono" }, short(id));
}

export function badge(text, kind = String(text).toLowerCase()) {
  return h("span", { class: `badge badge-${kind}` }, text);
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}

export function note(text) {
  return h("p", { class: "note", role: "status" }, text);
}

/**
 * The decision dialog: says what the action will do before it does it, asks for a reason, and runs
 * `act(reason)` only on confirm. Resolves to act's result, or null when cancelled. Keyboard: Tab moves
 * between the reason, Confirm and Cancel; Enter on Confirm confirms; Escape cancels.
 */
export function decide({ title, effect, confirmLabel, reasonRequired = true, reasonLabel = "Reason", act }) {
  return new Promise((resolve) => {
    const reason = h("textarea", { id: "decision-reason", rows: 3, "aria-required": reasonRequired ? "true" : null,
      placeholder: reasonRequired ? "Why (recorded with the decision)" : "Optional" });
    const problem = h("p", { class: "error", role: "alert", hidden: true });
    const confirm = h("button", { type: "submit", class: "danger" }, confirmLabel);
    const cancel = h("button", { type: "button" }, "Cancel");
    const form = h("form", { method: "dialog" },
      h("h2", { id: "decision-title" }, title),
      h("div", { class: "effect" }, h("strong", {}, "What this will do: "), effect),
      reasonLabel ? h("label", { for: "decision-reason" }, reasonLabel) : null,
      reasonLabel ? reason : null,
      problem,
      h("div", { class: "actions" }, confirm, cancel));
    const dialog = h("dialog", { "aria-labelledby": "decision-title", class: "decision" }, form);
    document.body.append(dialog);
    const finish = (value) => { dialog.close(); dialog.remove(); resolve(value); };
    cancel.addEventListener("click", () => finish(null));
    dialog.addEventListener("cancel", (event) => { event.preventDefault(); finish(null); });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const why = reason.value.trim();
      if (reasonLabel && reasonRequired && !why) {
        problem.hidden = false;
        problem.textContent = "Give a reason: it is recorded with the decision.";
        reason.focus();
        return;
      }
      confirm.disabled = true;
      try {
        finish(await act(why));
      } catch (error) {
        confirm.disabled = false;
        problem.hidden = false;
        problem.textContent = error.message;
      }
    });
    dialog.showModal();
    (reasonLabel ? reason : confirm).focus();
  });
}

/** Rows of a before -> after diff: every key of either side, changed ones marked. */
export function diff(before, after) {
  if (before === null && after === null) return h("p", { class: "muted" }, "no state shown by the service");
  // An entity absent on one side (created, or deleted) has no fields there; a bare value is one field.
  const side = (v) => (v === null || v === undefined ? {} : typeof v === "object" ? v : { value: v });
  const b = side(before);
  const a = side(after);
  const keys = [...new Set([...Object.keys(b), ...Object.keys(a)])];
  const show = (v) => (v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v));
  const rows = keys.map((key) => {
    const was = before === null ? undefined : b[key];
    const now = after === null ? undefined : a[key];
    const changed = JSON.stringify(was) !== JSON.stringify(now);
    return h("tr", { class: changed ? "changed" : "" },
      h("th", { scope: "row" }, key),
      h("td", { class: "before" }, show(was)),
      h("td", { "aria-hidden": "true" }, changed ? "→" : ""),
      h("td", { class: "after" }, show(now)));
  });
  return h("table", { class: "diff" },
    h("thead", {}, h("tr", {}, h("th", {}, "field"), h("th", {}, "before"), h("th", {}), h("th", {}, "after"))),
    h("tbody", {}, rows));
}

export function progressText(status, p) {
  if (!p) return status;
  return `${status}: ${p.compensated} of ${p.total} compensated, ${p.failing} failing, ${p.pending} pending`;
}

// A run's live feed that was refused, or whose event came with an error (the coordinator did not say the
// revert's progress in time), is opened again: it starts with the run as it is then, so nothing keeps a
// stale or empty progress, even when the event that failed was its run's last. The first try waits 2 s,
// each failure after it twice as long, up to 30 s; an event that comes through starts the count again.
const FEED_RETRY_MS = 2000;
const FEED_RETRY_MAX_MS = 30000;

/** How long to wait before opening a run's feed again after its `failures`-th failure in a row (from 1). */
export function feedRetryDelay(failures) {
  return Math.min(FEED_RETRY_MS * 2 ** Math.max(0, failures - 1), FEED_RETRY_MAX_MS);
}
