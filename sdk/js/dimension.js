'use strict';
// Client of the dimension-agent events socket (ARCHITECTURE.md §3.3).
//
// Each event is one frame: a 4-byte little-endian length (1..262144) and
// a UTF-8 JSON document {"kind","contentType","body","attrs"}. One
// connection is opened lazily and reused; frames are written in call order.
// Outside dimension (no DIMENSION_EVENTS_SOCK) nothing is sent and send()
// resolves to false, so a bundle still runs on its own.

const fs = require('node:fs');
const net = require('node:net');

const ENV_EVENTS_SOCK = 'DIMENSION_EVENTS_SOCK';
const MAX_FRAME = 262144;

/** Encodes one frame; throws TypeError/RangeError on bad input. */
function encodeFrame(kind, body, attrs, contentType) {
  if (body === undefined) throw new TypeError('an event needs a body');
  if (kind !== undefined && kind !== null && typeof kind !== 'string') throw new TypeError('kind must be a string');
  const ev = { body: Buffer.isBuffer(body) ? body.toString('utf8') : body };
  if (kind) ev.kind = kind;
  if (contentType) ev.contentType = contentType;
  if (attrs && Object.keys(attrs).length > 0) {
    ev.attrs = {};
    for (const [k, v] of Object.entries(attrs)) ev.attrs[k] = String(v);
  }
  const doc = Buffer.from(JSON.stringify(ev), 'utf8');
  if (doc.length > MAX_FRAME) {
    throw new RangeError(`event encodes to ${doc.length} bytes, over the ${MAX_FRAME}-byte frame limit`);
  }
  const frame = Buffer.allocUnsafe(4 + doc.length);
  frame.writeUInt32LE(doc.length, 0);
  doc.copy(frame, 4);
  return frame;
}

/** A client of one events socket. */
class Client {
  constructor(path) {
    this.path = path || '';
    this.socket = null;
    this.failed = false;
    this.pending = 0;
  }

  connect() {
    if (this.socket && !this.socket.destroyed) return this.socket;
    const s = net.createConnection(this.path);
    s.on('error', () => { this.failed = true; });
    s.on('close', () => { if (this.socket === s) this.socket = null; });
    // The socket must not keep the process alive once every event is out.
    s.unref();
    this.failed = false;
    this.socket = s;
    return s;
  }

  /**
   * Sends one event. Resolves to true once the frame is handed to the
   * socket, false when there is no agent to send to.
   */
  send(kind, body, attrs, contentType) {
    const frame = encodeFrame(kind, body, attrs, contentType);
    if (!this.path) return Promise.resolve(false);
    return new Promise((resolve) => {
      const s = this.connect();
      this.pending++;
      s.ref();
      s.write(frame, (err) => {
        if (--this.pending === 0) s.unref();
        resolve(!err);
      });
    });
  }

  /** Sends body as an event of the default kind ("bundle"). */
  sendMessage(body) {
    return this.send(undefined, body);
  }

  /**
   * Reports whether an agent is there: the socket is configured, exists,
   * and no connection to it has failed.
   */
  isConnected() {
    if (!this.path || this.failed) return false;
    try {
      return fs.statSync(this.path).isSocket();
    } catch {
      return false;
    }
  }

  /** Ends the connection after pending frames; a later send reconnects. */
  close() {
    if (this.socket) this.socket.end();
    this.socket = null;
  }
}

let shared = null;
function defaultClient() {
  if (!shared) shared = new Client(process.env[ENV_EVENTS_SOCK]);
  return shared;
}

module.exports = {
  ENV_EVENTS_SOCK,
  MAX_FRAME,
  Client,
  encodeFrame,
  send: (kind, body, attrs) => defaultClient().send(kind, body, attrs),
  sendMessage: (body) => defaultClient().sendMessage(body),
  isConnected: () => defaultClient().isConnected(),
};
