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

async function post(query, variables, key) {
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

/** A graphql-transport-ws connection shared by the page's subscriptions; the key goes in connection_init. */
class Live {
  constructor() {
    this.socket = null;
    this.ready = null;
    this.next = 1;
    this.handlers = new Map();
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
        if (message.type === "connection_ack") resolve(socket);
        else if (message.type === "ping") socket.send(JSON.stringify({ type: "pong" }));
        else if (message.id && this.handlers.has(message.id)) this.handlers.get(message.id)(message);
      };
      socket.onclose = (event) => {
        reject(new Error(`live updates closed (${event.code} ${event.reason || ""})`));
        const handlers = [...this.handlers.values()];
        this.socket = null;
        this.ready = null;
        for (const handler of handlers) handler({ type: "closed", code: event.code });
      };
    });
    return this.ready;
  }

  /** Subscribe; `onData(data)` for each event, `onError(error)` once. Returns a function that unsubscribes. */
  subscribe(query, variables, onData, onError = () => {}) {
    const id = String(this.next++);
    let closed = false;
    this.handlers.set(id, (message) => {
      if (message.type === "next") {
        if (message.payload.errors) onError(new GraphQLError(message.payload.errors));
        else onData(message.payload.data);
      } else if (message.type === "error") {
        onError(new GraphQLError(message.payload));
      } else if (message.type === "closed" && !closed) {
        // The socket went away (a gateway restart): come back on a new one, as a page reload would.
        this.handlers.delete(id);
        setTimeout(() => { if (!closed) stop = this.subscribe(query, variables, onData, onError); }, 1000);
      }
    });
    this.connect()
      .then((socket) => socket.send(JSON.stringify({ id, type: "subscribe", payload: { query, variables } })))
      .catch(onError);
    let stop = () => {
      closed = true;
      this.handlers.delete(id);
      if (this.socket && this.socket.readyState === WebSocket.OPEN) {
        this.socket.send(JSON.stringify({ id, type: "complete" }));
      }
    };
    return () => stop();
  }

  close() {
    this.handlers.clear();
    if (this.socket) this.socket.close();
    this.socket = null;
    this.ready = null;
  }
}

export const live = new Live();
