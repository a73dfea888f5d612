// Tests of wsgate.js against the real gateway binary (see gateway.mjs).
// Run: cd web && node --test --test-concurrency=1 test/wsgate.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import { readdirSync, readFileSync } from 'node:fs';
import WS from 'ws';
import { startGateway } from './gateway.mjs';
import {
  CloseCode, describeClose, ErrorCode, WsgateError, reconnectDelay, WsgateClient,
} from '../wsgate.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const FAST = { initialMs: 50, maxMs: 400 };

/** Resolves with the first `event` whose argument satisfies `pred`. */
function waitEvent(client, event, pred = () => true, ms = 8000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off(event, fn);
      reject(new Error(`no '${event}' event within ${ms} ms (state ${client.state})`));
    }, ms);
    const fn = (x) => {
      if (!pred(x)) return;
      clearTimeout(timer);
      client.off(event, fn);
      resolve(x);
    };
    client.on(event, fn);
  });
}

/** A subscription handler that collects frames and can wait for the next ones. */
function inbox() {
  const frames = [];
  let waiters = [];
  const handler = (m) => {
    frames.push(m);
    waiters = waiters.filter((w) => (frames.length >= w.n ? (w.resolve(), false) : true));
  };
  handler.frames = frames;
  handler.waitFor = (n, ms = 5000) => new Promise((resolve, reject) => {
    if (frames.length >= n) return resolve(frames);
    const timer = setTimeout(() => reject(new Error(`got ${frames.length} of ${n} messages`)), ms);
    waiters.push({ n, resolve: () => { clearTimeout(timer); resolve(frames); } });
  });
  return handler;
}

/** The `ws` WebSocket, recording every frame sent and every socket made. */
function spyWebSocket() {
  const sent = [];
  const sockets = [];
  class Spy extends WS {
    constructor(...args) {
      super(...args);
      this.ctorArgs = args;
      sockets.push(this);
    }
    send(data, ...rest) {
      sent.push(JSON.parse(data));
      return super.send(data, ...rest);
    }
  }
  return { Spy, sent, sockets };
}

/**
 * A WebSocket shaped like a browser's: no HTTP status of a refused upgrade
 * (no `on`, no 'unexpected-response'), only open/message/error/close.
 */
function browserLikeWebSocket(ca) {
  return class BrowserLikeWebSocket {
    constructor(url, protocols) {
      this._ws = new WS(url, protocols, { ca });
    }
    get readyState() { return this._ws.readyState; }
    get protocol() { return this._ws.protocol; }
    send(data) { this._ws.send(data); }
    close(code, reason) { this._ws.close(code, reason); }
    addEventListener(type, fn) { this._ws.addEventListener(type, fn); }
  };
}

/** A fetch for the /readyz probe that trusts the dev CA; records the URLs asked. */
function fetchWithCa(ca, log) {
  return (url, { signal } = {}) => new Promise((resolve, reject) => {
    log.push(url);
    const req = https.get(url, { ca, signal }, (res) => {
      res.resume();
      resolve({ status: res.statusCode });
    });
    req.on('error', reject);
  });
}

const clients = new Set();
/** A client of `gw` for `sub` (role member unless given), closed after each test file. */
function makeClient(gw, { sub = 'alice', roles = ['member'], ttl = '1h', ...opts } = {}) {
  const calls = { getToken: 0 };
  const client = new WsgateClient(gw.url, {
    getToken: async () => { calls.getToken++; return gw.token(sub, roles, ttl); },
    WebSocket: WS,
    wsOptions: { ca: gw.ca },
    backoff: FAST,
    ...opts,
  });
  client.calls = calls;
  const states = [];
  client.on('state', (s) => states.push(s));
  client.states = states;
  clients.add(client);
  return client;
}

function closeAll() {
  for (const c of clients) c.close();
  clients.clear();
}

// ---------------------------------------------------------------- pure parts

