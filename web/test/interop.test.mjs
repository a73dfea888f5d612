// Interop: a raw Node `ws` client (Authorization header) and a raw Python
// `websockets` client (wsgate.v1 + bearer. subprotocols) on one channel.
// Neither uses wsgate.js: this checks the gateway against two independent
// WebSocket stacks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import WS from 'ws';
import { startGateway } from './gateway.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const PYTHONPATH = process.env.WSGATE_PYTHONPATH || path.resolve(here, '..', '..', '.ci', 'cache', 'python');
const CHANNEL = 'chat:interop';

test('a Node ws client and a Python websockets client exchange messages on one channel', async () => {
  const gw = await startGateway();
  let py;
  let node;
  try {
    // --- Python: subprotocol carrier, prints JSON lines.
    py = spawn('python3', [path.join(here, 'py_client.py'), gw.url, CHANNEL, '2'], {
      env: { ...process.env, PYTHONPATH, WSGATE_TOKEN: gw.token('py-user', ['member']), WSGATE_CA: gw.caFile },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let pyErr = '';
    py.stderr.on('data', (d) => { pyErr += d; });
    const pyEvents = [];
    const pyWaiters = [];
    createInterface({ input: py.stdout }).on('line', (line) => {
      const ev = JSON.parse(line);
      pyEvents.push(ev);
      for (const w of pyWaiters.filter((x) => x.pred(ev))) w.resolve(ev);
    });
    const pyExit = new Promise((resolve) => py.once('exit', (code) => resolve(code)));
    const pyEvent = (name, ms = 10000) => new Promise((resolve, reject) => {
      const found = pyEvents.find((e) => e.event === name);
      if (found) return resolve(found);
      const timer = setTimeout(() => reject(new Error(`python: no ${name} event; stderr:\n${pyErr}`)), ms);
      pyWaiters.push({ pred: (e) => e.event === name, resolve: (e) => { clearTimeout(timer); resolve(e); } });
      pyExit.then((code) => { if (code !== 0) reject(new Error(`python exited ${code}:\n${pyErr}`)); });
    });

    // --- Node: header carrier, raw frames.
    node = new WS(gw.url, ['wsgate.v1'], {
      ca: gw.ca,
      headers: { Authorization: `Bearer ${gw.token('node-user', ['member'])}` },
    });
    const nodeFrames = [];
    const nodeWaiters = [];
    node.on('message', (data, isBinary) => {
      assert.equal(isBinary, false, 'text frames only');
      const frame = JSON.parse(data.toString());
      nodeFrames.push(frame);
      for (const w of nodeWaiters.filter((x) => x.pred(frame))) w.resolve(frame);
    });
    const nodeFrame = (pred, ms = 10000) => new Promise((resolve, reject) => {
      const found = nodeFrames.find(pred);
      if (found) return resolve(found);
      const timer = setTimeout(() => reject(new Error(`node: frame not seen; got ${JSON.stringify(nodeFrames)}`)), ms);
      nodeWaiters.push({ pred, resolve: (f) => { clearTimeout(timer); resolve(f); } });
    });

    const welcome = await nodeFrame((f) => f.op === 'welcome');
    assert.equal(welcome.user, 'node-user');
    assert.equal(node.protocol, 'wsgate.v1');
    node.send(JSON.stringify({ op: 'subscribe', id: 1, channel: CHANNEL }));
    await nodeFrame((f) => f.op === 'ok' && f.id === 1);

    const opened = await pyEvent('open');
    assert.equal(opened.subprotocol, 'wsgate.v1', 'the token is never echoed');
    await pyEvent('subscribed');

    // Node publishes first; Python publishes when it has received it.
    node.send(JSON.stringify({ op: 'publish', id: 2, channel: CHANNEL, data: { text: 'hello from node' } }));
    await nodeFrame((f) => f.op === 'ok' && f.id === 2);
    const isMsg = (f) => f.op === 'message' && f.channel === CHANNEL;
    await nodeFrame(() => nodeFrames.filter(isMsg).length >= 2);
    await pyEvent('done');
    assert.equal(await pyExit, 0, pyErr);

    const pyMsgs = pyEvents.filter((e) => e.event === 'frame' && isMsg(e.frame)).map((e) => e.frame);
    const nodeMsgs = nodeFrames.filter(isMsg);
    for (const [who, msgs] of [['node', nodeMsgs], ['python', pyMsgs]]) {
      assert.equal(msgs.length, 2, `${who} got both messages`);
      assert.deepEqual(msgs.map((m) => m.from), ['node-user', 'py-user'], `${who}: from is stamped`);
      assert.deepEqual(msgs.map((m) => m.data), [{ text: 'hello from node' }, { text: 'hello from python' }]);
      assert.equal(msgs[1].seq, msgs[0].seq + 1, `${who}: consecutive seq`);
    }
    assert.deepEqual(pyMsgs.map((m) => m.seq), nodeMsgs.map((m) => m.seq), 'the same seq for everyone');
    // Python's publish got its ok before its own echo.
    const pyFrames = pyEvents.filter((e) => e.event === 'frame').map((e) => e.frame);
    const okIdx = pyFrames.findIndex((f) => f.op === 'ok' && f.id === 2);
    const echoIdx = pyFrames.findIndex((f) => isMsg(f) && f.from === 'py-user');
    assert.ok(okIdx >= 0 && okIdx < echoIdx, 'ok of a publish before its echo');
  } finally {
    if (py && py.exitCode === null) py.kill('SIGTERM');
    if (node) node.terminate();
    await gw.dispose();
  }
});
