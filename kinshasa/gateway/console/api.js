// The console's one way to the gateway: GraphQL over HTTP POST and subscriptions over graphql-transport-ws.
// Every action the console offers is one of these operations, so the CLI, scripts and the console stay equal.

const KEY = "kinshasa.operatorKey";

export function savedKey() {
  return sessionStorage.getItem(KEY);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

export class GraphQLError extends Error {
  constructor(errors) {
    super(errors.map((e) => e.message).join("; "));
    this.errors = errors;
    this.code = errors[0]?.extensions?.code ?? null;
  }
}

/** Run one query or mutation; resolves to `data`, rejects with a GraphQLError carrying the gateway's words. */
export async function gql(query, variables = {}, key = savedKey()) {
  const body = await post(query, variables, key);
  if (body.errors && body.errors.length) throw new GraphQLError(body.errors);
  return body.data;
}

/** A query whose parts may fail alone (a backend down, a run gone): resolves to { data, errors }. */
export async function gqlPartial(query, variables = {}) {
  const body = await post(query, variables, savedKey());
  if (!body.data) throw new GraphQLError(body.errors || [{ message: "no data" }]);
  return { data: body.data, errors: body.errors || [] };
}

// The gateway refuses a document with more than 30 aliases (gateway/settings.py max_aliases): reads of many
// things go at most 25 to a request, and fewer when the gateway finds that many too costly.
export const ALIASES_PER_REQUEST = 25;

/**
 * Read many things, one alias each (`part(item)` is the field to read, such as `run(id: "...") { id }`),
 * at most `size` (ALIASES_PER_REQUEST) to a request, halved while the gateway answers QUERY_TOO_COSTLY. Resolves to one `{ data }` or `{ error }` per item, in order,
 * and never rejects: a caller decides what an item that could not be read means. An item whose field
 * fails (a run gone) fails alone: the rest of its request is asked again without it.
 */
export async function gqlEach(items, part, size = ALIASES_PER_REQUEST) {
  const step = Math.max(1, Math.min(size, ALIASES_PER_REQUEST));
  const results = [];
  // One request after the other: the operator's cost rate is shared with everything else the page reads.
  for (let start = 0; start < items.length; start += step) {
    results.push(...await readBatch(items.slice(start, start + step), part));
  }
  return results;
}

const RATE_RETRIES = 10;
const RATE_WAIT_MIN_MS = 250;
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

async function readBatch(batch, part) {
  const query = `query { ${batch.map((item, i) => `a${i}: ${part(item)}`).join("\n")} }`;
  let body;
  try {
    body = await post(query, {}, savedKey());
  } catch (error) {
    return batch.map(() => ({ error }));
  }
  const errors = body.errors || [];
  const failedAlone = (i) => errors.find((e) => e.path && e.path[0] === `a${i}`);
  if (body.data) {
    return batch.map((_, i) => {
      const failed = failedAlone(i);
      return failed ? { error: new GraphQLError([failed]) } : { data: body.data[`a${i}`] ?? null };
    });
  }
  // Too costly for one request (the gateway prices each field): the halves are asked apart.
  if (batch.length > 1 && errors.some((e) => e.extensions?.code === "QUERY_TOO_COSTLY")) {
    const half = Math.ceil(batch.length / 2);
    return [...await readBatch(batch.slice(0, half), part), ...await readBatch(batch.slice(half), part)];
  }
  // No data at all: either some items' fields failed (a non-null field nulls the whole answer) or the
  // request itself was refused. Items named by an error fail; the others are asked again without them.
  const named = batch.map((_, i) => failedAlone(i));
  if (!named.some(Boolean) || named.every(Boolean)) {
    const error = new GraphQLError(errors.length ? errors : [{ message: "the gateway answered no data" }]);
    return batch.map((_, i) => ({ error: named[i] ? new GraphQLError([named[i]]) : error }));
  }
  const rest = batch.filter((_, i) => !named[i]);
  const again = await readBatch(rest, part);
  return batch.map((_, i) => (named[i] ? { error: new GraphQLError([named[i]]) } : again.shift()));
}

/** One request; over the operator's rate (refused before anything ran, so a mutation too is safe to send
 * again), it waits as long as the gateway says and tries again, a few times, before answering the refusal. */
async function post(query, variables, key) {
  for (let attempt = 0; ; attempt += 1) {
    const body = await postOnce(query, variables, key);
    const limited = (body.errors || []).find((e) => e.extensions?.code === "RATE_LIMITED");
    if (!limited || attempt >= RATE_RETRIES) return body;
    const wait = Math.max(RATE_WAIT_MIN_MS, 1000 * (limited.extensions.retryAfterS ?? 1));
    await sleep(Math.min(5000, wait * (1 + Math.random())));
  }
}

async function postOnce(query, variables, key) {
  const response = await fetch("/graphql", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
    body: JSON.stringify({ query, variables }),
  });
  let body;
  try {
    body = await response.json();
  } catch {
    throw new GraphQLError([{ message: `the gateway answered ${response.status} without a GraphQL body` }]);
  }
  return body;
}