test('reconnectDelay follows the policy of each close code', () => {
  const b = { initialMs: 500, maxMs: 30000 };
  const lo = () => 0;
  const hi = () => 0.999999;
  const mid = () => 0.5;

  // 1000: never.
  assert.equal(reconnectDelay(CloseCode.NORMAL, 0, b, mid), null);
  assert.equal(reconnectDelay(1000, 5, b, mid), null);

  // 1001: soon, within 100..1000 ms, whatever the attempt.
  for (const r of [lo, mid, hi]) {
    for (const attempt of [0, 3, 20]) {
      const d = reconnectDelay(CloseCode.GOING_AWAY, attempt, b, r);
      assert.ok(d >= 100 && d <= 1000, `1001 attempt ${attempt}: ${d}`);
    }
  }
  assert.notEqual(reconnectDelay(1001, 0, b, lo), reconnectDelay(1001, 0, b, hi), '1001 is jittered');

  // 4001: right away, small jitter.
  for (const r of [lo, mid, hi]) {
    const d = reconnectDelay(CloseCode.TOKEN_EXPIRED, 0, b, r);
    assert.ok(d >= 0 && d <= 250, `4001: ${d}`);
  }
  assert.ok(reconnectDelay(4001, 7, b, hi) <= 250, '4001 does not grow with attempts');

  // 4008: at least 5 s, exponential with full jitter above it.
  assert.equal(reconnectDelay(CloseCode.TOO_SLOW, 0, b, lo), 5000);
  assert.equal(reconnectDelay(4008, 0, b, hi), 10000);
  assert.equal(reconnectDelay(4008, 1, b, hi), 15000);
  assert.equal(reconnectDelay(4008, 2, b, hi), 25000);
  assert.equal(reconnectDelay(4008, 10, b, hi), 35000, 'window capped at maxMs');
  assert.equal(reconnectDelay(4008, 0, { initialMs: 10, maxMs: 100 }, lo), 5000, 'floor even with small back-off');

  // Other codes and 1006: full jitter over initialMs * 2^attempt, capped at maxMs.
  for (const code of [CloseCode.ABNORMAL, 1002, 1003, 1007, 1008, 1009, 1011, 4999, 1005]) {
    assert.equal(reconnectDelay(code, 0, b, lo), 0);
    assert.equal(reconnectDelay(code, 0, b, hi), 500);
    assert.equal(reconnectDelay(code, 1, b, hi), 1000);
    assert.equal(reconnectDelay(code, 3, b, mid), 2000);
    assert.equal(reconnectDelay(code, 6, b, hi), 30000);
    assert.equal(reconnectDelay(code, 1000, b, hi), 30000, 'huge attempt stays capped');
  }
  // Defaults of the back-off when none is given.
  assert.equal(reconnectDelay(1006, 0, undefined, hi), 500);
});

test('CloseCode and describeClose cover every close code of the contract', () => {
  const contract = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4001, 4003, 4008];
  const values = new Set(Object.values(CloseCode));
  for (const code of contract) {
    assert.ok(values.has(code), `CloseCode lacks ${code}`);
    const text = describeClose(code);
    assert.equal(typeof text, 'string');
    assert.doesNotMatch(text, /code \d+/, `${code} has its own sentence: ${text}`);
  }
  assert.equal(CloseCode.NORMAL, 1000);
  assert.equal(CloseCode.GOING_AWAY, 1001);
  assert.equal(CloseCode.TOKEN_EXPIRED, 4001);
  assert.equal(CloseCode.TOO_SLOW, 4008);
  assert.equal(describeClose(4001), 'your session expired');
  assert.match(describeClose(4321), /4321/);
  const err = new WsgateError('forbidden', 'no', { channel: 'x' });
  assert.ok(err instanceof Error);
  assert.equal(err.code, 'forbidden');
  assert.equal(err.channel, 'x');
});

// ------------------------------------------------- against one shared gateway

let gw;
before(async () => { gw = await startGateway(); });
after(async () => {
  closeAll();
  await gw?.dispose();
});

test('both carriers connect: subprotocol and Authorization header', async (t) => {
  t.after(closeAll);
  for (const carrier of ['subprotocol', 'header']) {
    const { Spy, sockets } = spyWebSocket();
    const c = makeClient(gw, { sub: `carrier-${carrier}`, carrier, WebSocket: Spy });
    const welcome = await c.connect();
    assert.equal(welcome.op, 'welcome');
    assert.equal(welcome.user, `carrier-${carrier}`);
    assert.equal(typeof welcome.session, 'string');
    assert.ok(welcome.expires_at > Date.now() / 1000);
    assert.equal(c.state, 'open');
    assert.equal(sockets.length, 1);
    assert.equal(sockets[0].protocol, 'wsgate.v1', 'the gateway answers wsgate.v1, never the token');
    const [, protocols, options] = sockets[0].ctorArgs;
    if (carrier === 'header') {
      assert.deepEqual(protocols, ['wsgate.v1']);
      assert.match(options.headers.Authorization, /^Bearer ey/);
    } else {
      assert.equal(protocols[0], 'wsgate.v1');
      assert.match(protocols[1], /^bearer\.ey/);
      assert.equal(options.headers, undefined);
    }
    assert.ok(await c.ping() >= 0);
    c.close();
    assert.equal(c.state, 'closed');
  }
});

test('subscribe, publish and receive; unsubscribe stops delivery', async (t) => {
  t.after(closeAll);
  const alice = makeClient(gw, { sub: 'alice' });
  const bob = makeClient(gw, { sub: 'bob' });
  await Promise.all([alice.connect(), bob.connect()]);
  const a = inbox();
  const b = inbox();
  const events = [];
  alice.on('message', (m) => events.push(m));
  await alice.subscribe('chat:pubsub', a);
  await bob.subscribe('chat:pubsub', b);

  await alice.publish('chat:pubsub', { text: 'hi from alice' });
  await bob.publish('chat:pubsub', 'hi from bob');
  await a.waitFor(2);
  await b.waitFor(2);
  for (const box of [a, b]) {
    assert.deepEqual(box.frames.map((m) => [m.channel, m.from, m.data]), [
      ['chat:pubsub', 'alice', { text: 'hi from alice' }],
      ['chat:pubsub', 'bob', 'hi from bob'],
    ]);
    assert.equal(box.frames[1].seq, box.frames[0].seq + 1);
  }
  assert.equal(events.length, 2, "the 'message' event sees them too");

  await bob.unsubscribe('chat:pubsub');
  await alice.publish('chat:pubsub', 'after unsubscribe');
  await a.waitFor(3);
  await bob.ping(); // replies and messages share one queue: a late message would be here by now
  assert.equal(b.frames.length, 2, 'nothing after unsubscribe');
  await bob.unsubscribe('chat:pubsub'); // already gone: resolves
});

