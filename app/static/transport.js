// EventTransportClient: one answer over SSE, POST-SSE, fetch streaming, REST or WebSocket,
// always delivered as the same protocol events: msgid, reasoning, token, meta, done, error.
//
//   const client = new EventTransportClient({endpoint: "", transport: "auto", payload: {prompt: "hi"}});
//   await client.connect((event, data) => { if (event === "token") out.textContent += data.text; });
//   client.abort();  // stops the generation on the server too
//
// No build step, no dependencies: a plain ES module served by the app.

const TRANSPORTS = ["postsse", "fetch", "sse", "ws", "rest"];
// Order for "auto": resumable POST-SSE first (survives network blips without a second
// generation), then fetch streaming, plain EventSource, and REST as the last resort.
const AUTO_ORDER = ["postsse", "fetch", "sse", "rest"];

export class TransportError extends Error {
  constructor(type, message, status) {
    super(message);
    this.type = type;
    this.status = status;
  }
}

// Incremental SSE frame parser shared by fetch and WebSocket: feed text, get events.
export class SseParser {
  constructor() {
    this.buffer = "";
  }

  feed(text) {
    this.buffer += text;
    const events = [];
    // A CR at the very end may be the first half of a CRLF still on its way: hold it.
    let tail = "";
    if (this.buffer.endsWith("\r")) {
      tail = "\r";
      this.buffer = this.buffer.slice(0, -1);
    }
    this.buffer = this.buffer.replace(/\r\n?/g, "\n");
    let end;
    while ((end = this.buffer.indexOf("\n\n")) !== -1) {
      const frame = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const event = { event: "message", data: [], id: null };
      for (const line of frame.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id") event.id = value;
      }
      if (event.data.length) events.push({ event: event.event, id: event.id, data: event.data.join("\n") });
    }
    this.buffer += tail;
    return events;
  }
}

async function errorFromResponse(response) {
  let type = "http_error";
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      type = body.error.type || type;
      message = body.error.message || message;
    }
  } catch (_) {
    /* not JSON: keep the status line */
  }
  return new TransportError(type, message, response.status);
}

export class EventTransportClient {
  // resumeTimeout: how long (ms) a resumable stream may try to reconnect before giving up;
  // EventSource itself would retry forever, leaving the page waiting on a dead server.
  constructor({ endpoint = "", transport = "auto", payload = {}, events = null, capabilities = null, token = null,
                resumeTimeout = 30000 } = {}) {
    this.endpoint = endpoint.replace(/\/$/, "");
    this.resumeTimeout = resumeTimeout;
    this.token = token; // bearer token when the server has auth on
    this.transport = transport;
    this.payload = payload;
    this.capabilities = capabilities;
    this.onEventFilter = events; // optional list of event names to deliver
    this.used = null;
    this._abort = null;
    this._aborted = false;
  }

  static get transports() {
    return TRANSPORTS.slice();
  }

  // What the server offers ({transports: [...]}), cached per endpoint.
  async offered() {
    if (!this.capabilities) {
      try {
        const response = await fetch(`${this.endpoint}/api/capabilities`);
        this.capabilities = response.ok ? await response.json() : { transports: ["sse", "rest"] };
      } catch (_) {
        this.capabilities = { transports: ["sse", "rest"] };
      }
    }
    return this.capabilities.transports;
  }

  // Whether a GET (EventSource) URL for this payload would pass the server's request-line limit.
  async urlTooLong() {
    await this.offered();
    const limit = this.capabilities.max_url_bytes || 8190;
    const url = `GET ${this.endpoint}/api/chat/stream?${this._query()} HTTP/1.1`;
    return new TextEncoder().encode(url).length > limit;
  }

  async pick() {
    if (this.transport !== "auto") return this.transport;
    const offered = await this.offered();
    const supported = (name) =>
      (name !== "fetch" || (typeof ReadableStream !== "undefined" && typeof TextDecoder !== "undefined")) &&
      (name !== "sse" && name !== "postsse" ? true : typeof EventSource !== "undefined");
    return AUTO_ORDER.find((name) => offered.includes(name) && supported(name)) || "rest";
  }

