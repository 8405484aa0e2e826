// Error lines over WebSocket: each closing error is its `error: ...` text
// message, then a Close frame with the interface's code, then the server's
// FIN. Also ping/pong, the close handshake and slow consumers.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { chatd, pollUntil, withTimeout, TcpClient, WsClient, RawWs, OP, closePayload, describe } from './lib.mjs';

const T = { timeout: 30000 };

/** Expects exactly `line`, then a close with `code` and no other message. */
async function expectErrorClose(client, line, code) {
  await client.expect(line);
  const closed = await client.waitClose();
  assert.equal(closed.code, code, `close code after ${JSON.stringify(line)}`);
  assert.equal(await client.next(), null, 'nothing after the close');
}

test('invalid-name closes with 1008', T, async (t) => {
  const server = await chatd(t);
  for (const [name, why] of [
    ['a b', 'contains whitespace'],
    ['eve:', "contains ':'"],
  ]) {
    const c = await WsClient.connect(server.ws);
    c.send(name);
    await expectErrorClose(c, `error: invalid-name: ${why}`, 1008);
  }
  const long = await WsClient.connect(server.ws);
  long.send('n'.repeat(65));
  const line = await long.next();
  assert.match(line, /^error: invalid-name: /);
  assert.equal((await long.waitClose()).code, 1008);
});

test('name-taken closes with 1008', T, async (t) => {
  const server = await chatd(t);
  await WsClient.login(server.ws, 'alice');
  const mallory = await WsClient.connect(server.ws);
  mallory.send('alice');
  await expectErrorClose(mallory, 'error: name-taken: alice', 1008);
});

test('line-too-long closes with 1009 after its error line; earlier messages still count', T, async (t) => {
  const server = await chatd(t, ['--max-line', '32']);
  const bob = await TcpClient.login(server.tcp, 'bob');
  const carol = await WsClient.login(server.ws, 'carol');
  carol.send('bob: first');
  carol.send('bob: ' + 'x'.repeat(40));
  await bob.expect('from carol: first');
  await expectErrorClose(carol, 'error: line-too-long: max 32 bytes', 1009);
  // Exactly --max-line bytes is fine.
  const dave = await WsClient.login(server.ws, 'dave');
  const line = 'bob: ' + 'y'.repeat(27);
  assert.equal(Buffer.byteLength(line), 32);
  dave.send(line);
  await bob.expect('from dave: ' + 'y'.repeat(27));
  // One byte more is allowed for a final \r (removed as before a line end).
  dave.send(line + '\r');
  await bob.expect('from dave: ' + 'y'.repeat(27));
  // A long line split over fragments is caught too.
  dave.send('bob: ' + 'z'.repeat(20), { fin: false });
  dave.send('z'.repeat(20), { fin: true });
  await expectErrorClose(dave, 'error: line-too-long: max 32 bytes', 1009);
});

test('invalid UTF-8 closes with 1007 after error: invalid-utf8', T, async (t) => {
  const server = await chatd(t);
  const bob = await TcpClient.login(server.tcp, 'bob');
  const alice = await WsClient.login(server.ws, 'alice');
  // ws sends a Buffer as a text frame as it is, without checking it.
  alice.send(Buffer.from([...Buffer.from('bob: caf'), 0xe9]), { binary: false });
  await expectErrorClose(alice, 'error: invalid-utf8', 1007);
  // Over a raw socket too, in a login message, and nothing was routed.
  const raw = await RawWs.connect(server.ws);
  raw.send(OP.TEXT, Buffer.from([0x62, 0xff, 0x62]));
  await raw.expectText('error: invalid-utf8');
  await raw.expectClose(1007);
  bob.send('alice: gone?\n');
  await bob.expect('error: not-online: alice');
});

test('a binary message closes with 1003 and no error text', T, async (t) => {
  const server = await chatd(t);
  const bob = await TcpClient.login(server.tcp, 'bob');
  const alice = await WsClient.login(server.ws, 'alice');
  alice.send(Buffer.from('bob: binary'), { binary: true });
  const closed = await alice.waitClose();
  assert.equal(closed.code, 1003);
  assert.equal(await alice.next(), null, 'no text message before the 1003 close');
  bob.send('bob: check\n');
  await bob.expect('from bob: check'); // nothing from alice came first
});