test('concurrent requests are matched to their replies by id', async (t) => {
  t.after(closeAll);
  const { Spy, sent } = spyWebSocket();
  const c = makeClient(gw, { sub: 'carol', WebSocket: Spy });
  await c.connect();
  const settle = (p) => p.then((v) => ({ ok: true, v }), (e) => ({ ok: false, e }));
  const requests = [];
  for (let i = 0; i < 5; i++) {
    requests.push(['ping', settle(c.ping())]);
    requests.push(['publish ok', settle(c.publish(`chat:ids${i}`, i))]);
    requests.push(['publish forbidden', settle(c.publish(`announce:ids${i}`, i))]);
    requests.push(['subscribe forbidden', settle(c.subscribe(`secret${i}`, () => {}))]);
    requests.push(['subscribe ok', settle(c.subscribe(`chat:ids${i}`, () => {}))]);
  }
  const results = await Promise.all(requests.map(([, p]) => p));
  requests.forEach(([kind], i) => {
    const r = results[i];
    if (kind === 'ping') {
      assert.ok(r.ok && typeof r.v === 'number', kind);
    } else if (kind.endsWith('ok')) {
      assert.ok(r.ok, `${kind}: ${r.e?.message}`);
    } else {
      assert.ok(!r.ok && r.e instanceof WsgateError, kind);
      assert.equal(r.e.code, 'forbidden', kind);
    }
  });
  // The forbidden errors name their own channel: each reply went to its request.
  const forbiddenChannels = results.filter((r) => !r.ok).map((r) => r.e.channel).sort();
  assert.deepEqual(forbiddenChannels, [0, 1, 2, 3, 4].flatMap((i) => [`announce:ids${i}`, `secret${i}`]).sort());
  const ids = sent.map((f) => f.id);
  assert.equal(new Set(ids).size, ids.length, 'ids are unique');
  assert.deepEqual(ids, [...ids].sort((x, y) => x - y), 'ids increase');
  assert.ok(ids.every((id) => Number.isInteger(id) && id > 0));
});

test('subscribe to a forbidden channel rejects with WsgateError forbidden', async (t) => {
  t.after(closeAll);
  const { Spy, sent } = spyWebSocket();
  const c = makeClient(gw, { sub: 'dave', WebSocket: Spy });
  await c.connect();
  await assert.rejects(c.subscribe('secret', () => {}), (err) => {
    assert.ok(err instanceof WsgateError);
    assert.equal(err.code, 'forbidden');
    assert.equal(err.channel, 'secret');
    return true;
  });
  assert.equal(c.state, 'open', 'the connection stays open');
  assert.ok(await c.ping() >= 0);
  // A refused channel is not remembered: no later subscribe repeats it.
  await c.subscribe('chat:ok', () => {});
  assert.deepEqual(sent.filter((f) => f.op === 'subscribe').map((f) => f.channel), ['secret', 'chat:ok']);
});

// ------------------------------------------- disruptive: one gateway per test

/**
 * SIGSTOPs the gateway and waits until every thread of it has stopped
 * (the signal is asynchronous: a thread may still answer a frame otherwise).
 */
async function pause(g) {
  g.child.kill('SIGSTOP');
  const pid = g.child.pid;
  for (let i = 0; i < 200; i++) {
    const tasks = readdirSync(`/proc/${pid}/task`);
    const stopped = tasks.every((t) => {
      try {
        const stat = readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
        return /^\S+ \(.*\) [Tt] /s.test(stat);
      } catch {
        return true; // the thread is gone
      }
    });
    if (stopped) return;
    await sleep(5);
  }
  throw new Error('the gateway did not stop');
}

async function withGateway(opts, fn) {
  const g = await startGateway(opts);
  try {
    return await fn(g);
  } finally {
    closeAll();
    try { g.child?.kill('SIGCONT'); } catch { /* not running */ }
    await g.dispose();
  }
}

test('an id-less forbidden error ends the subscription locally and emits error', async () => {
  await withGateway({}, async (g) => {
    // Tokens after the first have no role: a refresh with one ends the chat subscription.
    let n = 0;
    const { Spy, sent } = spyWebSocket();
    const c = new WsgateClient(g.url, {
      getToken: async () => (n++ === 0 ? g.token('erin', ['member']) : g.token('erin', [])),
      WebSocket: Spy, wsOptions: { ca: g.ca }, backoff: FAST,
    });
    clients.add(c);
    const other = makeClient(g, { sub: 'frank' });
    await Promise.all([c.connect(), other.connect()]);
    const box = inbox();
    await c.subscribe('chat:ends', box);
    await c.subscribe('user:erin', () => {});
    const errored = waitEvent(c, 'error');
    await c.refresh();
    const err = await errored;
    assert.ok(err instanceof WsgateError);
    assert.equal(err.code, 'forbidden');
    assert.equal(err.channel, 'chat:ends');
    assert.equal(c.state, 'open', 'the connection stays open');
    const otherBox = inbox();
    await other.subscribe('chat:ends', otherBox);
    await other.publish('chat:ends', 'after the end');
    await otherBox.waitFor(1);
    await c.ping();
    assert.equal(box.frames.length, 0, 'no message of an ended subscription');

    // Dropped from the resubscribe set: after a reconnect only user:erin comes back.
    sent.length = 0;
    const reopened = waitEvent(c, 'state', (x) => x.state === 'open', 15000);
    await g.restart();
    await reopened;
    assert.deepEqual(sent.filter((f) => f.op === 'subscribe').map((f) => f.channel), ['user:erin']);
  });
});

