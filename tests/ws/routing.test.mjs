// Routing through the WebSocket transport: TCP and WebSocket clients share
// one name space; each text message carries one or more lines.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { chatd, TcpClient, WsClient, RawWs, OP } from './lib.mjs';

const T = { timeout: 30000 };

test('a TCP client and a ws client talk both ways', T, async (t) => {
  const server = await chatd(t);
  const alice = await WsClient.login(server.ws, 'alice');
  const bob = await TcpClient.login(server.tcp, 'bob');
  alice.send('bob: hi bob');
  await bob.expect('from alice: hi bob');
  bob.send('alice: hello alice\n');
  await alice.expect('from bob: hello alice');
  // One line to both, the sender included.
  bob.send('alice, bob: both\n');
  await alice.expect('from bob: both');
  await bob.expect('from bob: both');
  // A name held over WebSocket is taken for TCP logins, and the other way round.
  const again = await TcpClient.connect(server.tcp);
  again.send('alice\n');
  await again.expect('error: name-taken: alice');
  await again.expectEof();
  const again2 = await WsClient.connect(server.ws);
  again2.send('bob');
  await again2.expect('error: name-taken: bob');
  assert.equal((await again2.waitClose()).code, 1008);
});

test('two ws clients talk, with not-online and no-recipients errors', T, async (t) => {
  const server = await chatd(t);
  const alice = await WsClient.login(server.ws, 'alice');
  const bob = await WsClient.login(server.ws, 'bob');
  alice.send('bob, carol: hi');
  await bob.expect('from alice: hi');
  await alice.expect('error: not-online: carol');
  bob.send('alice , bob,alice: hello both');
  await alice.expect('from bob: hello both');
  await bob.expect('from bob: hello both');
  bob.send('hello?');
  await bob.expect('error: no-recipients: expected "name1, name2: message"');
  // The connection stays after these errors.
  bob.send('alice: still here');
  await alice.expect('from bob: still here');
  // Empty and blank messages are empty lines: ignored, no reply.
  alice.send('');
  alice.send('   ');
  alice.send('alice: after blanks');
  await alice.expect('from alice: after blanks');
});

test('a message carrying several lines is routed line by line, in order', T, async (t) => {
  const server = await chatd(t);
  const alice = await WsClient.login(server.ws, 'alice');
  const bob = await TcpClient.login(server.tcp, 'bob');
  const carol = await WsClient.login(server.ws, 'carol');
  alice.send('bob: one\ncarol: two\r\nbob, carol: three\n\nnonsense\nbob: four');
  await bob.expect('from alice: one');
  await carol.expect('from alice: two');
  await bob.expect('from alice: three');
  await carol.expect('from alice: three');
  await alice.expect('error: no-recipients: expected "name1, name2: message"');
  await bob.expect('from alice: four');
  // A trailing newline adds no empty line of its own; the implicit line end
  // after each message ends "bob: fi" before "ve" starts a new line.
  alice.send('bob: fi');
  alice.send('ve');
  await bob.expect('from alice: fi');
  await alice.expect('error: no-recipients: expected "name1, name2: message"');
  alice.send('bob: six\n');
  await bob.expect('from alice: six');
  // Deliveries to a ws client are one message per line, without the newline.
  bob.send('carol: a\ncarol: b\n');
  await carol.expect('from bob: a');
  await carol.expect('from bob: b');
});

test('the first message is the name; a first message with more lines logs in and routes', T, async (t) => {
  const server = await chatd(t);
  const bob = await TcpClient.login(server.tcp, 'bob');
  const alice = await WsClient.connect(server.ws);
  alice.send('  alice  '); // trimmed, as on TCP
  alice.send('bob: from alice');
  await bob.expect('from alice: from alice');
  // Name and a message in one text message: exactly "dave\nbob: hi\n" on TCP.
  const dave = await WsClient.connect(server.ws);
  dave.send('dave\nbob: hi from dave');
  await bob.expect('from dave: hi from dave');
  // Blank lines before the name are skipped.
  const erin = await WsClient.connect(server.ws);
  erin.send('\n\nerin\nbob: hi from erin');
  await bob.expect('from erin: hi from erin');
  bob.send('alice, dave, erin: all three\n');
  await alice.expect('from bob: all three');
  await dave.expect('from bob: all three');
  await erin.expect('from bob: all three');
});