test('login-timeout closes with 1008', T, async (t) => {
  const server = await chatd(t, ['--login-timeout', '1']);
  const started = Date.now();
  const c = await WsClient.connect(server.ws);
  await c.expect('error: login-timeout', 3000);
  assert.ok(Date.now() - started >= 900, `timed out after ${Date.now() - started} ms, before --login-timeout`);
  assert.equal((await c.waitClose()).code, 1008);
});

test('idle-timeout closes with 1008', T, async (t) => {
  const server = await chatd(t, ['--idle-timeout', '1']);
  const c = await WsClient.login(server.ws, 'idler');
  await expectErrorClose(c, 'error: idle-timeout', 1008);
});

test('pings count as input for --idle-timeout', T, async (t) => {
  const server = await chatd(t, ['--idle-timeout', '1']);
  const bob = await TcpClient.login(server.tcp, 'bob');
  const c = await WsClient.login(server.ws, 'pinger');
  // Ping every 200 ms for 2.5 s, over twice the idle timeout; bob keeps
  // himself alive with empty lines.
  const until = Date.now() + 2500;
  while (Date.now() < until) {
    c.ws.ping();
    bob.send('\n');
    await withTimeout(new Promise((resolve) => c.ws.once('pong', resolve)), 1000, 'pong');
    await withTimeout(new Promise((resolve) => setTimeout(resolve, 200)), 1000, 'pacing');
  }
  bob.send('pinger: still here\n');
  await c.expect('from bob: still here');
  // Once it stops, it is timed out.
  await expectErrorClose(c, 'error: idle-timeout', 1008);
});

test('a client that ends TCP without a Close still gets what is queued', T, async (t) => {
  const server = await chatd(t);
  const raw = await RawWs.connect(server.ws);
  raw.text('quitter');
  raw.text('quitter: one\nquitter: two');
  raw.socket.end(); // FIN, no Close frame
  await raw.expectText('from quitter: one');
  await raw.expectText('from quitter: two');
  for (;;) {
    // Maybe a Close frame; then EOF.
    const f = await raw.next();
    if (f === null) break;
    assert.equal(f.opcode, OP.CLOSE, describe(f));
  }
  const bob = await TcpClient.login(server.tcp, 'bob');
  bob.send('quitter: there?\n');
  await bob.expect('error: not-online: quitter');
});

test('server-full closes with 1013', T, async (t) => {
  const server = await chatd(t, ['--max-clients', '1']);
  const alice = await WsClient.login(server.ws, 'alice');
  const second = await WsClient.connect(server.ws);
  await expectErrorClose(second, 'error: server-full', 1013);
  // TCP and WebSocket clients count together.
  const tcp = await TcpClient.connect(server.tcp);
  await tcp.expect('error: server-full');
  await tcp.expectEof();
  alice.ws.close(1000);
  await alice.waitClose();
  const bob = await pollUntil(async () => {
    const c = await WsClient.connect(server.ws);
    c.send('bob');
    c.send('bob: in');
    const m = await c.next();
    if (m === 'from bob: in') return c;
    assert.equal(m, 'error: server-full');
    return null;
  }, 'a place once alice has gone');
  bob.ws.close();
});

test('SIGTERM: error: shutting-down, close 1001, exit 0', T, async (t) => {
  const server = await chatd(t);
  const alice = await WsClient.login(server.ws, 'alice');
  const fresh = await WsClient.connect(server.ws); // not logged in: told too
  const bob = await TcpClient.login(server.tcp, 'bob');
  server.signal('SIGTERM');
  await expectErrorClose(alice, 'error: shutting-down', 1001);
  await expectErrorClose(fresh, 'error: shutting-down', 1001);
  await bob.expect('error: shutting-down');
  await bob.expectEof();
  bob.close();
  assert.deepEqual(await server.waitExit(), { code: 0, signal: null });
});

