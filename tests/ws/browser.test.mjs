// The built-in web client (src/ws/page.html) in headless Chromium: two pages
// and a TCP client talk; errors, received markup, closes and reconnects.
// Chromium is Debian's /usr/bin/chromium (tests/ws/run.sh installs it).

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { chatd, REPO, TcpClient } from './lib.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = { timeout: 10000 };
// Poll on a timer: a page in the background gets few animation frames, and
// Playwright's default polling waits for them.
const POLL = { timeout: 10000, polling: 50 };
const T = { timeout: 60000 };

let context;
let userDataDir;
const pageErrors = [];

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium (tests/ws/run.sh does)`);
  userDataDir = mkdtempSync(path.join(os.tmpdir(), 'chatd-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 800, height: 600 },
    timeout: 30000,
  });
});

after(async () => {
  await context?.close();
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
});

async function openPage(t, server) {
  const page = await context.newPage();
  t.after(() => page.close());
  page.on('pageerror', (e) => pageErrors.push(e));
  await page.goto(`http://${server.ws}/`, WAIT);
  return page;
}

/** Waits until `fn(arg)` is true in the page. */
const until = (page, fn, arg, options = POLL) => page.waitForFunction(fn, arg, options);

async function login(page, name) {
  await page.bringToFront();
  await page.fill('#name', name);
  await page.click('#login');
}

/** Waits until the log has a line with exactly `text`; returns its class. */
async function logLine(page, text) {
  await until(page, (t) => [...document.querySelectorAll('#log p')].some((p) => p.textContent === t), text, POLL);
  return page.$eval('#log', (log, t) => [...log.querySelectorAll('p')].find((p) => p.textContent === t).className, text);
}

async function send(page, to, msg) {
  await page.bringToFront();
  await until(page, () => !document.querySelector('#send').disabled);
  await page.fill('#to', to);
  await page.fill('#msg', msg);
  await page.click('#send');
}

const logTexts = (page) => page.$$eval('#log p', (ps) => ps.map((p) => [p.className, p.textContent]));

test('two pages and a TCP client talk; markup arrives as text; errors are marked', T, async (t) => {
  const server = await chatd(t);
  const carol = await TcpClient.login(server.tcp, 'carol');
  const alice = await openPage(t, server);
  const bob = await openPage(t, server);
  assert.equal(await alice.title(), 'chatd');
  for (const id of ['name', 'to', 'msg']) {
    assert.ok(await alice.$eval(`#${id}`, (el) => el.labels.length > 0), `#${id} has a label`);
  }
  await login(alice, 'alice');
  await login(bob, 'bob');
  await until(alice, () => document.querySelector('#status').dataset.state === 'open');
  // Each page's first line proves its login was routed.
  await send(alice, 'carol', 'hi carol');
  await carol.expect('from alice: hi carol');
  await send(bob, 'carol', 'bob here too');
  await carol.expect('from bob: bob here too');
  await send(alice, 'bob, carol', 'hello both');
  assert.equal(await logLine(bob, 'from alice: hello both'), 'from');
  await carol.expect('from alice: hello both');
  assert.equal(await logLine(alice, 'to bob, carol: hello both'), 'sent');
  await send(bob, 'alice', 'hi alice, nice page');
  assert.equal(await logLine(alice, 'from bob: hi alice, nice page'), 'from');
  // Markup from someone else is shown as the text it is.
  carol.send('alice, bob: <b>x</b> <img src=x onerror="window.pwned=1">\n');
  for (const page of [alice, bob]) {
    assert.equal(await logLine(page, 'from carol: <b>x</b> <img src=x onerror="window.pwned=1">'), 'from');
    assert.equal(await page.$$eval('#log b, #log img', (els) => els.length), 0);
    assert.equal(await page.evaluate(() => window.pwned), undefined);
  }
  carol.send('alice: thanks\n');
  await logLine(alice, 'from carol: thanks');
  // A name nobody holds: an error line, styled as one.
  await send(alice, 'dave', 'are you there?');
  assert.equal(await logLine(alice, 'error: not-online: dave'), 'error');
  const [fromColor, errorColor] = await alice.$$eval('#log .from, #log .error', (ps) => [
    getComputedStyle(ps.find((p) => p.className === 'from')).color,
    getComputedStyle(ps.find((p) => p.className === 'error')).color,
  ]);
  assert.notEqual(fromColor, errorColor);
  // A name is markup-free by no rule: one in an error line, and in the
  // peers list, is text too.
  await send(alice, '<i>eve</i>', 'hi');
  assert.equal(await logLine(alice, 'error: not-online: <i>eve</i>'), 'error');
  assert.equal(await alice.$$eval('#log i, #peers i', (els) => els.length), 0);
  // Who alice talks to: the names she sent to or received from.
  const peers = await alice.$$eval('#peers button', (bs) => bs.map((b) => b.textContent));
  assert.deepEqual(peers, ['carol', 'bob', 'dave', '<i>eve</i>']);
  await alice.click('#peers button:has-text("bob")');
  assert.equal(await alice.inputValue('#to'), 'bob');
  // Several recipients, one of them a TCP client; a message to oneself.
  await send(bob, 'carol,alice , bob', 'to all');
  await carol.expect('from bob: to all');
  await logLine(alice, 'from bob: to all');
  await logLine(bob, 'from bob: to all');
  await alice.bringToFront();
  await alice.fill('#to', 'bob, carol');
  await alice.fill('#msg', '');
  const shot = await alice.screenshot({ fullPage: false });
  assert.equal(shot.subarray(1, 4).toString(), 'PNG');
  assert.equal(shot.readUInt32BE(16), 800);
  assert.equal(shot.readUInt32BE(20), 600);
  // docs/web-client.png is refreshed on request; otherwise it goes to target/.
  const out = process.env.UPDATE_SCREENSHOT ? path.join(REPO, 'docs/web-client.png') : path.join(REPO, 'target/web-client.png');
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, shot);
  assert.deepEqual(pageErrors, []);
});

