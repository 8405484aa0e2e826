// Helpers for chatd's WebSocket tests: a chatd per test, TCP line clients,
// `ws` clients, and a hand-made WebSocket client for bytes `ws` would never
// send. Every wait has a timeout; nothing sleeps a fixed time to let
// something happen.

import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CHATD_BIN = process.env.CHATD_BIN || path.join(REPO, 'target/debug/chatd');
/** How long any single wait may take before the test fails. */
export const WAIT_MS = 5000;

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Rejects with `what` if `promise` has not settled within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Calls `check` every 20 ms until it returns a truthy value (returned), for up to `ms`. */
export async function pollUntil(check, what, ms = WAIT_MS) {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms: ${what}`);
    await delay(20);
  }
}

/** A FIFO that readers await; `end()` makes reads past the last item return null. */
export class Queue {
  constructor(what) {
    this.what = what;
    this.items = [];
    this.waiters = [];
    this.ended = false;
  }
  push(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter(item);
    else this.items.push(item);
  }
  end() {
    this.ended = true;
    for (const waiter of this.waiters.splice(0)) waiter(null);
  }
  next(ms = WAIT_MS) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    if (this.ended) return Promise.resolve(null);
    let waiter;
    const got = new Promise((resolve) => {
      waiter = resolve;
      this.waiters.push(resolve);
    });
    return withTimeout(got, ms, `next ${this.what}`).catch((e) => {
      this.waiters = this.waiters.filter((w) => w !== waiter);
      throw e;
    });
  }
}

// ---------------------------------------------------------------- chatd

const running = new Set();
process.on('exit', () => {
  for (const server of running) server.killAll();
});

/** A chatd child process with both listeners on ephemeral ports. */
export class Chatd {
  /** Starts `chatd --addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 ARGS` and waits for both addresses. */
  static async start(args = [], { ws = true } = {}) {
    const env = {};
    for (const [key, value] of Object.entries(process.env)) {
      if (!key.startsWith('CHATD_') && key !== 'RUST_LOG') env[key] = value;
    }
    const argv = ['--addr', '127.0.0.1:0', ...(ws ? ['--ws-addr', '127.0.0.1:0'] : []), ...args];
    const server = new Chatd(spawn(CHATD_BIN, argv, { env, stdio: ['ignore', 'ignore', 'pipe'] }));
    try {
      server.tcp = (await server.waitLog(/chatd listening on (\S+) /, 1, 10000))[1];
      if (ws) server.ws = (await server.waitLog(/websocket on ws:\/\/([0-9.]+:[0-9]+)\//, 1, 10000))[1];
    } catch (e) {
      server.killAll();
      throw e;
    }
    return server;
  }

  constructor(child) {
    this.child = child;
    this.stderr = '';
    this.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    this.exitStatus = null;
    this.exited.then((status) => (this.exitStatus = status));
    child.on('error', (e) => (this.stderr += `spawn error: ${e.message}\n`));
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => (this.stderr += chunk));
    running.add(this);
  }

  log() {
    return this.stderr;
  }

  /** Waits for the `count`-th stderr line matching `re`; returns its match. */
  async waitLog(re, count = 1, ms = WAIT_MS) {
    const global = new RegExp(re.source, re.flags.includes('g') ? re.flags : re.flags + 'g');
    return pollUntil(
      () => {
        const hits = [...this.stderr.matchAll(global)];
        if (hits.length >= count) return hits[count - 1];
        if (this.exitStatus) throw new Error(`chatd exited (${JSON.stringify(this.exitStatus)}) before logging ${re}; log:\n${this.stderr}`);
        return null;
      },
      `chatd log line ${re} (x${count}); log:\n${this.stderr}`,
      ms,
    );
  }

  /** The pid serving now: the child, or the process the last live upgrade handed over to. */
  pid() {
    const upgrades = [...this.stderr.matchAll(/upgrade complete: pid (\d+)/g)];
    return upgrades.length ? Number(upgrades.at(-1)[1]) : this.child.pid;
  }

  signal(sig) {
    process.kill(this.pid(), sig);
  }

  /** Waits for the child to exit; returns {code, signal}. */
  waitExit(ms = WAIT_MS) {
    return withTimeout(this.exited, ms, 'chatd to exit');
  }

  /** SIGKILLs the child and every chatd a live upgrade started. */
  killAll() {
    running.delete(this);
    const pids = new Set([this.child.pid]);
    for (const m of this.stderr.matchAll(/(?:upgrade complete: pid| to pid) (\d+)/g)) pids.add(Number(m[1]));
    for (const pid of pids) {
      if (pid !== this.child.pid) {
        // Only a chatd: a pid that ended long ago may name another process now.
        let cmdline = '';
        try {
          cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        } catch {
          continue;
        }
        if (!cmdline.includes('chatd')) continue;
      } else if (this.exitStatus) {
        continue;
      }
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }

  /** For an `after` hook: kills everything and waits for the child to be reaped. */
  async stop() {
    this.killAll();
    await withTimeout(this.exited, WAIT_MS, 'chatd to die').catch(() => {});
  }
}

/** Starts a chatd whose processes are killed when the test `t` ends, pass or fail. */
export async function chatd(t, args = [], opts = {}) {
  const server = await Chatd.start(args, opts);
  t.after(() => server.stop());
  return server;
}

function hostPort(addr) {
  const i = addr.lastIndexOf(':');
  return { host: addr.slice(0, i), port: Number(addr.slice(i + 1)) };
}

/** Opens a TCP connection to `addr` ("host:port"). */
export function connectSocket(addr) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(hostPort(addr));
    socket.once('connect', () => {
      socket.off('error', reject);
      resolve(socket);
    });
    socket.once('error', reject);
  });
}

// ---------------------------------------------------------------- TCP line client

let syncs = 0;

/** A client of the line protocol: every line received goes to a queue (null at EOF). */
export class TcpClient {
  static async connect(addr) {
    return new TcpClient(await connectSocket(addr));
  }

  static async login(addr, name) {
    const client = await TcpClient.connect(addr);
    client.send(`${name}\n`);
    await client.sync(name);
    return client;
  }

  constructor(socket) {
    this.socket = socket;
    this.lines = new Queue('TCP line');
    this.errors = [];
    let pending = Buffer.alloc(0);
    socket.on('data', (chunk) => {
      pending = Buffer.concat([pending, chunk]);
      let nl;
      while ((nl = pending.indexOf(10)) >= 0) {
        this.lines.push(pending.subarray(0, nl).toString('utf8'));
        pending = pending.subarray(nl + 1);
      }
    });
    socket.on('error', (e) => this.errors.push(e));
    socket.on('close', () => {
      if (pending.length) this.lines.push({ cut: pending.toString('utf8') });
      this.lines.end();
    });
  }

  send(text) {
    this.socket.write(text);
  }

  next(ms) {
    return this.lines.next(ms);
  }

  async expect(line, ms) {
    const got = await this.next(ms);
    if (got !== line) throw new Error(`TCP client expected ${JSON.stringify(line)}, got ${JSON.stringify(got)}`);
  }

  async expectEof(ms) {
    const got = await this.next(ms);
    if (got !== null) throw new Error(`TCP client expected EOF, got ${JSON.stringify(got)}`);
  }

  /** Sends a message to itself and waits for it: everything before it has been handled. */
  async sync(name) {
    const token = `sync-${++syncs}`;
    this.send(`${name}: ${token}\n`);
    await this.expect(`from ${name}: ${token}`);
  }

  close() {
    this.socket.destroy();
  }
}

// ---------------------------------------------------------------- ws client

/** A `ws` client: text messages go to a queue as strings, binary ones as {binary: Buffer}. */
export class WsClient {
  static async connect(addr, options = {}) {
    const ws = new WebSocket(`ws://${addr}/`, options);
    const client = new WsClient(ws);
    await withTimeout(
      new Promise((resolve, reject) => {
        ws.once('open', resolve);
        ws.once('error', reject);
        ws.once('unexpected-response', (_, res) => reject(new Error(`HTTP ${res.statusCode}`)));
      }),
      WAIT_MS,
      'WebSocket open',
    );
    return client;
  }

  static async login(addr, name) {
    const client = await WsClient.connect(addr);
    client.send(name);
    await client.sync(name);
    return client;
  }

  constructor(ws) {
    this.ws = ws;
    this.messages = new Queue('WebSocket message');
    this.errors = [];
    ws.on('message', (data, isBinary) => this.messages.push(isBinary ? { binary: data } : data.toString('utf8')));
    ws.on('error', (e) => this.errors.push(e));
    this.closed = new Promise((resolve) =>
      ws.on('close', (code, reason) => {
        this.messages.end();
        resolve({ code, reason: reason.toString('utf8') });
      }),
    );
  }

  send(data, options) {
    this.ws.send(data, options);
  }

  next(ms) {
    return this.messages.next(ms);
  }

  async expect(text, ms) {
    const got = await this.next(ms);
    if (got !== text) throw new Error(`ws client expected ${JSON.stringify(text)}, got ${JSON.stringify(got)}`);
  }

  async sync(name) {
    const token = `sync-${++syncs}`;
    this.send(`${name}: ${token}`);
    await this.expect(`from ${name}: ${token}`);
  }

  /** Waits for the close; returns {code, reason}. */
  waitClose(ms = WAIT_MS) {
    return withTimeout(this.closed, ms, 'WebSocket close');
  }

  terminate() {
    this.ws.terminate();
  }
}

