// The demo chat page in a real browser (Debian's Chromium through
// playwright-core) against the real gateway binary in dev mode:
//
//   cd /work/main && cargo build      # the page is embedded in the binary
//   cd web && node --test --test-concurrency=1 test/browser.test.mjs
//
// Screenshots go to target/artifacts/chat-desktop.png and chat-phone.png.
//
// The binary embeds the page's files when it is built. To try edits of
// web/ without a rebuild, WSGATE_WEB_FROM_DISK=1 serves index.html,
// app.js, wsgate.js and style.css from web/ instead (with the gateway's
// own response headers, CSP included).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import WS from 'ws';
import { BIN, startGateway } from './gateway.mjs';
import { WsgateClient } from '../wsgate.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const ARTIFACTS = path.join(repo, 'target', 'artifacts');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 375, height: 740 };
const WAIT = 10_000;
const FROM_DISK = process.env.WSGATE_WEB_FROM_DISK === '1';
const PAGE_FILES = { '/': 'index.html', '/index.html': 'index.html', '/app.js': 'app.js', '/wsgate.js': 'wsgate.js', '/style.css': 'style.css' };

let gw;
let browser;

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  gw = await startGateway({
    env: {
      // No leeway, so a pasted token with a few seconds to live expires within the test.
      WSGATE_AUTH_LEEWAY_S: '0',
      // A small publish bucket, so a quick typist meets the rate limit.
      WSGATE_LIMITS_PUBLISH_BURST: '5',
      WSGATE_LIMITS_PUBLISH_RATE_PER_S: '2',
      // A short grace, so a leave shows within the test (default 5 s).
      WSGATE_PRESENCE_GRACE_MS: '300',
      // Rooms with more members show only a count. chat:lobby never has
      // more than 4 at once in these tests; chat:crowd does.
      WSGATE_PRESENCE_MAX_LISTED: '4',
    },
  });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--ignore-certificate-errors', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      // A document fulfilled by the test is of no known address, and would
      // be kept from connecting to localhost.
      ...(FROM_DISK ? ['--disable-features=LocalNetworkAccessChecks'] : []),
    ],
  });
});

after(async () => {
  await browser?.close();
  await gw?.dispose();
});

/** A new browser context (its own storage) with the chat page open. */
async function openPage(viewport = DESKTOP) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport });
  context.setDefaultTimeout(WAIT);
  if (FROM_DISK) {
    await context.route((url) => url.origin === gw.origin && Object.hasOwn(PAGE_FILES, url.pathname), async (route) => {
      const file = PAGE_FILES[new URL(route.request().url()).pathname];
      const response = await route.fetch();
      await route.fulfill({ response, body: readFileSync(path.join(repo, 'web', file)) });
    });
  }
  const page = await context.newPage();
  page.problems = [];
  page.on('pageerror', (err) => page.problems.push(`page error: ${err.message}`));
  page.on('console', (m) => {
    // CSP violations and failed loads show up as console errors. Expected:
    // the browser's "WebSocket connection failed" lines while the gateway
    // restarts or when it refuses an expired token, and the answer to the
    // page's probe of /dev/token (400 without `sub` when it exists).
    if (m.type() !== 'error') return;
    if (/WebSocket connection to .* failed/.test(m.text())) return;
    if (new URL(m.location().url || 'about:blank', gw.origin).pathname === '/dev/token') return;
    page.problems.push(`console: ${m.text()} (${m.location().url})`);
  });
  await page.goto(`${gw.origin}/`);
  return page;
}

/** Gets a dev token for `sub` with `role` (which also connects) and waits for open. */
async function signIn(page, sub, role) {
  await page.locator('#dev-panel').waitFor({ state: 'visible' });
  await page.fill('#dev-user', sub);
  await page.selectOption('#dev-role', role);
  await page.click('#dev-token-btn');
  await page.locator('#state[data-state="open"]').waitFor();
  assert.equal(await page.textContent('#whoami'), sub);
}

async function join(page, channel) {
  await page.fill('#channel', channel);
  await page.click('#join');
}

async function joined(page, channel) {
  await page.locator(`#joined .chip[data-channel="${channel}"][data-status="joined"]`).waitFor();
}

async function send(page, text) {
  await page.fill('#message', text);
  await page.click('#send');
  // The box is emptied once the gateway said ok.
  await page.waitForFunction(() => document.querySelector('#message').value === '');
}

