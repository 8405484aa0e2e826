// Live upgrade (SIGUSR2, see tests/upgrade.rs): WebSocket connections are
// handed over with their state, a frame half received among it.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { chatd, httpRaw, pollUntil, TcpClient, WsClient, RawWs, OP, frame } from './lib.mjs';

/**
 * The receive queue (bytes not read yet) of the server's end of the
 * loopback connection from `clientPort` to `serverAddr`, from /proc/net/tcp.
 */
function receiveQueue(serverAddr, clientPort) {
  const serverPort = Number(serverAddr.split(':').at(-1));
  const hex = (port) => port.toString(16).toUpperCase().padStart(4, '0');
  for (const line of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 5) continue;
    if (f[1].endsWith(`:${hex(serverPort)}`) && f[2].endsWith(`:${hex(clientPort)}`)) {
      return parseInt(f[4].split(':')[1], 16);
    }
  }
  throw new Error(`no socket ${serverAddr} <- :${clientPort} in /proc/net/tcp`);
}

test('a frame half received before a live upgrade completes after it', { timeout: 30000 }, async (t) => {
  const server = await chatd(t);
  const oldPid = server.pid();
  const bob = await TcpClient.login(server.tcp, 'bob');
  const alice = await WsClient.login(server.ws, 'alice');
  // carol: half of the payload sent; dave: half of the header (the mask
  // key cut); erin: a fragmented message with its first fragment in.
  const carol = await RawWs.connect(server.ws);
  carol.text('carol');
  const carolFrame = frame(OP.TEXT, 'bob: across the upgrade');
  const dave = await RawWs.connect(server.ws);
  dave.text('dave');
  const daveFrame = frame(OP.TEXT, 'bob: header cut');
  const erin = await RawWs.connect(server.ws);
  erin.text('erin');
  erin.text('bob: first half, ', { fin: false });
  // Logged in, and erin's first fragment read, before the halves go out.
  carol.text('carol: in');
  dave.text('dave: in');
  erin.send(OP.PING, 'in');
  await carol.expectText('from carol: in');
  await dave.expectText('from dave: in');
  assert.equal((await erin.next()).opcode, OP.PONG);
  carol.write(carolFrame.subarray(0, 12));
  dave.write(daveFrame.subarray(0, 4));
  // The server has read the halves (they are its state now, not bytes
  // waiting in the kernel) once its sockets' receive queues are empty.
  for (const raw of [carol, dave]) {
    await pollUntil(() => receiveQueue(server.ws, raw.socket.localPort) === 0, 'the server read the half frame');
  }
  server.signal('SIGUSR2');
  const [, newPid] = await server.waitLog(/upgrade complete: pid (\d+)/, 1, 10000);
  assert.notEqual(Number(newPid), oldPid);
  carol.write(carolFrame.subarray(12));
  dave.write(daveFrame.subarray(4));
  erin.send(OP.CONT, 'second half', { fin: true });
  const got = new Set();
  for (let i = 0; i < 3; i++) got.add(await bob.next());
  assert.deepEqual(got, new Set(['from carol: across the upgrade', 'from dave: header cut', 'from erin: first half, second half']));
  // Everyone is still there, over both transports, in the new process.
  alice.send('bob: after');
  await bob.expect('from alice: after');
  bob.send('alice, carol: still here\n');
  await alice.expect('from bob: still here');
  await carol.expectText('from bob: still here');
  const taken = await WsClient.connect(server.ws);
  taken.send('alice');
  await taken.expect('error: name-taken: alice');
  // The new process serves the page and new WebSocket clients.
  const page = await httpRaw(server.ws, `GET / HTTP/1.1\r\nHost: ${server.ws}\r\n\r\n`);
  assert.match(page.status, /^HTTP\/1\.1 200 /);
  const fresh = await WsClient.login(server.ws, 'fresh');
  fresh.send('bob: new');
  await bob.expect('from fresh: new');
  assert.deepEqual(await server.waitExit(), { code: 0, signal: null });
});