// ---------------------------------------------------------------- hand-made WebSocket

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
export const OP = { CONT: 0, TEXT: 1, BINARY: 2, CLOSE: 8, PING: 9, PONG: 10 };

/**
 * One frame's bytes. `mask` false sends it unmasked; `len` overrides the
 * length field (for lies about the length).
 */
export function frame(opcode, payload = Buffer.alloc(0), { fin = true, rsv = 0, mask = true, len } = {}) {
  payload = Buffer.from(payload);
  const length = len ?? BigInt(payload.length);
  const big = BigInt(length);
  let head;
  if (big < 126n) {
    head = Buffer.from([0, Number(big)]);
  } else if (big < 65536n) {
    head = Buffer.alloc(4);
    head[1] = 126;
    head.writeUInt16BE(Number(big), 2);
  } else {
    head = Buffer.alloc(10);
    head[1] = 127;
    head.writeBigUInt64BE(big, 2);
  }
  head[0] = (fin ? 0x80 : 0) | (rsv << 4) | opcode;
  if (!mask) return Buffer.concat([head, payload]);
  head[1] |= 0x80;
  const key = randomBytes(4);
  const body = Buffer.from(payload);
  for (let i = 0; i < body.length; i++) body[i] ^= key[i % 4];
  return Buffer.concat([head, key, body]);
}

