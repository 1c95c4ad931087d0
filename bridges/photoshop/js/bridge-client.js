/*
 * sdcore bridge protocol v1 client in plain JavaScript (docs/bridge-protocol.md).
 *
 * Runs in Photoshop UXP panels (global WebSocket) and under Node (Node >= 22, or Node 20 with
 * --experimental-websocket, or pass `WebSocket` from the `ws` package). No dependencies.
 *
 *   const { BridgeClient } = require("./bridge-client.js");
 *   const client = new BridgeClient({ url: "ws://127.0.0.1:7862", token: "..." });
 *   await client.connect();
 *   const job = await client.submit({ prompt: "a fox", steps: 20 }, { init_image: pngBytes, mask: maskPng });
 *   job.onEvent = (event) => console.log(event.type, event.data);
 *   const result = await job.result();          // { images: [{ data: Uint8Array (PNG), seed, infotext, ... }] }
 */
"use strict";

const PROTOCOL_VERSION = 1;
const MAGIC = [0x53, 0x44, 0x42, 0x31]; // "SDB1"
const TERMINAL = new Set(["result", "error", "cancelled"]);
const JOB_EVENTS = new Set(["queued", "started", "progress", "result", "error", "cancelled"]);
const CLOSE_FATAL = new Set([4000, 4001, 4002, 4005]);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

class BridgeError extends Error {
  constructor(code, message, details, retryable) {
    super(`${code}: ${message}`);
    this.code = code;
    this.details = details || {};
    this.retryable = !!retryable;
  }
  static from(data) {
    data = data || {};
    return new BridgeError(String(data.code || "error"), String(data.message || ""), data.details, data.retryable);
  }
}

function packBinary(header, payload) {
  const head = encoder.encode(JSON.stringify(header));
  const body = payload || new Uint8Array(0);
  const out = new Uint8Array(8 + head.length + body.length);
  out.set(MAGIC, 0);
  new DataView(out.buffer).setUint32(4, head.length, false);
  out.set(head, 8);
  out.set(body, 8 + head.length);
  return out;
}

function parseBinary(buffer) {
  const bytes = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer);
  if (bytes.length < 8 || MAGIC.some((b, i) => bytes[i] !== b)) throw new BridgeError("bad_frame", "bad binary frame");
  const length = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(4, false);
  if (8 + length > bytes.length) throw new BridgeError("bad_frame", "truncated binary header");
  const header = JSON.parse(decoder.decode(bytes.subarray(8, 8 + length)));
  return { header, payload: bytes.subarray(8 + length) };
}

function randomId(prefix) {
  let s = prefix;
  for (let i = 0; i < 16; i++) s += Math.floor(Math.random() * 16).toString(16);
  return s;
}

function isBytes(v) {
  return v instanceof Uint8Array || v instanceof ArrayBuffer;
}

function sniffMime(bytes) {
  if (bytes[0] === 0x89 && bytes[1] === 0x50) return "image/png";
  if (bytes[0] === 0xff && bytes[1] === 0xd8) return "image/jpeg";
  return "application/octet-stream";
}

class ClientJob {
  constructor(client, id) {
    this.client = client;
    this.id = id;
    this.history = [];
    this.latestPreview = null;
    this.state = "queued";
    this.onEvent = null; // (event) => void, also called for previews
    this._waiters = [];
  }
  get done() {
    return this.history.length > 0 && TERMINAL.has(this.history[this.history.length - 1].type);
  }
  _add(event) {
    if (this.done) return;
    if (event.type === "preview") this.latestPreview = event;
    else {
      this.history.push(event);
      this.state = { result: "done", error: "failed", cancelled: "cancelled", started: "running" }[event.type] || this.state;
    }
    if (this.onEvent) {
      try { this.onEvent(event); } catch (e) { /* a broken callback must not stop the client */ }
    }
    if (this.done) for (const w of this._waiters.splice(0)) w(this.history[this.history.length - 1]);
  }
  /** The terminal event (result, error or cancelled). */
  wait(timeoutMs) {
    if (this.done) return Promise.resolve(this.history[this.history.length - 1]);
    return new Promise((resolve, reject) => {
      const timer = timeoutMs ? setTimeout(() => reject(new BridgeError("timeout", `job ${this.id} did not end in time`)), timeoutMs) : null;
      this._waiters.push((event) => { if (timer) clearTimeout(timer); resolve(event); });
    });
  }
  /** { images: [{index, data (PNG Uint8Array), seed, infotext, width, height}], data } or throws BridgeError. */
  async result(timeoutMs) {
    const event = await this.wait(timeoutMs);
    if (event.type === "result") return { images: event.images, data: event.data };
    if (event.type === "cancelled") throw new BridgeError("cancelled", `job ${this.id} was cancelled`, event.data);
    throw BridgeError.from(event.data);
  }
  cancel() {
    return this.client.cancel(this.id);
  }
}