test('subscribe before connect: remembered, then subscribed on open', async () => {
  await withGateway({}, async (g) => {
    const c = makeClient(g, { sub: 'hank' });
    const box = inbox();
    const subscribed = c.subscribe('chat:early', box);
    const refused = c.subscribe('secret', () => {});
    assert.equal(c.state, 'idle');
    await c.connect();
    await subscribed;
    await assert.rejects(refused, { code: 'forbidden', channel: 'secret' });
    await c.publish('chat:early', 1);
    assert.equal((await box.waitFor(1))[0].data, 1);
  });
});

test('429 and 503 refusals back off (at least Retry-After) and retry', async () => {
  const env = {
    WSGATE_LIMITS_MAX_CONNECTIONS_PER_USER: '1',
    WSGATE_SERVER_RETRY_AFTER_S: '1',
    WSGATE_SERVER_DRAIN_GRACE_MS: '3000',
  };
  await withGateway({ env }, async (g) => {
    const first = makeClient(g, { sub: 'ivy' });
    await first.connect();
    // 429: the same user again, past max_connections_per_user.
    const second = makeClient(g, { sub: 'ivy' });
    const limited = waitEvent(second, 'state', (x) => x.state === 'reconnecting');
    const secondOpen = second.connect();
    const s = await limited;
    assert.match(s.reason, /429/);
    assert.ok(s.delayMs >= 1000, `Retry-After honoured: ${s.delayMs}`);
    first.close();
    assert.equal((await secondOpen).user, 'ivy', 'retried and got in');

    // 503 while draining: retried, not given up.
    const third = makeClient(g, { sub: 'jack' });
    g.child.kill('SIGTERM');
    await sleep(200);
    const draining = waitEvent(third, 'state', (x) => x.state === 'reconnecting');
    third.connect().catch(() => {});
    const d = await draining;
    assert.match(d.reason, /503/);
    assert.ok(d.delayMs >= 1000, `Retry-After honoured: ${d.delayMs}`);
    assert.notEqual(third.state, 'closed');
  });
});

test('a request without reply in time rejects with timeout (gateway paused)', async () => {
  await withGateway({}, async (g) => {
    const c = makeClient(g, { requestTimeoutMs: 300, connectTimeoutMs: 5000 });
    await c.connect();
    await pause(g);
    try {
      const t0 = Date.now();
      await assert.rejects(c.publish('chat:slow', 1), (err) => {
        assert.ok(err instanceof WsgateError);
        assert.equal(err.code, 'timeout');
        return true;
      });
      const took = Date.now() - t0;
      assert.ok(took >= 250 && took < 2000, `took ${took} ms`);
      await assert.rejects(c.ping(), { code: 'timeout' });
    } finally {
      g.child.kill('SIGCONT');
    }
    // The late replies are ignored; the connection works again.
    assert.ok(await c.ping() >= 0);
    assert.equal(c.state, 'open');
  });
});

test('pending requests reject with closed when the socket closes', async () => {
  await withGateway({}, async (g) => {
    const c = makeClient(g, { requestTimeoutMs: 10000 });
    await c.connect();
    await pause(g);
    const pending = c.ping();
    await sleep(50);
    c.close();
    await assert.rejects(pending, { code: 'closed' });
    await assert.rejects(c.publish('chat:x', 1), { code: 'closed' });
  });
});

test('the application ping detects a dead connection and reconnects', async () => {
  await withGateway({}, async (g) => {
    const c = makeClient(g, { pingIntervalMs: 200, requestTimeoutMs: 300, connectTimeoutMs: 500 });
    await c.connect();
    const dead = waitEvent(c, 'state', (s) => s.state === 'reconnecting', 3000);
    const t0 = Date.now();
    await pause(g);
    const s = await dead;
    assert.ok(Date.now() - t0 < 2000, 'detected within ping interval + timeout');
    assert.equal(s.code, CloseCode.ABNORMAL);
    assert.match(s.reason, /pong/);
    assert.equal(typeof s.delayMs, 'number');
    // Once the gateway answers again, the client is back.
    const back = waitEvent(c, 'state', (x) => x.state === 'open', 8000);
    g.child.kill('SIGCONT');
    await back;
    assert.ok(await c.ping() >= 0);
  });
});