/** A close frame's payload: the code, then the reason. */
export function closePayload(code, reason = '') {
  const buf = Buffer.alloc(2);
  buf.writeUInt16BE(code);
  return Buffer.concat([buf, Buffer.from(reason)]);
}

/**
 * A WebSocket client over a plain socket, for frames `ws` refuses to send.
 * Frames received go to `frames` ({fin, rsv, opcode, masked, payload}, and
 * for a close {code, reason}); null at EOF.
 */
export class RawWs {
  static async connect(addr, { path = '/', extraHeaders = '' } = {}) {
    const socket = await connectSocket(addr);
    const key = randomBytes(16).toString('base64');
    socket.write(
      `GET ${path} HTTP/1.1\r\nHost: ${addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n${extraHeaders}\r\n`,
    );
    const raw = new RawWs(socket);
    const response = await withTimeout(raw.head, WAIT_MS, 'handshake response');
    raw.response = response;
    if (!/^HTTP\/1\.1 101 /.test(response.status)) throw new Error(`handshake refused: ${response.status}`);
    const accept = createHash('sha1').update(key + GUID).digest('base64');
    if (response.headers['sec-websocket-accept'] !== accept) {
      throw new Error(`bad Sec-WebSocket-Accept ${response.headers['sec-websocket-accept']}, want ${accept}`);
    }
    return raw;
  }