  // Runs the answer; onEvent(event, data, id) for each event. Resolves with the final
  // `done` data, rejects with a TransportError (server `error` event, HTTP or network).
  async connect(onEvent) {
    this._aborted = false;
    let transport = await this.pick();
    if (transport === "sse" && (await this.urlTooLong())) transport = "postsse"; // the prompt goes in a POST body
    if (!TRANSPORTS.includes(transport)) throw new TransportError("invalid_transport", `unknown transport ${transport}`);
    this.used = transport;
    const deliver = (event, data, id) => {
      if (!this.onEventFilter || this.onEventFilter.includes(event)) onEvent(event, data, id);
    };
    const runner = {
      sse: () => this._sse(deliver),
      postsse: () => this._postsse(deliver),
      fetch: () => this._fetch(deliver),
      rest: () => this._rest(deliver),
      ws: () => this._ws(deliver),
    }[transport];
    return runner();
  }

  _headers(extra = {}) {
    return this.token ? { ...extra, Authorization: `Bearer ${this.token}` } : extra;
  }

  abort() {
    this._aborted = true;
    if (this._abort) this._abort();
  }

  // Shared end-of-stream logic: `done` resolves, `error` rejects, anything else is passed on.
  _settle(deliver, resolve, reject, close) {
    return (event, rawData, id) => {
      let data;
      try {
        data = JSON.parse(rawData);
      } catch (_) {
        return;
      }
      deliver(event, data, id);
      if (event === "done") {
        close();
        resolve(data);
      } else if (event === "error") {
        close();
        reject(new TransportError(data.type || "error", data.message || "the stream failed", data.status));
      }
    };
  }