class BridgeClient {
  constructor(options) {
    const o = options || {};
    this.url = o.url || "ws://127.0.0.1:7862";
    this.token = o.token || null;
    this.clientName = o.clientName || "sdcore-js";
    this.clientVersion = o.clientVersion || "0.1.0";
    this.previews = o.previews ? { enabled: true, interval_ms: o.previewIntervalMs || 250, max_size: o.previewMaxSize || 256 } : false;
    this.reconnect = o.reconnect !== false;
    this.maxRetryDelayMs = o.maxRetryDelayMs || 5000;
    this.requestTimeoutMs = o.requestTimeoutMs || 120000;
    this.pingIntervalMs = o.pingIntervalMs === undefined ? 10000 : o.pingIntervalMs;
    this.protocolVersions = o.protocolVersions || [PROTOCOL_VERSION];
    this.WebSocket = o.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new Error("no WebSocket implementation: pass options.WebSocket");
    this.session = o.session || null;
    this.lastSeq = o.lastSeq || 0;
    this.welcome = null;
    this.jobs = new Map();
    this.reconnects = 0;
    this.duplicates = 0;
    this.onStatus = o.onStatus || null; // (text) => void: "connected", "reconnecting", "closed: reason"
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._blobs = new Map();
    this._closing = false;
    this._pingTimer = null;
  }

  get limits() {
    return (this.welcome && this.welcome.limits) || { chunk_size: 1 << 20, max_binary_frame: (4 << 20) + 65544 };
  }

  get connected() {
    return !!this._ws && this._ws.readyState === 1 && !!this.welcome;
  }

  _status(text) {
    if (this.onStatus) try { this.onStatus(text); } catch (e) { /* ignore */ }
  }

  /** Open the socket and do the handshake; resolves with the welcome data. */
  connect() {
    this._closing = false;
    return this._open().then((welcome) => {
      if (this.pingIntervalMs && !this._pingTimer) {
        this._pingTimer = setInterval(() => {
          if (this.connected) this._sendJson({ v: 1, type: "ping", data: { t: Date.now() / 1000, ack: this.lastSeq } });
        }, this.pingIntervalMs);
      }
      return welcome;
    });
  }