  constructor(socket) {
    this.socket = socket;
    this.frames = new Queue('frame');
    this.errors = [];
    this.ended = new Promise((resolve) => socket.once('end', resolve));
    this.closed = new Promise((resolve) => socket.once('close', resolve));
    let gotHead;
    this.head = new Promise((resolve) => (gotHead = resolve));
    let buf = Buffer.alloc(0);
    let inHead = true;
    socket.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      if (inHead) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        gotHead(parseHead(buf.subarray(0, end).toString('latin1')));
        inHead = false;
        buf = buf.subarray(end + 4);
      }
      for (;;) {
        const parsed = parseFrame(buf);
        if (!parsed) break;
        this.frames.push(parsed.frame);
        buf = buf.subarray(parsed.size);
      }
    });
    socket.on('error', (e) => this.errors.push(e));
    socket.on('close', () => this.frames.end());
  }

  write(bytes) {
    this.socket.write(bytes);
  }

  send(opcode, payload, options) {
    this.write(frame(opcode, payload, options));
  }

  text(s, options) {
    this.send(OP.TEXT, Buffer.from(s), options);
  }

  next(ms) {
    return this.frames.next(ms);
  }

  async expectText(text, ms) {
    const got = await this.next(ms);
    if (!got || got.opcode !== OP.TEXT || got.payload.toString() !== text) {
      throw new Error(`raw client expected text ${JSON.stringify(text)}, got ${describe(got)}`);
    }
  }

  /** Expects a close frame with `code`, then EOF (the server's FIN). Returns the close frame. */
  async expectClose(code, ms) {
    const got = await this.next(ms);
    if (!got || got.opcode !== OP.CLOSE || got.code !== code) {
      throw new Error(`raw client expected close ${code}, got ${describe(got)}`);
    }
    await withTimeout(this.ended, ms ?? WAIT_MS, 'EOF after the close frame');
    return got;
  }

  destroy() {
    this.socket.destroy();
  }
}

export function describe(f) {
  if (f === null) return 'EOF';
  if (!f || f.opcode === undefined) return JSON.stringify(f);
  const base = `opcode ${f.opcode} fin ${f.fin} rsv ${f.rsv} masked ${f.masked}`;
  if (f.opcode === OP.CLOSE) return `close ${f.code} ${JSON.stringify(f.reason)} (${base})`;
  return `${base} payload ${JSON.stringify(f.payload.toString())}`;
}

function parseHead(text) {
  const [status, ...lines] = text.split('\r\n');
  const headers = {};
  for (const line of lines) {
    const i = line.indexOf(':');
    if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  return { status, headers };
}

function parseFrame(buf) {
  if (buf.length < 2) return null;
  const masked = (buf[1] & 0x80) !== 0;
  let len = buf[1] & 0x7f;
  let at = 2;
  if (len === 126) {
    if (buf.length < 4) return null;
    len = buf.readUInt16BE(2);
    at = 4;
  } else if (len === 127) {
    if (buf.length < 10) return null;
    len = Number(buf.readBigUInt64BE(2));
    at = 10;
  }
  let key = null;
  if (masked) {
    if (buf.length < at + 4) return null;
    key = buf.subarray(at, at + 4);
    at += 4;
  }
  if (buf.length < at + len) return null;
  const payload = Buffer.from(buf.subarray(at, at + len));
  if (key) for (let i = 0; i < payload.length; i++) payload[i] ^= key[i % 4];
  const f = { fin: (buf[0] & 0x80) !== 0, rsv: (buf[0] >> 4) & 7, opcode: buf[0] & 0x0f, masked, payload };
  if (f.opcode === OP.CLOSE) {
    f.code = payload.length >= 2 ? payload.readUInt16BE(0) : null;
    f.reason = payload.subarray(2).toString('utf8');
  }
  return { frame: f, size: at + len };
}

// ---------------------------------------------------------------- HTTP

/**
 * Sends `request` as is on a new socket and reads the response: status
 * line, headers (lower-case names) and the body (Content-Length bytes, or
 * up to EOF). `closed` tells whether the server closed the socket.
 */
export async function httpRaw(addr, request, ms = WAIT_MS) {
  const socket = await connectSocket(addr);
  socket.write(request);
  let buf = Buffer.alloc(0);
  let done;
  const finished = new Promise((resolve) => (done = resolve));
  socket.on('data', (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    const end = buf.indexOf('\r\n\r\n');
    if (end < 0) return;
    const head = parseHead(buf.subarray(0, end).toString('latin1'));
    const length = head.headers['content-length'];
    if (length !== undefined && buf.length >= end + 4 + Number(length)) done();
  });
  socket.on('error', () => done());
  socket.on('close', () => done());
  try {
    await withTimeout(finished, ms, `HTTP response to ${JSON.stringify(request.split('\r\n')[0])}`);
  } finally {
    socket.destroy();
  }
  const end = buf.indexOf('\r\n\r\n');
  if (end < 0) return { status: null, headers: {}, body: buf.toString('utf8'), raw: buf };
  const head = parseHead(buf.subarray(0, end).toString('latin1'));
  return { ...head, body: buf.subarray(end + 4).toString('utf8'), raw: buf };
}
