// The console's shell: sign-in with the operator's key (kept for this browser session only), the page
// router (#/inbox, #/approvals, #/runs, #/run/<id>, #/policy, #/dead-letters), nothing else.

import { forgetKey, gql, live, saveKey, savedKey } from "./api.js";
import { h } from "./ui.js";
import * as inbox from "./inbox.js";
import * as approvals from "./approvals.js";
import * as runs from "./runs.js";
import * as run from "./run.js";
import * as policy from "./policy.js";
import * as deadLetters from "./dead_letters.js";

const PAGES = { inbox, approvals, runs, run, policy, "dead-letters": deadLetters };
const main = document.getElementById("main");
let leave = () => {};

async function whoIs(key) {
  const data = await gql("query { me { id kind } }", {}, key);
  return data.me;
}

function signInForm(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
  const key = h("input", { id: "operator-key", type: "password", autocomplete: "off", required: true,
    spellcheck: "false" });
  const problem = h("p", { id: "sign-in-problem", class: "error", role: "alert", hidden: !message }, message || "");
  const form = h("form", { class: "sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in"),
    h("p", {}, "The console acts with an operator's key, the same one the CLI uses. It is kept for this " +
      "browser tab only and sent to this gateway alone."),
    h("label", { for: "operator-key" }, "Operator key"),
    key,
    problem,
    h("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const given = key.value.trim();
    try {
      const me = await whoIs(given);
      if (me.kind !== "operator") {
        problem.hidden = false;
        problem.textContent = `This is an ${me.kind} key (${me.id}): the console is for operators. ` +
          "Sign in with an operator key.";
        return;
      }
      saveKey(given);
      start(me);
    } catch (error) {
      problem.hidden = false;
      problem.textContent = error.code === "UNAUTHENTICATED"
        ? "The gateway does not recognise this key. Check it, or ask for an operator key."
        : `Could not sign in: ${error.message}`;
    }
  });
  main.replaceChildren(form);
  key.focus();
}

function route() {
  leave();
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "inbox").split("/");
  const page = PAGES[name] || inbox;
  for (const link of document.querySelectorAll("#nav a")) {
    const current = link.getAttribute("href") === `#/${name}` || (name === "run" && link.getAttribute("href") === "#/runs");
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  main.replaceChildren();
  leave = page.render(main, rest.map(decodeURIComponent)) || (() => {});
}

function start(me) {
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  document.getElementById("who").textContent = `signed in as ${me.id}`;
  window.addEventListener("hashchange", route);
  route();
}

function signOut(message) {
  forgetKey();
  live.close();
  window.removeEventListener("hashchange", route);
  leave();
  leave = () => {};
  signInForm(message);
}

document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
// The gateway closes live updates with 4401/4403 when it no longer takes the key (revoked, or not an
// operator's): back to sign-in, saying why.
live.onRefused = (event) => signOut(`The gateway refused this key for live updates (${event.code}` +
  `${event.reason ? `: ${event.reason}` : ""}). Sign in again with an operator key.`);

async function boot() {
  const key = savedKey();
  if (!key) return signInForm();
  try {
    const me = await whoIs(key);
    if (me.kind !== "operator") throw new Error("not an operator");
    start(me);
  } catch {
    forgetKey();
    signInForm();
  }
}

boot();