test('reconnects after a gateway restart and resubscribes: messages flow again', async () => {
  await withGateway({}, async (g) => {
    const { Spy, sent } = spyWebSocket();
    const c = makeClient(g, { sub: 'alice', WebSocket: Spy });
    const box = inbox();
    await c.connect();
    await c.subscribe('chat:restart', box);
    await c.subscribe('user:alice', () => {});
    const welcomes = [];
    c.on('welcome', (w) => welcomes.push(w));
    const lost = waitEvent(c, 'state', (s) => s.state === 'reconnecting', 8000);
    const reopened = waitEvent(c, 'state', (s) => s.state === 'open', 15000);
    await g.restart();
    const s = await lost;
    assert.equal(s.code, CloseCode.GOING_AWAY);
    await reopened;
    assert.equal(welcomes.length, 1, 'a new session');
    assert.equal(c.calls.getToken, 2, 'a token for each connection');
    const subs = sent.filter((f) => f.op === 'subscribe').map((f) => f.channel);
    assert.deepEqual(subs, ['chat:restart', 'user:alice', 'chat:restart', 'user:alice']);

    const bob = makeClient(g, { sub: 'bob' });
    await bob.connect();
    await bob.publish('chat:restart', 'after restart');
    const [m] = await box.waitFor(1);
    assert.equal(m.data, 'after restart');
    assert.equal(m.from, 'bob');
  });
});

test('1001 on gateway stop leads to reconnect attempts with back-off', async () => {
  await withGateway({}, async (g) => {
    const c = makeClient(g);
    await c.connect();
    const first = waitEvent(c, 'state', (s) => s.state === 'reconnecting');
    await g.stop();
    const s1 = await first;
    assert.equal(s1.code, 1001);
    assert.ok(s1.delayMs >= 100 && s1.delayMs <= 1000, `soon after 1001: ${s1.delayMs}`);
    // The gateway is gone: the attempts fail and back off.
    await waitEvent(c, 'state', (s) => s.state === 'reconnecting' && s.code === CloseCode.ABNORMAL);
    await waitEvent(c, 'state', (s) => s.state === 'reconnecting' && s.code === CloseCode.ABNORMAL);
    assert.ok(c.calls.getToken >= 3, `attempted again (${c.calls.getToken} tokens)`);
    assert.equal(c.state, 'reconnecting');
  });
});

test('4001 on expiry: a fresh token and the session continues', async () => {
  await withGateway({ env: { WSGATE_AUTH_LEEWAY_S: '0' } }, async (g) => {
    const c = makeClient(g, { ttl: '2s', refreshMarginMs: null });
    const box = inbox();
    await c.connect();
    await c.subscribe('chat:expiry', box);
    const expired = await waitEvent(c, 'state', (s) => s.state === 'reconnecting', 5000);
    assert.equal(expired.code, CloseCode.TOKEN_EXPIRED);
    assert.ok(expired.delayMs <= 250, `right away: ${expired.delayMs}`);
    await waitEvent(c, 'state', (s) => s.state === 'open');
    assert.equal(c.calls.getToken, 2);
    await c.publish('chat:expiry', 'still here');
    const [m] = await box.waitFor(1);
    assert.equal(m.data, 'still here');
  });
});

test('refresh before expiry keeps the connection beyond the first token', async () => {
  await withGateway({ env: { WSGATE_AUTH_LEEWAY_S: '0' } }, async (g) => {
    const { Spy, sent } = spyWebSocket();
    // Default refreshMarginMs (60 s) is above the 2 s lifetime: refresh right after welcome.
    const c = makeClient(g, { ttl: '2s', WebSocket: Spy });
    const box = inbox();
    const welcome = await c.connect();
    await c.subscribe('chat:refresh', box);
    await sleep(200);
    assert.ok(sent.some((f) => f.op === 'refresh'), 'refreshed right after welcome');
    const closes = [];
    c.on('state', (s) => { if (s.state !== 'open') closes.push(s); });
    // Past the first token's exp (and a second token's too).
    const wait = welcome.expires_at * 1000 + 2500 - Date.now();
    await sleep(Math.max(wait, 0));
    assert.deepEqual(closes, [], 'never closed');
    assert.equal(c.state, 'open');
    assert.equal(sent.filter((f) => f.op === 'refresh').length >= 2, true, 'refreshed again');
    assert.ok(c.calls.getToken >= 3);
    await c.publish('chat:refresh', 'outlived');
    const [m] = await box.waitFor(1);
    assert.equal(m.data, 'outlived');
  });
});

test('a refused upgrade (401) stops and reports, without further attempts', async () => {
  let calls = 0;
  const c = new WsgateClient(gw.url, {
    getToken: async () => { calls++; return 'garbage'; },
    WebSocket: WS, wsOptions: { ca: gw.ca }, backoff: FAST,
  });
  clients.add(c);
  const states = [];
  c.on('state', (s) => states.push(s.state));
  const closed = waitEvent(c, 'closed');
  await assert.rejects(c.connect(), { code: 'closed' });
  const info = await closed;
  assert.deepEqual(info.refused, { status: 401 });
  assert.equal(c.state, 'closed');
  await sleep(600);
  assert.equal(calls, 1, 'no further attempts');
  assert.deepEqual(states, ['connecting', 'closed']);
});