  _open() {
    return new Promise((resolve, reject) => {
      let settled = false;
      let ws;
      try {
        ws = new this.WebSocket(this.url);
      } catch (e) {
        reject(new BridgeError("connect_failed", String(e), {}, true));
        return;
      }
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        const hello = { protocol: this.protocolVersions, client: this.clientName, client_version: this.clientVersion,
                        token: this.token, previews: this.previews };
        if (this.session) { hello.session = this.session; hello.last_seq = this.lastSeq; }
        ws.send(JSON.stringify({ v: 1, type: "hello", data: hello }));
      };
      ws.onmessage = (ev) => {
        if (!settled) {
          settled = true;
          let msg = {};
          try { msg = JSON.parse(typeof ev.data === "string" ? ev.data : ""); } catch (e) { /* below */ }
          if (msg.type !== "welcome") {
            ws.close();
            reject(msg.type === "error" ? BridgeError.from(msg.data) : new BridgeError("bad_frame", "no welcome"));
            return;
          }
          if (this.session && !msg.data.resumed) this._sessionLost(msg.data.reason || "session not resumed");
          this.session = msg.data.session;
          this.welcome = msg.data;
          this._ws = ws;
          this._status("connected");
          resolve(msg.data);
          return;
        }
        try { this._onMessage(ev.data); } catch (e) { /* a bad frame from the server is ignored */ }
      };
      ws.onerror = () => {
        if (!settled) { settled = true; reject(new BridgeError("connect_failed", `cannot connect to ${this.url}`, {}, true)); }
      };
      ws.onclose = (ev) => {
        if (!settled) {
          settled = true;
          reject(new BridgeError("connect_failed", `closed during the handshake (${ev.code})`, {}, true));
          return;
        }
        if (this._ws !== ws) return;
        this._ws = null;
        if (this._closing) return;
        if (!this.reconnect || CLOSE_FATAL.has(ev.code)) {
          this._sessionLost(`connection closed (${ev.code})`);
          this._status(`closed: ${ev.code}`);
          return;
        }
        this._status("reconnecting");
        this._reconnectLoop();
      };
    });
  }

  async _reconnectLoop() {
    for (let attempt = 0; attempt < 50 && !this._closing; attempt++) {
      const delay = Math.min(this.maxRetryDelayMs, 50 * 2 ** attempt) * (0.5 + Math.random());
      await new Promise((r) => setTimeout(r, delay));
      try {
        await this._open();
        this.reconnects += 1;
        return;
      } catch (e) {
        if (["unauthorized", "incompatible_protocol"].includes(e.code)) break;
      }
    }
    this._sessionLost("could not reconnect");
    this._status("closed: could not reconnect");
  }

  _sessionLost(reason) {
    this.lastSeq = 0;
    this._blobs.clear();
    for (const job of this.jobs.values()) {
      if (!job.done) job._add({ type: "error", job: job.id, data: { code: "session_lost", message: reason } });
    }
    for (const [, p] of this._pending) p.reject(new BridgeError("session_lost", reason, {}, true));
    this._pending.clear();
  }

  /** Close the socket; with bye the server also ends the session (its queued jobs are cancelled). */
  async close(bye) {
    if (bye && this.connected) {
      try { await this.request("bye", {}, 5000); } catch (e) { /* closing anyway */ }
    }
    this._closing = true;
    if (this._pingTimer) clearInterval(this._pingTimer);
    this._pingTimer = null;
    if (this._ws) this._ws.close(1000);
    this._ws = null;
  }

  /** Tests: drop the connection as a network failure would; the client resumes if reconnect is on. */
  dropConnection() {
    if (this._ws) this._ws.close(4100, "test drop");
  }

  _fresh(seq) {
    if (typeof seq !== "number") return true;
    if (seq <= this.lastSeq) { this.duplicates += 1; return false; }
    this.lastSeq = seq;
    return true;
  }

  _job(id, create) {
    if (typeof id !== "string") return null;
    let job = this.jobs.get(id);
    if (!job && create) { job = new ClientJob(this, id); this.jobs.set(id, job); }
    return job || null;
  }

  _onMessage(raw) {
    if (typeof raw !== "string") {
      const { header, payload } = parseBinary(raw);
      if (!this._fresh(header.seq)) return;
      if (header.type === "preview") {
        const job = this._job(header.job);
        if (job) job._add({ type: "preview", job: job.id, data: header, preview: payload.slice() });
      } else if (header.type === "blob") {
        if (header.part === 0) this._blobs.set(header.blob, { header, parts: [] });
        const entry = this._blobs.get(header.blob);
        if (entry) entry.parts.push(payload.slice());
      }
      return;
    }
    const msg = JSON.parse(raw);
    if (!this._fresh(msg.seq)) return;
    const { type, data, id, job: jobId } = msg;
    if ((type === "reply" || type === "error" || type === "pong") && id !== undefined && this._pending.has(id)) {
      const p = this._pending.get(id);
      this._pending.delete(id);
      if (type === "error") p.reject(BridgeError.from(data));
      else p.resolve(data);
      return;
    }
    if (type === "ping") {
      this._sendJson({ v: 1, type: "pong", data: { t: data.t, ack: this.lastSeq } });
      return;
    }
    if (JOB_EVENTS.has(type) && typeof jobId === "string") {
      const job = this._job(jobId, true);
      const event = { type, job: jobId, seq: msg.seq, data };
      if (type === "result") {
        event.images = (data.images || []).map((img) => {
          const entry = this._blobs.get(img.blob);
          this._blobs.delete(img.blob);
          let bytes = null;
          if (entry) {
            bytes = new Uint8Array(entry.header.size);
            let offset = 0;
            for (const part of entry.parts) { bytes.set(part, offset); offset += part.length; }
          }
          return { index: img.index, data: bytes, seed: img.seed, infotext: img.infotext, width: img.width, height: img.height, mime: img.mime };
        });
      }
      job._add(event);
      if (TERMINAL.has(type)) this._sendJson({ v: 1, type: "ack", data: { seq: this.lastSeq } });
    }
  }

  _sendJson(message) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(message));
  }

  /** One request; resolves with the reply's data, rejects with a BridgeError. */
  request(method, data, timeoutMs) {
    const id = `j${this._nextId++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new BridgeError("timeout", `no reply to ${method}`, {}, true));
      }, timeoutMs || this.requestTimeoutMs);
      this._pending.set(id, {
        resolve: (v) => { clearTimeout(timer); resolve(v); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      if (!this.connected) {
        this._pending.delete(id);
        clearTimeout(timer);
        reject(new BridgeError("not_connected", "the client is not connected", {}, true));
        return;
      }
      this._ws.send(JSON.stringify({ v: 1, type: method, id, data: data || {} }));
    });
  }

  /** Send bytes as a blob in binary chunks; returns the blob id to use as {blob: id} in a request. */
  upload(bytes, mime) {
    const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
    const blob = randomId("b");
    const chunk = Math.min(this.limits.chunk_size, this.limits.max_binary_frame - 4096);
    const parts = Math.max(1, Math.ceil(data.length / chunk));
    for (let part = 0; part < parts; part++) {
      const header = { type: "blob", blob, part, parts, size: data.length, mime: mime || sniffMime(data) };
      this._ws.send(packBinary(header, data.subarray(part * chunk, (part + 1) * chunk)));
    }
    return blob;
  }

  _uploadImages(value) {
    if (isBytes(value)) return { blob: this.upload(value) };
    if (Array.isArray(value)) return value.map((v) => this._uploadImages(v));
    if (value && typeof value === "object") {
      const out = {};
      for (const [k, v] of Object.entries(value)) out[k] = this._uploadImages(v);
      return out;
    }
    return value;
  }

  /** Queue a GenerationRequest; byte values (PNG Uint8Array) in it or in `images` are uploaded as blobs. */
  async submit(request, images) {
    const body = this._uploadImages(Object.assign({}, request, images || {}));
    const reply = await this.request("submit", { request: body });
    return this._job(reply.job, true);
  }

  async replace(jobId, request, images, cancelRunning) {
    const body = this._uploadImages(Object.assign({}, request, images || {}));
    const reply = await this.request("replace", { job: jobId, request: body, cancel_running: !!cancelRunning });
    return this._job(reply.job, true);
  }

  cancel(jobId) { return this.request("cancel", { job: jobId }); }
  async listModels() { return (await this.request("list_models")).items; }
  async listSamplers() { return (await this.request("list_samplers")).items; }
  async listLoras() { return (await this.request("list_loras")).items; }
  async listEmbeddings() { return (await this.request("list_embeddings")).items; }
  async getSchema() { return (await this.request("get_schema")).schema; }
}

module.exports = { BridgeClient, BridgeError, ClientJob, packBinary, parseBinary, PROTOCOL_VERSION };