  _query() {
    const params = new URLSearchParams();
    // EventSource cannot send headers: the token rides in the URL (prefer POST-SSE).
    if (this.token) params.set("access_token", this.token);
    for (const [key, value] of Object.entries(this.payload)) {
      if (value === undefined || value === null || value === "") continue;
      params.set(key, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    return params.toString();
  }

  _eventSource(url, deliver, { resumable }) {
    return new Promise((resolve, reject) => {
      const source = new EventSource(url);
      let finished = false;
      let giveUp = null; // timer while a resumable stream is trying to reconnect
      const close = () => {
        finished = true;
        clearTimeout(giveUp);
        source.close();
      };
      source.onopen = () => {
        clearTimeout(giveUp);
        giveUp = null;
      };
      const handle = this._settle(deliver, resolve, reject, close);
      for (const name of ["msgid", "reasoning", "token", "meta", "done", "error"]) {
        source.addEventListener(name, (e) => {
          if (name === "error" && !(e instanceof MessageEvent)) return; // network error, below
          handle(name, e.data, e.lastEventId);
        });
      }
      source.onerror = () => {
        if (finished) return;
        // A direct stream cannot resume: reconnecting would start a second generation.
        // A POST-SSE stream resumes by itself (Last-Event-ID) unless the server closed it.
        if (!resumable || source.readyState === EventSource.CLOSED) {
          close();
          reject(new TransportError("network_error", "the connection to the server was lost"));
        } else if (giveUp === null) {
          giveUp = setTimeout(() => {
            if (finished) return;
            close();
            reject(new TransportError("network_error", "the server could not be reached again to resume the stream"));
          }, this.resumeTimeout);
        }
      };
      this._abort = () => {
        if (finished) return;
        close();
        reject(new TransportError("aborted", "stopped"));
      };
    });
  }

  async _sse(deliver) {
    // EventSource hides HTTP errors: check the request first with a cheap validation?
    // No: that would generate twice. Errors arrive as `error` events or as a lost connection.
    return this._eventSource(`${this.endpoint}/api/chat/stream?${this._query()}`, deliver, { resumable: false });
  }

  async _postsse(deliver) {
    const response = await fetch(`${this.endpoint}/api/chat/streams`, {
      method: "POST",
      headers: this._headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(this.payload),
    });
    if (!response.ok) throw await errorFromResponse(response);
    const { stream_url: streamUrl } = await response.json();
    const url = `${this.endpoint}${streamUrl}`;
    const running = this._eventSource(url, deliver, { resumable: true });
    const closeLocal = this._abort;
    this._abort = () => {
      // Stop the generation on the server (wherever it runs), then the local reader.
      fetch(url, { method: "DELETE", keepalive: true, headers: this._headers() }).catch(() => {});
      closeLocal();
    };
    if (this._aborted) this._abort();
    return running;
  }

  async _fetch(deliver) {
    const controller = new AbortController();
    this._abort = () => controller.abort();
    let response;
    try {
      response = await fetch(`${this.endpoint}/api/chat/stream`, {
        method: "POST",
        headers: this._headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(this.payload),
        signal: controller.signal,
      });
    } catch (err) {
      throw this._aborted ? new TransportError("aborted", "stopped") : new TransportError("network_error", String(err));
    }
    if (!response.ok) throw await errorFromResponse(response);
    const reader = response.body.getReader();
    // stream: true keeps a multi-byte character split across chunks until it is whole.
    const decoder = new TextDecoder("utf-8");
    const parser = new SseParser();
    return new Promise((resolve, reject) => {
      let finished = false;
      const close = () => {
        finished = true;
        controller.abort();
      };
      const handle = this._settle(deliver, resolve, reject, close);
      const pump = async () => {
        try {
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            for (const e of parser.feed(decoder.decode(value, { stream: true }))) {
              handle(e.event, e.data, e.id);
              if (finished) return;
            }
          }
          for (const e of parser.feed(decoder.decode() + "\n\n")) handle(e.event, e.data, e.id);
          if (!finished) reject(new TransportError("network_error", "the stream ended before its last event"));
        } catch (err) {
          if (finished) return;
          reject(this._aborted ? new TransportError("aborted", "stopped") : new TransportError("network_error", String(err)));
        }
      };
      pump();
    });
  }

  async _rest(deliver) {
    const controller = new AbortController();
    this._abort = () => controller.abort();
    let response;
    try {
      response = await fetch(`${this.endpoint}/api/chat`, {
        method: "POST",
        headers: this._headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(this.payload),
        signal: controller.signal,
      });
    } catch (err) {
      throw this._aborted ? new TransportError("aborted", "stopped") : new TransportError("network_error", String(err));
    }
    if (!response.ok) throw await errorFromResponse(response);
    const body = await response.json();
    // The same events a stream would have sent, all at once.
    deliver("msgid", { id: body.id, conversation_id: body.conversation_id, provider: body.provider, model: body.model });
    if (body.tools) for (const tool of body.tools) deliver("meta", { tool });
    if (body.reasoning) deliver("reasoning", { text: body.reasoning });
    deliver("token", { text: body.content });
    const done = { finish_reason: body.finish_reason, usage: body.usage };
    deliver("done", done);
    return done;
  }

  _ws(deliver) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const base = this.endpoint || `${scheme}//${location.host}`;
    const url = `${base.replace(/^http/, "ws")}/api/chat/ws`;
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url);
      const parser = new SseParser();
      let finished = false;
      const close = () => {
        finished = true;
        socket.close();
      };
      const handle = this._settle(deliver, resolve, reject, close);
      const first = this.token ? { ...this.payload, access_token: this.token } : this.payload;
      socket.onopen = () => socket.send(JSON.stringify(first));
      // Each message is one or more SSE frames: the same protocol as every other transport.
      socket.onmessage = (message) => {
        for (const e of parser.feed(message.data)) {
          handle(e.event, e.data, e.id);
          if (finished) return;
        }
      };
      socket.onerror = () => {
        if (!finished) {
          finished = true;
          reject(new TransportError("network_error", "the WebSocket connection failed"));
        }
      };
      socket.onclose = () => {
        if (!finished) {
          finished = true;
          reject(new TransportError(this._aborted ? "aborted" : "network_error", this._aborted ? "stopped" : "the WebSocket closed early"));
        }
      };
      this._abort = () => {
        if (finished) return;
        if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "stop" }));
        close();
        reject(new TransportError("aborted", "stopped"));
      };
    });
  }
}
