// Clients for the rolling-restart test (tests/it/haproxy.rs): N wsgate.js
// clients under Node subscribe to one channel through the load balancer,
// resume across reconnects, and stop at a message whose data is
// {"end": true}. Prints one JSON line per client:
// {"client", "seqs": [...], "reconnects", "unrecovered": [...]}.
//
// Usage: node roll_js.mjs URL CHANNEL   (stdin: one token per line, one per client)
// Environment: WSGATE_CA (the CA file to trust).
import { readFileSync } from 'node:fs';
import WS from 'ws';
import { WsgateClient } from '../wsgate.js';

const [url, channel] = process.argv.slice(2);
const tokens = readFileSync(0, 'utf8').split('\n').filter(Boolean);
const ca = readFileSync(process.env.WSGATE_CA);

async function run(token, i) {
  const seqs = [];
  const unrecovered = [];
  let reconnects = 0;
  const client = new WsgateClient(url, {
    getToken: async () => token,
    WebSocket: WS,
    carrier: 'header',
    wsOptions: { ca },
    backoff: { initialMs: 50, maxMs: 500 },
  });
  client.on('unrecovered', (u) => {
    unrecovered.push(u.reason);
    if (process.env.ROLL_DEBUG) console.error(`js${i} unrecovered`, JSON.stringify(u));
  });
  client.on('error', (e) => { if (process.env.ROLL_DEBUG) console.error(`js${i} error`, e.code, e.message); });
  client.on('state', (s) => {
    if (s.state === 'reconnecting') reconnects += 1;
    if (process.env.ROLL_DEBUG) console.error(`js${i}`, s.state, s.code ?? '', s.delayMs ?? '');
  });
  client.on('closed', (c) => { if (process.env.ROLL_DEBUG) console.error(`js${i} closed`, JSON.stringify(c)); });
  let done;
  const ended = new Promise((resolve) => { done = resolve; });
  await client.connect();
  await client.subscribe(channel, (m) => {
    if (m.data && m.data.end === true) done();
    else seqs.push(m.seq);
    if (process.env.ROLL_DEBUG === '2') console.error(`js${i} msg`, m.seq);
  });
  console.log(JSON.stringify({ event: 'subscribed', client: `js${i}` }));
  await ended;
  client.close();
  return { client: `js${i}`, seqs, reconnects, unrecovered };
}

const timer = setTimeout(() => { console.error('roll_js: timed out'); process.exit(2); }, 60_000);
const results = await Promise.all(tokens.map(run));
clearTimeout(timer);
// Exit as soon as the results are written; a pipe is written
// asynchronously, so only in the write's callback.
process.stdout.write(results.map((r) => `${JSON.stringify(r)}\n`).join(''), () => process.exit(0));