/** Waits for a message with `text` from `from`; returns its seq. */
async function received(page, from, text) {
  const li = page.locator(`#messages .msg[data-from="${from}"]`).filter({ hasText: text }).last();
  await li.waitFor();
  assert.equal(await li.locator('.text').textContent(), text);
  assert.equal(await li.locator('.from').textContent(), from);
  const seq = Number(await li.getAttribute('data-seq'));
  assert.ok(Number.isInteger(seq) && seq >= 1, `seq ${seq}`);
  assert.equal(await li.locator('.seq').textContent(), `#${seq}`);
  assert.match(await li.locator('time').textContent(), /\d{1,2}:\d{2}:\d{2}/);
  return seq;
}

function noProblems(...ps) {
  for (const p of ps) assert.deepEqual(p.problems, [], 'no page errors, CSP violations or console errors');
}

let alice;
let bob;

test('two members chat in chat:lobby, each sees the other\'s name and seq', async () => {
  alice = await openPage(DESKTOP);
  bob = await openPage(PHONE);
  await bob.locator('#dev-panel').waitFor({ state: 'visible' });
  await bob.screenshot({ path: path.join(ARTIFACTS, 'chat-phone-start.png'), fullPage: true });
  await signIn(alice, 'alice', 'member');
  await signIn(bob, 'bob', 'member');
  await join(alice, 'chat:lobby');
  await join(bob, 'chat:lobby');
  await joined(alice, 'chat:lobby');
  await joined(bob, 'chat:lobby');

  await send(alice, 'Hi Bob, are you there?');
  const s1 = await received(bob, 'alice', 'Hi Bob, are you there?');
  assert.equal(await received(alice, 'alice', 'Hi Bob, are you there?'), s1, 'the echo has the same seq');
  assert.equal(await alice.getAttribute('#messages .msg[data-from="alice"]', 'data-own'), 'true');

  await send(bob, 'Yes! Hello from my phone.');
  const s2 = await received(alice, 'bob', 'Yes! Hello from my phone.');
  assert.equal(s2, s1 + 1, 'seq goes up by one per message of the channel');
  assert.equal(await received(bob, 'bob', 'Yes! Hello from my phone.'), s2);

  // Untrusted text is text: markup is shown, never run or parsed.
  const markup = '<img src=x data-x=1> <b>not bold</b> & "quotes"';
  await send(alice, markup);
  assert.equal(await received(bob, 'alice', markup), s2 + 1);
  assert.equal(await bob.locator('#messages img, #messages b').count(), 0);

  const long = 'A longer message, to see how the bubbles wrap on a narrow screen: '
    + 'the quick brown fox jumps over the lazy dog, twice, and then once more.';
  await send(bob, long);
  await received(alice, 'bob', long);

  // Screenshots of the conversation, for a look at the layout.
  await alice.screenshot({ path: path.join(ARTIFACTS, 'chat-desktop.png') });
  await bob.screenshot({ path: path.join(ARTIFACTS, 'chat-phone.png') });
  await bob.evaluate(() => window.scrollTo(0, 0));
  await bob.screenshot({ path: path.join(ARTIFACTS, 'chat-phone-full.png'), fullPage: true });
  noProblems(alice, bob);
});

test('a user without a role may not join chat:lobby and is told so', async () => {
  const carol = await openPage(DESKTOP);
  await signIn(carol, 'carol', 'none');
  await join(carol, 'chat:lobby');
  const notice = carol.locator('#notice');
  await notice.filter({ hasText: 'You may not join chat:lobby' }).waitFor();
  assert.equal(await notice.getAttribute('data-kind'), 'error');
  assert.equal(await carol.locator('#joined .chip[data-channel="chat:lobby"]').count(), 0);
  assert.ok(await carol.isDisabled('#send'), 'nothing to write to');
  // Everyone may read announcements.
  await join(carol, 'announce:news');
  await joined(carol, 'announce:news');
  await carol.click('#leave');
  await carol.locator('#joined .chip').waitFor({ state: 'detached' });
  await carol.locator('#messages .sys', { hasText: 'You left announce:news' }).waitFor();
  await carol.context().close();
  noProblems(carol);
});

test('sending too fast: the page says so and keeps the unsent text', async () => {
  const erin = await openPage(DESKTOP);
  await signIn(erin, 'erin', 'member');
  await join(erin, 'chat:lobby');
  await joined(erin, 'chat:lobby');
  const tooFast = erin.locator('#notice', { hasText: 'You are sending messages too fast' });
  let unsent = null;
  for (let i = 1; i <= 10 && unsent === null; i++) {
    const text = `spam ${i}`;
    await erin.fill('#message', text);
    await erin.click('#send');
    await erin.waitForFunction(() => document.querySelector('#message').value === ''
      || !document.querySelector('#notice').hidden);
    if (await tooFast.isVisible()) unsent = text;
  }
  assert.ok(unsent, 'rate_limited within 10 quick messages (burst 5)');
  assert.equal(await erin.inputValue('#message'), unsent, 'the refused text stays in the box');
  assert.equal(await erin.getAttribute('#notice', 'data-kind'), 'warn');
  assert.equal(await erin.locator('#messages .msg', { hasText: unsent }).count(), 0);
  await erin.context().close();
  noProblems(erin);
});

