// RFC 6455 framing errors over a hand-made socket (each a 1002 close with
// no error text), absurd lengths, and the HTTP side of the listener.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { chatd, withTimeout, httpRaw, connectSocket, REPO, TcpClient, RawWs, OP, frame, closePayload, describe } from './lib.mjs';

const T = { timeout: 30000 };

/** Expects a close with one of `codes` as the next frame, then EOF. */
async function expectCloseIn(raw, codes, what) {
  const got = await raw.next();
  assert.ok(got && got.opcode === OP.CLOSE && codes.includes(got.code), `${what}: expected close ${codes}, got ${describe(got)}`);
  assert.ok(!got.masked && got.fin, `${what}: ${describe(got)}`);
  await withTimeout(raw.ended, 3000, `${what}: EOF after the close`);
  return got;
}

const violations = [
  ['an unmasked client frame', () => frame(OP.TEXT, 'bob: x', { mask: false })],
  ['RSV1 set (no extension was agreed)', () => frame(OP.TEXT, 'bob: x', { rsv: 4 })],
  ['RSV2 set', () => frame(OP.TEXT, 'bob: x', { rsv: 2 })],
  ['RSV3 on a ping', () => frame(OP.PING, 'p', { rsv: 1 })],
  ['reserved data opcode 3', () => frame(3, 'bob: x')],
  ['reserved control opcode 0xB', () => frame(0xb, '')],
  ['a fragmented ping', () => frame(OP.PING, 'p', { fin: false })],
  ['a ping over 125 bytes', () => frame(OP.PING, 'p'.repeat(126))],
  ['a close over 125 bytes', () => frame(OP.CLOSE, Buffer.concat([Buffer.from([3, 232]), Buffer.alloc(124, 97)]))],
  ['a continuation without a start', () => frame(OP.CONT, 'bob: x')],
  ['a new text frame inside a fragmented message', () => Buffer.concat([frame(OP.TEXT, 'bob: a', { fin: false }), frame(OP.TEXT, 'bob: b')])],
  ['a binary frame inside a fragmented text message', () => Buffer.concat([frame(OP.TEXT, 'bob: a', { fin: false }), frame(OP.BINARY, 'b')])],
  ['a close with a 1-byte payload', () => frame(OP.CLOSE, Buffer.from([3]))],
  // Close codes no endpoint may send (RFC 6455 7.4).
  ...[999, 1004, 1005, 1006, 1015, 2999, 5000].map((code) => [`a close with code ${code}`, () => frame(OP.CLOSE, closePayload(code))]),
];

test('protocol violations close with 1002, no error text, nothing routed', T, async (t) => {
  const server = await chatd(t);
  const bob = await TcpClient.login(server.tcp, 'bob');
  let n = 0;
  for (const [what, bytes] of violations) {
    for (const loggedIn of [false, true]) {
      const raw = await RawWs.connect(server.ws);
      if (loggedIn) raw.text(`mallory${n++}`);
      raw.write(bytes());
      await expectCloseIn(raw, [1002], `${what}${loggedIn ? ' (logged in)' : ''}`);
      raw.destroy();
    }
  }
  bob.send('bob: nothing before this\n');
  await bob.expect('from bob: nothing before this');
});

/**
 * Expects the too-big close: `error: line-too-long` then 1009, like every
 * closing error but 1002/1003; or, where `allow1002`, a bare 1002.
 */
async function expectTooBig(raw, allow1002, what) {
  const got = await raw.next();
  if (allow1002 && got && got.opcode === OP.CLOSE && got.code === 1002) {
    // the RFC's own answer to a length with its top bit set
  } else {
    assert.ok(got && got.opcode === OP.TEXT && got.payload.toString() === 'error: line-too-long: max 16384 bytes', `${what}: expected the error line, got ${describe(got)}`);
    const close = await raw.next();
    assert.ok(close && close.opcode === OP.CLOSE && close.code === 1009, `${what}: after the error line, ${describe(close)}`);
  }
  await withTimeout(raw.ended, 3000, `${what}: EOF after the close`);
}

test('a 2^63-byte length field is refused at once; the server keeps serving', T, async (t) => {
  const server = await chatd(t);
  const bob = await TcpClient.login(server.tcp, 'bob');
  // The RFC forbids the top bit (1002); a legal but huge length is too big
  // for --max-line (1009). Either way at once, from the header alone.
  for (const len of [2n ** 63n, 2n ** 64n - 1n, 2n ** 63n - 1n, 2n ** 32n, 65536n]) {
    const raw = await RawWs.connect(server.ws);
    raw.text(`mallory${len}`);
    raw.write(frame(OP.TEXT, 'bob: x', { len }));
    await expectTooBig(raw, len >= 2n ** 63n, `length ${len}`);
    raw.destroy();
  }
  // The same on a continuation frame, whose message would pass --max-line.
  const cont = await RawWs.connect(server.ws);
  cont.text('carol');
  cont.write(Buffer.concat([frame(OP.TEXT, 'bob: x', { fin: false }), frame(OP.CONT, 'y', { len: 2n ** 63n - 1n })]));
  await expectTooBig(cont, false, 'a huge continuation');
  cont.destroy();
  // A 16-bit length over --max-line, sent in full, is refused too.
  const big = await RawWs.connect(server.ws);
  big.text('big');
  big.write(frame(OP.TEXT, 'bob: ' + 'x'.repeat(20000)));
  await expectTooBig(big, false, 'a 20005-byte line');
  big.destroy();
  bob.send('bob: alive\n');
  await bob.expect('from bob: alive');
  assert.equal(server.exitStatus, null);
});