test('ping is answered with a pong carrying the same payload', T, async (t) => {
  const server = await chatd(t);
  const c = await WsClient.connect(server.ws); // before login too
  const pongs = [];
  c.ws.on('pong', (data) => pongs.push(data.toString()));
  c.ws.ping('before-login');
  await pollUntil(() => pongs.length === 1, 'pong before login');
  c.send('alice');
  c.ws.ping('');
  c.ws.ping('x'.repeat(125));
  await pollUntil(() => pongs.length === 3, 'pongs after login');
  assert.deepEqual(pongs, ['before-login', '', 'x'.repeat(125)]);
  await c.sync('alice');
  // Raw: the pong is a single unmasked frame.
  const raw = await RawWs.connect(server.ws);
  raw.send(OP.PING, Buffer.from([0, 1, 2, 255]));
  const pong = await raw.next();
  assert.equal(pong.opcode, OP.PONG, describe(pong));
  assert.ok(pong.fin && !pong.masked && pong.rsv === 0, describe(pong));
  assert.deepEqual([...pong.payload], [0, 1, 2, 255]);
  raw.destroy();
});

test('a client close is answered with the same code, then the server sends FIN', T, async (t) => {
  const server = await chatd(t);
  const bob = await TcpClient.login(server.tcp, 'bob');
  const alice = await WsClient.login(server.ws, 'alice');
  alice.ws.close(3001, 'bye');
  assert.equal((await alice.waitClose()).code, 3001);
  // Raw, logged in, with a code and a reason: the same code comes back.
  const raw = await RawWs.connect(server.ws);
  raw.text('carol');
  raw.send(OP.CLOSE, closePayload(1000, 'done'));
  const reply = await raw.expectClose(1000);
  assert.ok(!reply.masked && reply.fin, describe(reply));
  raw.destroy();
  // An empty close is answered with 1000.
  const raw2 = await RawWs.connect(server.ws);
  raw2.text('dave');
  raw2.send(OP.CLOSE);
  await raw2.expectClose(1000);
  raw2.destroy();
  // Output queued before the close is sent before the close reply.
  const raw3 = await RawWs.connect(server.ws);
  raw3.text('erin');
  raw3.text('erin: one\nerin: two');
  raw3.send(OP.CLOSE, closePayload(1001));
  await raw3.expectText('from erin: one');
  await raw3.expectText('from erin: two');
  await raw3.expectClose(1001);
  raw3.destroy();
  // Names are freed.
  bob.send('alice, carol, dave, erin: anyone?\n');
  await bob.expect('error: not-online: alice, carol, dave, erin');
});

test('after an error the server closes: close frame, FIN, and it closes when the client does', T, async (t) => {
  const server = await chatd(t);
  const raw = await RawWs.connect(server.ws);
  raw.text('bad name');
  await raw.expectText('error: invalid-name: contains whitespace');
  const close = await raw.expectClose(1008);
  assert.ok(!close.masked, describe(close));
  // The client answers the close and closes; the server's side goes away.
  raw.send(OP.CLOSE, closePayload(1008));
  raw.socket.end();
  await withTimeout(raw.closed, 3000, 'socket closed');
  // A ws client sees a clean close (it got the close frame).
  const c = await WsClient.connect(server.ws);
  c.send('x y');
  await c.expect('error: invalid-name: contains whitespace');
  const closed = await c.waitClose();
  assert.equal(closed.code, 1008);
  assert.deepEqual(c.errors, []);
});

test('a ws client that stops reading is closed as a slow consumer', T, async (t) => {
  const server = await chatd(t, ['--max-line', '1000', '--max-outbound', '4096']);
  const slow = await WsClient.login(server.ws, 'slow');
  const flood = await TcpClient.login(server.tcp, 'flood');
  slow.ws.pause(); // stops reading its socket
  const line = 'x'.repeat(900);
  let sent = 0;
  let refused = false;
  // The flooder hears nothing until the slow client is gone and its name free.
  const first = flood.next(20000).finally(() => (refused = true));
  await pollUntil(
    async () => {
      if (refused) return true;
      for (let i = 0; i < 200; i++) flood.send(`slow: ${sent++} ${line}\n`);
      await new Promise((r) => setImmediate(r));
      return false;
    },
    'the slow client closed as a slow consumer',
    20000,
  );
  assert.equal(await first, 'error: not-online: slow');
  slow.ws.resume();
  // Every line queued before the close arrives whole and in order, then
  // the error, then the close.
  let n = 0;
  for (;;) {
    const m = await slow.next();
    assert.notEqual(m, null, `closed without error: slow-consumer after ${n} lines`);
    if (m === 'error: slow-consumer') break;
    assert.equal(m, `from flood: ${n} ${line}`);
    n++;
  }
  assert.ok(n < sent);
  assert.equal((await slow.waitClose()).code, 1008);
});