test('a gateway restart shows reconnecting, then open; the channel is re-joined', async () => {
  // Note the badge's states as they change, so a short one is not missed.
  for (const p of [alice, bob]) {
    await p.evaluate(() => {
      window.seenStates = [];
      const badge = document.querySelector('#state');
      new MutationObserver(() => window.seenStates.push(`${badge.dataset.state}: ${badge.textContent}`))
        .observe(badge, { childList: true, subtree: true, characterData: true, attributes: true });
    });
  }
  const reconnecting = alice.locator('#state[data-state="reconnecting"]').waitFor();
  await gw.restart();
  await reconnecting;
  for (const p of [alice, bob]) {
    await p.locator('#state[data-state="open"]').waitFor();
    await joined(p, 'chat:lobby');
    const seen = await p.evaluate(() => window.seenStates);
    const r = seen.find((s) => s.startsWith('reconnecting'));
    assert.ok(r, `reconnecting shown: ${seen.join(' | ')}`);
    assert.match(r, /Reconnecting( in \d+\.\d s|…)/);
    assert.ok(seen.some((s) => s.includes('the server is restarting or shutting down (1001)')),
      `the close code's meaning is shown: ${seen.join(' | ')}`);
    await p.locator('#messages .sys', { hasText: 'Reconnected' }).waitFor();
    // chat:lobby keeps history, but a restarted single gateway starts a new
    // epoch: the page says what could not be recovered.
    await p.locator('#messages .sys', { hasText: 'could not be recovered: the room started over' }).waitFor();
  }
  await send(alice, 'Back after the restart');
  const seq = await received(bob, 'alice', 'Back after the restart');
  assert.equal(seq, 1, 'the restarted gateway numbers chat:lobby from 1 again');
  await send(bob, 'Welcome back');
  await received(alice, 'bob', 'Welcome back');
  noProblems(alice, bob);
});

test('joining a room shows its recent messages, then live ones, none twice', async () => {
  const erin = await openPage(DESKTOP);
  await signIn(erin, 'erin', 'member');
  await join(erin, 'chat:lobby');
  await joined(erin, 'chat:lobby');
  // Sent before erin came: shown as the room's recent history.
  await erin.locator('#messages .sys', { hasText: 'Recent messages in chat:lobby' }).waitFor();
  const history = await received(erin, 'bob', 'Welcome back');
  await send(alice, 'Hello Erin');
  assert.equal(await received(erin, 'alice', 'Hello Erin'), history + 1, 'live right after the history');
  const seqs = await erin.locator('#messages .msg').evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
  assert.equal(new Set(seqs).size, seqs.length, `no message twice: ${seqs}`);
  await erin.screenshot({ path: path.join(ARTIFACTS, 'chat-history.png') });
  noProblems(erin);
  await erin.context().close();
});

test('a pasted token that expires: the page says it cannot renew it', async () => {
  const dave = await openPage(DESKTOP);
  await dave.locator('#dev-panel').waitFor({ state: 'visible' });
  await dave.fill('#token', gw.token('dave', ['member'], '3s'));
  await dave.click('#connect');
  await dave.locator('#state[data-state="open"]').waitFor();
  await join(dave, 'chat:lobby');
  await joined(dave, 'chat:lobby');
  // At exp the gateway closes with 4001; wsgate.js asks getToken() for a
  // new token, gets the same expired one, and the gateway refuses it.
  const notice = dave.locator('#notice');
  await notice.filter({ hasText: 'Your token expired' }).waitFor();
  await dave.locator('#state[data-state="closed"]').waitFor();
  assert.match(await notice.textContent(), /a pasted token cannot be renewed by this page: paste a new token/);
  assert.match(await dave.textContent('#state'), /Closed.*\(4001\)/);
  // It does not go round offering the expired token again.
  await dave.waitForTimeout(500);
  assert.equal(await dave.locator('#messages .sys', { hasText: 'Reconnected' }).count(), 0);
  assert.equal(await dave.getAttribute('#state', 'data-state'), 'closed');
  assert.ok(await dave.isVisible('#token'), 'the token field is shown again');
  await dave.screenshot({ path: path.join(ARTIFACTS, 'chat-expired.png') });
  await dave.context().close();
});