// Reconnecting waits this long after the first loss, doubling on each failed attempt up to RETRY_MAX_MS.
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 30000;
// Close codes by which the gateway refuses the key itself: trying again cannot help, signing in can.
const REFUSED = new Set([4401, 4403]);

/**
 * A graphql-transport-ws connection shared by the page's subscriptions; the key goes in connection_init.
 * A lost connection is made again with back-off and every subscription still wanted is sent again;
 * `onReconnect` listeners then re-read what may have been missed meanwhile. A refused key calls `onRefused`.
 */
class Live {
  constructor() {
    this.socket = null;
    this.ready = null;
    this.acked = false;
    this.next = 1;
    this.subscriptions = new Map();
    this.attempts = 0;
    this.lost = false;
    this.retry = null;
    this.stateListeners = new Set();
    this.reconnectListeners = new Set();
    this.onRefused = () => {};
  }

  connect() {
    if (this.ready) return this.ready;
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/graphql`;
    this.ready = new Promise((resolve, reject) => {
      const socket = new WebSocket(url, "graphql-transport-ws");
      this.socket = socket;
      socket.onopen = () => {
        socket.send(JSON.stringify({ type: "connection_init", payload: { authorization: `Bearer ${savedKey()}` } }));
      };
      socket.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "connection_ack") {
          this.acked = true;
          this.attempts = 0;
          for (const id of this.subscriptions.keys()) this.send(id);
          resolve(socket);
          this.tell({ live: true, message: "live" });
          if (this.lost) {
            this.lost = false;
            for (const listener of this.reconnectListeners) listener();
          }
        } else if (message.type === "ping") {
          socket.send(JSON.stringify({ type: "pong" }));
        } else if (message.id && this.subscriptions.has(message.id)) {
          this.subscriptions.get(message.id).handle(message);
        }
      };
      socket.onclose = (event) => {
        reject(new Error(`live updates closed (${event.code} ${event.reason || ""})`));
        if (this.socket !== socket) return; // closed on purpose (sign-out)
        this.socket = null;
        this.ready = null;
        this.acked = false;
        if (REFUSED.has(event.code)) {
          this.subscriptions.clear();
          this.tell({ live: false, message: "live updates refused: sign in again" });
          this.onRefused(event);
          return;
        }
        this.lost = true;
        if (!this.subscriptions.size) return;
        const delay = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** this.attempts);
        this.attempts += 1;
        this.tell({ live: false, message: `live updates stopped (${event.code}${event.reason ? ` ${event.reason}` : ""}); ` +
          `trying again in ${Math.round(delay / 1000)} s` });
        this.retry = setTimeout(() => {
          this.retry = null;
          this.connect().catch(() => {});
        }, delay);
      };
    });
    return this.ready;
  }

  send(id) {
    const { query, variables } = this.subscriptions.get(id);
    this.socket.send(JSON.stringify({ id, type: "subscribe", payload: { query, variables } }));
  }

  tell(state) {
    this.state = state;
    for (const listener of this.stateListeners) listener(state);
  }

  /** `listener({ live, message })` now and on each change of the connection; returns a function that stops it. */
  onState(listener) {
    this.stateListeners.add(listener);
    if (this.state) listener(this.state);
    return () => this.stateListeners.delete(listener);
  }

  /** `listener()` after each reconnection, to read again what was raised while the connection was down. */
  onReconnect(listener) {
    this.reconnectListeners.add(listener);
    return () => this.reconnectListeners.delete(listener);
  }

  /**
   * Subscribe; `onData(data)` for each event, `onError(error, data)` for an error of the subscription (with
   * the event's data, or null, when an event came with errors), `onDone()` when the gateway ends it
   * (runChanged ends once its run settles). Returns a function that unsubscribes.
   */
  subscribe(query, variables, onData, onError = () => {}, onDone = () => {}) {
    const id = String(this.next++);
    this.subscriptions.set(id, {
      query,
      variables,
      handle: (message) => {
        if (message.type === "next") {
          if (message.payload.errors) onError(new GraphQLError(message.payload.errors), message.payload.data ?? null);
          else onData(message.payload.data);
        } else if (message.type === "error") {
          this.subscriptions.delete(id);
          onError(new GraphQLError(message.payload));
        } else if (message.type === "complete") {
          this.subscriptions.delete(id);
          onDone();
        }
      },
    });
    if (this.acked && this.socket && this.socket.readyState === WebSocket.OPEN) this.send(id);
    else if (!this.retry) this.connect().catch(() => {});
    return () => {
      if (!this.subscriptions.delete(id)) return;
      if (this.acked && this.socket && this.socket.readyState === WebSocket.OPEN) {
        this.socket.send(JSON.stringify({ id, type: "complete" }));
      }
    };
  }

  close() {
    this.subscriptions.clear();
    this.reconnectListeners.clear();
    if (this.retry) clearTimeout(this.retry);
    this.retry = null;
    const socket = this.socket;
    this.socket = null;
    this.ready = null;
    this.acked = false;
    this.lost = false;
    this.attempts = 0;
    this.state = null;
    if (socket) socket.close();
  }
}

export const live = new Live();