test('a refused upgrade with the header carrier and no token is a 401 too', async () => {
  const c = new WsgateClient(gw.url, {
    getToken: async () => '', carrier: 'header',
    WebSocket: WS, wsOptions: { ca: gw.ca }, backoff: FAST,
  });
  clients.add(c);
  const closed = waitEvent(c, 'closed');
  await assert.rejects(c.connect());
  assert.equal((await closed).refused.status, 401);
});

test('browser-like WebSocket: /readyz decides between refused and down', async () => {
  await withGateway({}, async (g) => {
    const ca = g.ca;
    const probes = [];
    // Refused: the gateway is up (readyz 200), so a failed upgrade means "not you".
    const bad = new WsgateClient(g.url, {
      getToken: async () => 'garbage',
      WebSocket: browserLikeWebSocket(ca), fetch: fetchWithCa(ca, probes), backoff: FAST,
    });
    clients.add(bad);
    const closed = waitEvent(bad, 'closed');
    await assert.rejects(bad.connect(), { code: 'closed' });
    const info = await closed;
    assert.ok(info.refused, 'reported as refused');
    // Twice: a single failure while /readyz answers may be a gateway just starting.
    assert.deepEqual(probes, [`https://localhost:${g.port}/readyz`, `https://localhost:${g.port}/readyz`]);

    // Down: the probe fails, so the client backs off and comes back later.
    await g.stop();
    probes.length = 0;
    const good = new WsgateClient(g.url, {
      getToken: async () => g.token('gina', ['member']),
      WebSocket: browserLikeWebSocket(ca), fetch: fetchWithCa(ca, probes), backoff: FAST,
    });
    clients.add(good);
    const retrying = waitEvent(good, 'state', (s) => s.state === 'reconnecting');
    const welcome = good.connect();
    await retrying;
    assert.ok(probes.length >= 1, 'probed readyz');
    await sleep(300);
    await g.restart();
    assert.equal((await welcome).user, 'gina');
    assert.equal(good.state, 'open');
  });
});

// ---------------------------------------------------------------- history and resume

test('a reconnect resumes: the missed messages are replayed once, in order, then live', async (t) => {
  t.after(closeAll);
  const { Spy, sockets, sent } = spyWebSocket();
  const alice = makeClient(gw, { sub: 'alice', WebSocket: Spy });
  const bob = makeClient(gw, { sub: 'bob' });
  await Promise.all([alice.connect(), bob.connect()]);
  const box = inbox();
  await alice.subscribe('chat:resume', box);
  const start = alice.position('chat:resume');
  assert.equal(typeof start.epoch, 'string');
  for (const n of [1, 2, 3]) await bob.publish('chat:resume', { n });
  await box.waitFor(3);
  assert.deepEqual(alice.position('chat:resume'), { epoch: start.epoch, seq: start.seq + 3 });

  // The connection drops; three more are published while alice is away.
  const away = waitEvent(alice, 'state', (s) => s.state === 'reconnecting');
  sockets.at(-1).terminate();
  await away;
  for (const n of [4, 5, 6]) await bob.publish('chat:resume', { n });
  const unrecovered = [];
  alice.on('unrecovered', (u) => unrecovered.push(u));
  await waitEvent(alice, 'state', (s) => s.state === 'open');
  await box.waitFor(6);
  await bob.publish('chat:resume', { n: 7 });
  await box.waitFor(7);
  await alice.ping();
  assert.deepEqual(box.frames.map((m) => m.data.n), [1, 2, 3, 4, 5, 6, 7], 'each once, in order');
  const seqs = box.frames.map((m) => m.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => start.seq + 1 + i), 'consecutive');
  assert.deepEqual(unrecovered, []);
  const resume = sent.filter((f) => f.op === 'subscribe').at(-1);
  assert.deepEqual(resume.since, { epoch: start.epoch, seq: start.seq + 3 });
});

test('history() returns the last messages; a restart is reported as unrecovered', async () => {
  await withGateway({}, async (g) => {
    const alice = makeClient(g, { sub: 'alice' });
    const bob = makeClient(g, { sub: 'bob' });
    await Promise.all([alice.connect(), bob.connect()]);
    for (const n of [1, 2, 3, 4]) await bob.publish('chat:scroll', { n });
    const page = await alice.history('chat:scroll', 3);
    assert.deepEqual(page.messages.map((m) => [m.from, m.data.n]), [['bob', 2], ['bob', 3], ['bob', 4]]);
    assert.equal(page.seq, page.messages.at(-1).seq);
    await assert.rejects(alice.history('user:alice'), (e) => e.code === 'no_history');

    const box = inbox();
    await alice.subscribe('chat:scroll', box);
    const before = alice.position('chat:scroll');
    const unrecovered = waitEvent(alice, 'unrecovered', () => true, 15000);
    await g.restart();
    const u = await unrecovered;
    assert.equal(u.channel, 'chat:scroll');
    assert.equal(u.reason, 'epoch_changed');
    assert.deepEqual(u.since, before);
    assert.notEqual(u.epoch, before.epoch);
    // The client follows the new numbering from here.
    assert.deepEqual(alice.position('chat:scroll'), { epoch: u.epoch, seq: u.seq });
    const bob2 = makeClient(g, { sub: 'bob' });
    await bob2.connect();
    await bob2.publish('chat:scroll', { n: 5 });
    const frames = await box.waitFor(1);
    assert.equal(frames[0].data.n, 5);
  });
});

