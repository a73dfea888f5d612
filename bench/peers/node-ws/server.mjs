// The baseline peer of wsgate's benchmarks: the broadcast server a user
// would write by hand with Node's `https`, the `ws` library and
// `jsonwebtoken`. It checks an HS256 token at the upgrade (from
// `Authorization: Bearer <jwt>` or the `bearer.<jwt>` subprotocol entry next
// to `wsgate.v1`), refuses with 401 otherwise, broadcasts every text message
// to every open client, and pings every 25 s, dropping clients that missed
// a pong.
//
// Configuration (environment):
//   PORT         port to listen on (default 8443; 0 lets the OS choose)
//   HOST         address to listen on (default 127.0.0.1)
//   CERT, KEY    PEM files of the server certificate (chain) and its key
//   SECRET_FILE  HMAC secret: the file's bytes less one trailing newline
//   HEARTBEAT_MS ping interval (default 25000)
//
// Prints `listening <port>` on stdout once it listens.
import { createServer } from 'node:https';
import { createSecretKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import jwt from 'jsonwebtoken';
import { WebSocketServer, WebSocket } from 'ws';

const HEARTBEAT_MS = Number(process.env.HEARTBEAT_MS || 25_000);
const SUBPROTOCOL = 'wsgate.v1';

function need(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`node-ws peer: set ${name}`);
    process.exit(2);
  }
  return value;
}

const port = Number(process.env.PORT ?? 8443);
const host = process.env.HOST || '127.0.0.1';
const cert = readFileSync(need('CERT'));
const key = readFileSync(need('KEY'));

// The same secret bytes as wsgate's `auth.hmac_secret_file`: one trailing
// "\n" (or "\r\n") is not part of the secret. A KeyObject made once, so
// jsonwebtoken does not re-parse the secret on every verification.
let secretBytes = readFileSync(need('SECRET_FILE'));
if (secretBytes.at(-1) === 0x0a) secretBytes = secretBytes.subarray(0, -1);
if (secretBytes.at(-1) === 0x0d) secretBytes = secretBytes.subarray(0, -1);
const secret = createSecretKey(secretBytes);

/** The token from the Authorization header or the subprotocol list, or null. */
function tokenOf(req) {
  const auth = req.headers.authorization;
  if (auth !== undefined) {
    const m = /^Bearer +(\S+)$/i.exec(auth);
    return m ? m[1] : null;
  }
  const offered = (req.headers['sec-websocket-protocol'] ?? '')
    .split(',')
    .map((p) => p.trim());
  const bearer = offered.filter((p) => p.startsWith('bearer.'));
  if (bearer.length !== 1 || !offered.includes(SUBPROTOCOL)) return null;
  return bearer[0].slice('bearer.'.length);
}

/** The verified claims, or null. */
function authenticate(req) {
  const token = tokenOf(req);
  if (!token) return null;
  try {
    const claims = jwt.verify(token, secret, { algorithms: ['HS256'], clockTolerance: 30 });
    if (typeof claims.sub !== 'string' || claims.sub === '' || claims.exp === undefined) return null;
    return claims;
  } catch {
    return null;
  }
}

function refuse(socket, status, reason, extra = '') {
  socket.once('finish', () => socket.destroy());
  socket.end(`HTTP/1.1 ${status} ${reason}\r\nConnection: close\r\n${extra}Content-Length: 0\r\n\r\n`);
}

const server = createServer({ cert, key }, (req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 426, { 'content-type': 'text/plain' });
  res.end(req.url === '/healthz' ? 'ok\n' : 'upgrade required\n');
});

const wss = new WebSocketServer({
  noServer: true,
  clientTracking: true,
  handleProtocols: (protocols) => (protocols.has(SUBPROTOCOL) ? SUBPROTOCOL : false),
});

server.on('upgrade', (req, socket, head) => {
  const onSocketError = () => socket.destroy();
  socket.on('error', onSocketError);
  const path = req.url.split('?')[0];
  if (path !== '/ws') return refuse(socket, 404, 'Not Found');
  const claims = authenticate(req);
  if (!claims) return refuse(socket, 401, 'Unauthorized', 'WWW-Authenticate: Bearer\r\n');
  socket.removeListener('error', onSocketError);
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req, claims));
});

wss.on('connection', (ws) => {
  ws.isAlive = true;
  ws.on('pong', () => { ws.isAlive = true; });
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(data, { binary: false });
    }
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, HEARTBEAT_MS);

server.on('tlsClientError', () => {});

server.listen(port, host, () => {
  console.log(`listening ${server.address().port}`);
});

function shutdown() {
  clearInterval(heartbeat);
  for (const ws of wss.clients) ws.terminate();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
