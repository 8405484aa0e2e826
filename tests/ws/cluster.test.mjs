// Cluster routing across transports: a WebSocket client on node A and a TCP
// client on node B share one name space through a redis-server of our own.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import net from 'node:net';
import { test } from 'node:test';
import { chatd, pollUntil, withTimeout, connectSocket, TcpClient, WsClient } from './lib.mjs';

const haveRedis = spawnSync('redis-server', ['--version'], { stdio: 'ignore' }).status === 0;
// As in the Rust suite: a developer without Redis is told the test is
// skipped; under CI (CI set), where it is installed, a missing one fails.
const skip = !haveRedis && !process.env.CI ? 'redis-server is not on PATH (apt-get install redis-server)' : false;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function ping(port) {
  try {
    const socket = await connectSocket(`127.0.0.1:${port}`);
    socket.write('PING\r\n');
    const reply = await withTimeout(new Promise((resolve) => socket.once('data', resolve)), 1000, 'PONG').finally(() => socket.destroy());
    return reply.toString().startsWith('+PONG');
  } catch {
    return false;
  }
}

/** A fresh redis-server on a free loopback port, killed when the test ends. */
async function startRedis(t) {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no'], {
    stdio: 'ignore',
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  t.after(async () => {
    child.kill('SIGKILL');
    await withTimeout(exited, 5000, 'redis-server to die').catch(() => {});
  });
  await pollUntil(() => ping(port), `redis-server on port ${port}`);
  return `redis://127.0.0.1:${port}`;
}

test('a ws client on node A and a TCP client on node B talk both ways', { skip, timeout: 60000 }, async (t) => {
  const redis = await startRedis(t);
  const a = await chatd(t, ['--cluster', redis]);
  const b = await chatd(t, ['--cluster', redis]);
  const alice = await WsClient.login(a.ws, 'alice');
  const bob = await TcpClient.login(b.tcp, 'bob');
  const carol = await WsClient.login(b.ws, 'carol');
  alice.send('bob: hi from A');
  await bob.expect('from alice: hi from A');
  bob.send('alice: hi from B\n');
  await alice.expect('from bob: hi from B');
  // ws on A to ws on B, several lines in one message, order kept.
  alice.send('carol: 1\ncarol: 2\nbob, carol: 3');
  await carol.expect('from alice: 1');
  await carol.expect('from alice: 2');
  await carol.expect('from alice: 3');
  await bob.expect('from alice: 3');
  // One name space: a name held on A is taken on B, over either transport.
  const again = await WsClient.connect(b.ws);
  again.send('alice');
  await again.expect('error: name-taken: alice');
  assert.equal((await again.waitClose()).code, 1008);
  const again2 = await TcpClient.connect(a.tcp);
  again2.send('bob\n');
  await again2.expect('error: name-taken: bob');
  // not-online names exactly those online nowhere.
  alice.send('bob, nobody: last');
  await bob.expect('from alice: last');
  await alice.expect('error: not-online: nobody');
});