test('4003 from the HTTP API: a new token is asked for, and the client stops when there is none', async (t) => {
  t.after(closeAll);
  let tokens = 0;
  const c = new WsgateClient(gw.url, {
    getToken: async () => {
      tokens += 1;
      if (tokens > 1) throw new Error('no token for you');
      return gw.token('mallory', ['member']);
    },
    WebSocket: WS,
    wsOptions: { ca: gw.ca },
    backoff: FAST,
  });
  clients.add(c);
  await c.connect();
  const closed = waitEvent(c, 'closed');
  const admin = gw.token('ops', ['admin'], '1h', 'wsgate-api');
  const res = await new Promise((resolve, reject) => {
    const req = https.request(`${gw.apiUrl}/disconnect`, {
      method: 'POST', ca: gw.ca, headers: { Authorization: `Bearer ${admin}`, 'Content-Type': 'application/json' },
    }, (r) => {
      let body = '';
      r.on('data', (d) => { body += d; });
      r.on('end', () => resolve({ status: r.statusCode, body: JSON.parse(body) }));
    });
    req.on('error', reject);
    req.end(JSON.stringify({ user: 'mallory' }));
  });
  assert.deepEqual(res, { status: 200, body: { sessions: 1 } });
  const info = await closed;
  assert.equal(info.code, CloseCode.DISCONNECTED);
  assert.match(info.reason, /getToken failed after 4003/);
  assert.equal(tokens, 2, 'asked once for a new token, then stopped');
  assert.equal(c.state, 'closed');
});

// ---------------------------------------------------------------- presence

/** Records a client's 'join', 'leave' and 'members' events, in order. */
function presenceLog(client) {
  const log = [];
  for (const kind of ['join', 'leave', 'members']) client.on(kind, (e) => log.push({ kind, ...e }));
  return log;
}

/** Polls `fn` until it returns a truthy value (or throws after `ms`). */
async function eventually(what, fn, ms = 8000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(50);
  }
}

// A short grace, so a leave comes within the test (default 5 s).
const SHORT_GRACE = { WSGATE_PRESENCE_GRACE_MS: '300' };

test('presence: members() follows joins and leaves; a leave waits for the grace', async () => {
  await withGateway({ env: SHORT_GRACE }, async (g) => {
    const { Spy, sent } = spyWebSocket();
    const alice = makeClient(g, { sub: 'alice', WebSocket: Spy });
    const bob = makeClient(g, { sub: 'bob' });
    await Promise.all([alice.connect(), bob.connect()]);
    const log = presenceLog(alice);
    const room = 'chat:presence';

    await alice.subscribe(room, () => {}, { presence: true });
    // Resolved once the listing is in.
    assert.deepEqual(alice.members(room), ['alice']);
    assert.deepEqual(sent.filter((f) => f.channel === room).map((f) => [f.op, f.presence]),
      [['subscribe', true], ['presence', undefined]], 'the listing is fetched after the subscribe');
    assert.deepEqual(log.filter((e) => e.kind === 'members'), [{ kind: 'members', channel: room, members: ['alice'], count: 1 }]);

    // Bob's subscription makes him a member, whether or not he asks for presence.
    const joined = waitEvent(alice, 'join', (e) => e.user === 'bob');
    await bob.subscribe(room, () => {});
    assert.deepEqual(await joined, { channel: room, user: 'bob' });
    assert.deepEqual(alice.members(room), ['alice', 'bob']);
    assert.deepEqual(log.at(-1), { kind: 'members', channel: room, members: ['alice', 'bob'], count: 2 });
    assert.deepEqual(await bob.presence(room), { count: 2, users: ['alice', 'bob'] });
    assert.equal(bob.members(room), null, 'bob did not ask for presence');

    // A second tab of bob's is no new join.
    const bob2 = makeClient(g, { sub: 'bob' });
    await bob2.connect();
    await bob2.subscribe(room, () => {});
    await alice.ping();
    assert.equal(log.filter((e) => e.kind === 'join' && e.user === 'bob').length, 1);

    // His last subscription ends: the leave follows after the grace.
    bob2.close();
    const left = waitEvent(alice, 'leave');
    const t0 = Date.now();
    bob.close();
    assert.deepEqual(await left, { channel: room, user: 'bob' });
    const after = Date.now() - t0;
    assert.ok(after >= 250, `leave ${after} ms after the last tab closed (grace 300 ms)`);
    assert.deepEqual(alice.members(room), ['alice']);
    assert.deepEqual(log.at(-1), { kind: 'members', channel: room, members: ['alice'], count: 1 });
    // Her own join came too (after her ok), as every watcher sees it.
    assert.deepEqual(log.filter((e) => e.kind !== 'members').map((e) => `${e.kind} ${e.user}`),
      ['join alice', 'join bob', 'leave bob']);

    // Unsubscribing forgets the view.
    await alice.unsubscribe(room);
    assert.equal(alice.members(room), null);
  });
});