test('a refused name is not retried; another name then logs in', T, async (t) => {
  const server = await chatd(t);
  const carol = await TcpClient.login(server.tcp, 'carol');
  const page = await openPage(t, server);
  await login(page, 'car ol');
  assert.equal(await logLine(page, 'error: invalid-name: contains whitespace'), 'error');
  await until(page, () => [...document.querySelectorAll('#log p.info')].some((p) => /^connection closed: code 1008( \(.*\))?$/.test(p.textContent)));
  await until(page, () => /login refused/.test(document.querySelector('#status').textContent));
  assert.equal(await page.isEnabled('#login'), true);
  assert.equal(await page.isEnabled('#name'), true);
  assert.equal(await page.isEnabled('#send'), false);
  await login(page, 'carol');
  assert.equal(await logLine(page, 'error: name-taken: carol'), 'error');
  await until(page, () => document.querySelectorAll('#log p.info').length === 2);
  await login(page, 'carla');
  await send(page, 'carol', 'third time lucky');
  await carol.expect('from carla: third time lucky');
  const texts = await logTexts(page);
  assert.ok(!texts.some(([, text]) => /reconnecting/.test(text)), JSON.stringify(texts));
  assert.deepEqual(pageErrors, []);
});

test('after the server closes it, the page reconnects with the same name, backing off', T, async (t) => {
  const server = await chatd(t, ['--idle-timeout', '2']);
  const page = await openPage(t, server);
  await login(page, 'erin');
  // Silent for 2 s: the server closes it; the page says so and comes back.
  assert.equal(await logLine(page, 'error: idle-timeout'), 'error');
  const frank = await TcpClient.login(server.tcp, 'frank'); // idle from now on, too
  await until(page, () => [...document.querySelectorAll('#log p.info')].some((p) => /^connection closed: code 1008( \(.*\))?; reconnecting in [0-9.]+ s$/.test(p.textContent)));
  await until(page, () => document.querySelector('#status').dataset.state === 'open');
  // Logged in again as erin (the login is routed a moment after the page
  // sent it: until then frank is told erin is not online).
  for (let tries = 0; ; tries++) {
    frank.send('erin: welcome back\nfrank: probe\n');
    const first = await frank.next();
    if (first === 'from frank: probe') break;
    assert.equal(first, 'error: not-online: erin');
    await frank.expect('from frank: probe');
    assert.ok(tries < 50, 'erin never came back');
  }
  await logLine(page, 'from frank: welcome back');
  // The server goes away: shutting-down (1001), then failed attempts, each
  // waiting longer than the one before.
  const before = await page.evaluate(() => document.querySelectorAll('#log p.info').length);
  server.signal('SIGTERM');
  assert.equal(await logLine(page, 'error: shutting-down'), 'error');
  await until(page, (n) => document.querySelectorAll('#log p.info').length >= n + 2, before, { timeout: 15000, polling: 50 });
  const infos = (await logTexts(page)).filter(([kind]) => kind === 'info').map(([, text]) => text);
  assert.match(infos[before], /^connection closed: code 1001( \(.*\))?; reconnecting in [0-9.]+ s$/, JSON.stringify(infos));
  assert.match(infos[before + 1], /^connection closed: code 1006; reconnecting in [0-9.]+ s$/, JSON.stringify(infos));
  // None of these connections lasted long enough to reset the back-off.
  const delays = infos.map((text) => Number(/reconnecting in ([0-9.]+) s/.exec(text)[1]));
  assert.ok(delays.every((d, i) => i === 0 || d > delays[i - 1]), `back-off delays ${delays}`);
  assert.match(await page.textContent('#status'), /code 1006; reconnecting/);
  assert.equal(await page.getAttribute('#status', 'data-state'), 'closed');
  assert.deepEqual(pageErrors, []);
});