test('GET / serves the web client page; other paths are 404', T, async (t) => {
  const server = await chatd(t);
  const page = readFileSync(path.join(REPO, 'src/ws/page.html'), 'utf8');
  const res = await httpRaw(server.ws, `GET / HTTP/1.1\r\nHost: ${server.ws}\r\n\r\n`);
  assert.match(res.status, /^HTTP\/1\.1 200 /);
  assert.match(res.headers['content-type'], /^text\/html/);
  assert.equal(res.body, page);
  const index = await httpRaw(server.ws, `GET /index.html HTTP/1.1\r\nHost: ${server.ws}\r\n\r\n`);
  assert.match(index.status, /^HTTP\/1\.1 200 /);
  assert.equal(index.body, page);
  const nope = await httpRaw(server.ws, `GET /nope HTTP/1.1\r\nHost: ${server.ws}\r\n\r\n`);
  assert.match(nope.status, /^HTTP\/1\.1 404 /);
  // Node's own HTTP client agrees.
  const viaFetch = await withTimeout(fetch(`http://${server.ws}/`), 5000, 'fetch /');
  assert.equal(viaFetch.status, 200);
  assert.equal(await viaFetch.text(), page);
});

test('bad upgrades: 400, and 426 with Sec-WebSocket-Version: 13 for another version', T, async (t) => {
  const server = await chatd(t);
  const host = `Host: ${server.ws}\r\n`;
  const key = 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n';
  const up = 'Upgrade: websocket\r\nConnection: Upgrade\r\n';
  const bad = {
    'no key': `GET / HTTP/1.1\r\n${host}${up}Sec-WebSocket-Version: 13\r\n\r\n`,
    'a key that is not 16 bytes': `GET / HTTP/1.1\r\n${host}${up}Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n`,
    'POST': `POST / HTTP/1.1\r\n${host}${up}${key}Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n`,
    'HTTP/1.0': `GET / HTTP/1.0\r\n${host}${up}${key}Sec-WebSocket-Version: 13\r\n\r\n`,
    'not HTTP': 'HELLO THERE\r\n\r\n',
  };
  for (const [what, request] of Object.entries(bad)) {
    const res = await httpRaw(server.ws, request);
    assert.match(String(res.status), /^HTTP\/1\.[01] 400 /, `${what}: ${res.status}`);
  }
  // No version at all: a bad request, or told which version to use.
  const none = await httpRaw(server.ws, `GET / HTTP/1.1\r\n${host}${up}${key}\r\n`);
  assert.match(none.status, /^HTTP\/1\.1 (400|426) /);
  if (/ 426 /.test(none.status)) assert.equal(none.headers['sec-websocket-version'], '13');
  const v8 = await httpRaw(server.ws, `GET / HTTP/1.1\r\n${host}${up}${key}Sec-WebSocket-Version: 8\r\n\r\n`);
  assert.match(v8.status, /^HTTP\/1\.1 426 /);
  assert.equal(v8.headers['sec-websocket-version'], '13');
  // The RFC's own example key is answered with its example accept value,
  // and permessage-deflate is declined (no extension header).
  const socket = await connectSocket(server.ws);
  let head = '';
  socket.setEncoding('latin1');
  socket.on('data', (d) => (head += d));
  socket.write(
    `GET /chat HTTP/1.1\r\n${host}${up}${key}Sec-WebSocket-Version: 13\r\n` +
      'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n',
  );
  await withTimeout(
    new Promise((resolve) => {
      const check = () => (head.includes('\r\n\r\n') ? resolve() : setTimeout(check, 10));
      check();
    }),
    5000,
    '101 response',
  );
  socket.destroy();
  assert.match(head, /^HTTP\/1\.1 101 /);
  assert.match(head, /\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK\+xOo=\r\n/i);
  assert.doesNotMatch(head, /Sec-WebSocket-Extensions/i);
});

test('an oversized or unfinished HTTP request is not kept', T, async (t) => {
  const server = await chatd(t, ['--login-timeout', '1']);
  // Past 8 KiB of request head: 400.
  const huge = await httpRaw(server.ws, `GET / HTTP/1.1\r\nHost: x\r\nX-Filler: ${'a'.repeat(9000)}\r\n\r\n`);
  assert.match(String(huge.status), /^HTTP\/1\.1 400 /);
  // Half a request: 408 once --login-timeout passes.
  const started = Date.now();
  const half = await httpRaw(server.ws, 'GET / HTTP/1.1\r\nHost: x\r\n', 4000);
  assert.ok(Date.now() - started >= 900, `closed after ${Date.now() - started} ms`);
  assert.match(String(half.status), /^HTTP\/1\.1 408 /);
  assert.equal(half.body.trim(), 'error: login-timeout');
  const bob = await TcpClient.login(server.tcp, 'bob');
  bob.close();
});