test('presence: presence() answers count and users; no_presence and forbidden reject', async (t) => {
  t.after(closeAll);
  const { Spy, sent } = spyWebSocket();
  const c = makeClient(gw, { sub: 'pat', WebSocket: Spy });
  const other = makeClient(gw, { sub: 'quinn' });
  await Promise.all([c.connect(), other.connect()]);
  assert.equal(ErrorCode.NO_PRESENCE, 'no_presence');

  assert.deepEqual(await c.presence('chat:nobody-here'), { count: 0, users: [] });
  await other.subscribe('chat:asked', () => {});
  assert.deepEqual(await c.presence('chat:asked'), { count: 1, users: ['quinn'] }, 'no subscription needed');

  // user:<sub> channels keep no presence: no subscription is made.
  await assert.rejects(c.subscribe('user:pat', () => {}, { presence: true }), (err) => {
    assert.ok(err instanceof WsgateError);
    assert.equal(err.code, ErrorCode.NO_PRESENCE);
    assert.equal(err.channel, 'user:pat');
    return true;
  });
  assert.equal(c.members('user:pat'), null);
  await assert.rejects(c.presence('user:pat'), (err) => err instanceof WsgateError && err.code === 'no_presence');
  await assert.rejects(c.presence('secret'), { code: 'forbidden', channel: 'secret' });
  await assert.rejects(c.subscribe('chat:x', () => {}, { presence: 'yes' }), TypeError);
  assert.equal(c.state, 'open', 'the connection stays open');

  // Without presence the same channel subscribes, and the refused one was not remembered.
  await c.subscribe('user:pat', () => {});
  assert.deepEqual(sent.filter((f) => f.op === 'subscribe').map((f) => [f.channel, f.presence]),
    [['user:pat', true], ['user:pat', undefined]]);
});

test('presence: after a forced reconnect the listing is fetched again', async () => {
  await withGateway({ env: SHORT_GRACE }, async (g) => {
    const { Spy, sent, sockets } = spyWebSocket();
    // alice's reconnect waits until the test lets it through.
    let gate = Promise.resolve();
    const alice = makeClient(g, {
      sub: 'alice', WebSocket: Spy, getToken: async () => { await gate; return g.token('alice', ['member']); },
    });
    const bob = makeClient(g, { sub: 'bob' });
    const carol = makeClient(g, { sub: 'carol' });
    await Promise.all([alice.connect(), bob.connect(), carol.connect()]);
    const room = 'chat:again';
    await bob.subscribe(room, () => {});
    await alice.subscribe(room, () => {}, { presence: true });
    assert.deepEqual(alice.members(room), ['alice', 'bob']);

    // alice's connection drops; while she is away bob leaves and carol comes.
    let open;
    gate = new Promise((resolve) => { open = resolve; });
    const away = waitEvent(alice, 'state', (s) => s.state === 'reconnecting');
    sockets.at(-1).terminate();
    await away;
    bob.close();
    await carol.subscribe(room, () => {});
    await eventually('bob gone', async () => {
      const { users } = await carol.presence(room);
      return !users.includes('bob');
    });
    assert.deepEqual(alice.members(room), ['alice', 'bob'], 'the view from before, while away');

    sent.length = 0;
    const log = presenceLog(alice);
    const reopened = waitEvent(alice, 'state', (s) => s.state === 'open');
    open();
    await reopened;
    assert.deepEqual(sent.filter((f) => f.channel === room).map((f) => [f.op, f.presence]),
      [['subscribe', true], ['presence', undefined]], 'subscribed with presence again, then listed');
    assert.deepEqual(alice.members(room), ['alice', 'carol']);
    assert.deepEqual(log.filter((e) => e.kind === 'members').at(-1),
      { kind: 'members', channel: room, members: ['alice', 'carol'], count: 2 });

    // And it is followed live again.
    const left = waitEvent(alice, 'leave', (e) => e.user === 'carol');
    await carol.unsubscribe(room);
    await left;
    assert.deepEqual(alice.members(room), ['alice']);
  });
});

test('presence: above the listed limit only a count, and no frames; back within it, listed again', async () => {
  await withGateway({ env: { WSGATE_PRESENCE_MAX_LISTED: '2', WSGATE_PRESENCE_GRACE_MS: '0' } }, async (g) => {
    const room = 'chat:crowd';
    const [alice, bob, carol] = ['alice', 'bob', 'carol'].map((sub) => makeClient(g, { sub }));
    await Promise.all([alice.connect(), bob.connect(), carol.connect()]);
    await bob.subscribe(room, () => {});
    await carol.subscribe(room, () => {});
    const log = presenceLog(alice);
    await alice.subscribe(room, () => {}, { presence: true });
    assert.equal(alice.members(room), null, 'three members: more than can be listed');
    assert.deepEqual(log, [{ kind: 'members', channel: room, members: null, count: 3 }], 'no join frame either');
    assert.deepEqual(await alice.presence(room), { count: 3, users: null });

    // carol leaves: two members, within the limit: frames again, and the view is listed.
    const listed = waitEvent(alice, 'members', (e) => e.members !== null);
    await carol.unsubscribe(room);
    assert.deepEqual(await listed, { channel: room, members: ['alice', 'bob'], count: 2 });
    assert.deepEqual(alice.members(room), ['alice', 'bob']);
    assert.ok(log.some((e) => e.kind === 'leave' && e.user === 'carol'), 'the leave is passed on');
  });
});