test('without --dev there is no /dev/token, and no dev panel', async () => {
  // The same binary, certificates and secret, started without --dev.
  const child = spawn(BIN, ['serve', '--listen', '127.0.0.1:0'], {
    cwd: gw.dir,
    env: Object.fromEntries(Object.entries(process.env).filter(([k]) => k !== 'WSGATE_CONFIG')),
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  try {
    const port = await new Promise((resolve, reject) => {
      let logs = '';
      const timer = setTimeout(() => reject(new Error(`no listening line:\n${logs}`)), WAIT);
      child.stderr.on('data', (d) => {
        logs += d;
        const m = logs.match(/listening.*?127\.0\.0\.1:(\d+)/);
        if (m) { clearTimeout(timer); resolve(Number(m[1])); }
      });
      child.once('exit', (code) => reject(new Error(`exited (${code}):\n${logs}`)));
    });
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: DESKTOP });
    const page = await context.newPage();
    const probe = page.waitForResponse((r) => r.url().includes('/dev/token'));
    await page.goto(`https://localhost:${port}/`);
    assert.equal((await probe).status(), 404);
    await page.waitForFunction(() => document.querySelector('#token-info').textContent === 'No token yet: paste one.');
    assert.ok(await page.isHidden('#dev-panel'));
    await context.close();
  } finally {
    if (child.exitCode === null) {
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      await exited;
    }
  }
});

/** Waits until the members panel lists exactly `users` (in this order). */
async function members(page, users) {
  await page.locator('#members-panel').waitFor({ state: 'visible' });
  await page.waitForFunction((want) => JSON.stringify(
    [...document.querySelectorAll('#members [data-user]')].map((li) => li.dataset.user),
  ) === want, JSON.stringify(users));
  assert.equal(await page.textContent('#members-count'), String(users.length));
}

test('the members panel: two users in a room see each other, and a leave drops them', async () => {
  const frank = await openPage(DESKTOP);
  const gina = await openPage(PHONE);
  await signIn(frank, 'frank', 'member');
  await signIn(gina, 'gina', 'member');
  await join(frank, 'chat:presence');
  await joined(frank, 'chat:presence');
  await members(frank, ['frank']);
  const own = frank.locator('#members [data-user="frank"]');
  assert.equal(await own.getAttribute('data-own'), 'true');
  assert.match(await own.textContent(), /frank\s*\(you\)/);

  await join(gina, 'chat:presence');
  await joined(gina, 'chat:presence');
  await members(gina, ['frank', 'gina']);
  await members(frank, ['frank', 'gina']);
  assert.equal(await frank.getAttribute('#members [data-user="gina"]', 'data-own'), null);
  assert.equal(await gina.getAttribute('#members [data-user="gina"]', 'data-own'), 'true');
  await frank.locator('#messages .sys', { hasText: 'gina joined.' }).waitFor();
  await frank.screenshot({ path: path.join(ARTIFACTS, 'chat-members.png') });
  await gina.screenshot({ path: path.join(ARTIFACTS, 'chat-members-phone.png') });

  // A channel without presence shows no panel.
  await join(frank, 'announce:news');
  await joined(frank, 'announce:news');
  assert.ok(await frank.isHidden('#members-panel'));
  await frank.click('#joined .chip[data-channel="chat:presence"]');
  await members(frank, ['frank', 'gina']);

  // gina closes her page: after the grace she is gone from frank's panel.
  noProblems(gina);
  await gina.context().close();
  await members(frank, ['frank']);
  await frank.locator('#messages .sys', { hasText: 'gina left.' }).waitFor();
  noProblems(frank);
  await frank.context().close();
});

test('a room with more members than are listed shows only the count', async () => {
  const harry = await openPage(DESKTOP);
  await signIn(harry, 'harry', 'member');
  const room = 'chat:crowd';
  // Four more members (the gateway lists up to 4), connected from Node.
  const others = ['ian', 'jo', 'kim', 'lee'].map((sub) => new WsgateClient(gw.url, {
    getToken: async () => gw.token(sub, ['member']), WebSocket: WS, wsOptions: { ca: gw.ca },
  }));
  try {
    await Promise.all(others.map(async (c) => { await c.connect(); await c.subscribe(room, () => {}); }));
    await join(harry, room);
    await joined(harry, room);
    await harry.locator('#members-note', { hasText: '5 people are here: too many to list.' }).waitFor();
    assert.equal(await harry.textContent('#members-count'), '5');
    assert.equal(await harry.locator('#members [data-user]').count(), 0);
    // Back within the limit: listed again.
    await others[0].unsubscribe(room);
    await members(harry, ['harry', 'jo', 'kim', 'lee']);
    assert.ok(await harry.isHidden('#members-note'));
    noProblems(harry);
  } finally {
    for (const c of others) c.close();
    await harry.context().close();
  }
});