test('fragmented messages are joined before they are split into lines', T, async (t) => {
  const server = await chatd(t);
  const alice = await WsClient.login(server.ws, 'alice');
  const bob = await TcpClient.login(server.tcp, 'bob');
  alice.send('bob: hel', { fin: false });
  alice.send('lo wor', { fin: false });
  alice.send('ld', { fin: true });
  await bob.expect('from alice: hello world');
  // A line end inside a fragment, and a UTF-8 character split across fragments.
  const euro = Buffer.from('bob: 1 \u20ac\nbob: 2');
  alice.send(euro.subarray(0, 8), { fin: false, binary: false });
  alice.send(euro.subarray(8), { fin: true, binary: false });
  await bob.expect('from alice: 1 \u20ac');
  await bob.expect('from alice: 2');
  // A ping between fragments is answered and does not break the message.
  const raw = await RawWs.connect(server.ws);
  raw.text('carol');
  raw.text('bob: frag', { fin: false });
  raw.send(OP.PING, Buffer.from('mid'));
  const pong = await raw.next();
  assert.equal(pong.opcode, OP.PONG);
  assert.equal(pong.payload.toString(), 'mid');
  raw.send(OP.CONT, Buffer.from('mented'), { fin: true });
  await bob.expect('from carol: fragmented');
  raw.destroy();
});

test('no line can be injected into a TCP recipient stream', T, async (t) => {
  const server = await chatd(t);
  const bob = await TcpClient.login(server.tcp, 'bob');
  const mallory = await WsClient.login(server.ws, 'mallory');
  const attacks = [
    'bob: hi\nfrom admin: you are fired',
    'bob: a\r\nfrom admin: crlf',
    'bob: b\rfrom admin: bare cr',
    'bob: c\u0000from admin: nul',
    'bob: d\u000bfrom admin: vt\u000cff\u0085nel\u2028ls\u2029ps',
    'bob\nfrom admin: e',
    'bob,\nerror: fake',
    'bob: f\n\n\nerror: fake too',
    '\u0000bob: g',
    'bob\u0000: h',
    'bob: i\u001b[2K\rfrom admin: escape',
  ];
  for (const attack of attacks) mallory.send(attack);
  mallory.send('mallory: end check'); // after the errors the attacks earn mallory
  mallory.send('bob: end of attacks');
  const seen = [];
  for (;;) {
    const line = await bob.next();
    assert.notEqual(line, null, `bob's connection ended; saw ${JSON.stringify(seen)}`);
    assert.equal(typeof line, 'string', `a cut line: ${JSON.stringify(line)}`);
    seen.push(line);
    // bob sends nothing, so he has no errors of his own either.
    assert.ok(line.startsWith('from mallory: '), `bob saw a line not from mallory: ${JSON.stringify(line)}`);
    if (line === 'from mallory: end of attacks') break;
  }
  assert.ok(seen.includes('from mallory: hi'), JSON.stringify(seen));
  assert.ok(seen.includes('from mallory: a'), 'the \\r before \\n is removed');
  assert.ok(seen.includes('from mallory: b\rfrom admin: bare cr'), 'a bare \\r stays inside the message');
  assert.ok(seen.includes('from mallory: c\u0000from admin: nul'), 'a NUL stays inside the message');
  assert.ok(seen.includes('from mallory: f'), JSON.stringify(seen));
  // The lines after each \n were mallory's own: their errors went to mallory.
  const errors = [];
  for (;;) {
    const m = await mallory.next();
    assert.notEqual(m, null, `mallory's connection ended; got ${JSON.stringify(errors)}`);
    if (m === 'from mallory: end check') break;
    errors.push(m);
  }
  assert.ok(errors.length >= 6 && errors.every((m) => m.startsWith('error: ')), JSON.stringify(errors));
});
