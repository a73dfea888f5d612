// wsgate.js: the JavaScript client of the wsgate wire contract, version 1.1
// (docs/protocol.md). A dependency-free ES module for browsers and Node.
//
//   import { WsgateClient } from './wsgate.js';
//   const client = new WsgateClient('wss://gw.example.com/ws', { getToken });
//   await client.connect();
//   await client.subscribe('chat:lobby', (m) => console.log(m.from, m.data));
//   await client.publish('chat:lobby', { text: 'hi' });
//   const { messages } = await client.history('chat:lobby', 50);
//   client.on('unrecovered', ({ channel, reason }) => resync(channel));
//
//   // Presence (1.1): who is in a channel, kept up to date.
//   await client.subscribe('chat:room', onMessage, { presence: true });
//   client.members('chat:room'); // ['alice', 'bob'], or null above the limit
//   client.on('members', ({ channel, members, count }) => render(channel, members, count));
//   client.on('join', ({ channel, user }) => say(`${user} joined ${channel}`));
//   const { count, users } = await client.presence('chat:other'); // a one-off look
//
// On a channel that keeps history the client remembers the last position
// (epoch and seq) it saw and resumes from it on every reconnect (1001 from
// a draining gateway included): what was missed is replayed before live
// messages, each exactly once. When that is not possible the gateway says
// why, and the client emits 'unrecovered' so the application can resync.
//
// On a channel that keeps presence, `subscribe(..., { presence: true })`
// fetches the member listing after every (re)subscribe and then follows
// the gateway's `join` and `leave` frames, so members() is the current
// view. Above the gateway's listed-members limit there is only a count,
// and no join or leave frames at all (storm control).
//
// In Node 20 pass the `ws` package's WebSocket: `{ WebSocket, wsOptions: { ca } }`.

/** Close codes of the contract (plus 1006, what a client sees when no close frame arrived). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  INVALID_PAYLOAD: 1007,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  TOKEN_EXPIRED: 4001,
  DISCONNECTED: 4003,
  TOO_SLOW: 4008,
});

/** Error codes of `error` frames, and the two the client makes up itself. */
export const ErrorCode = Object.freeze({
  BAD_REQUEST: 'bad_request',
  FORBIDDEN: 'forbidden',
  NOT_SUBSCRIBED: 'not_subscribed',
  NO_HISTORY: 'no_history',
  NO_PRESENCE: 'no_presence',
  RATE_LIMITED: 'rate_limited',
  TOO_MANY_SUBSCRIPTIONS: 'too_many_subscriptions',
  TOKEN_MISMATCH: 'token_mismatch',
  INVALID_TOKEN: 'invalid_token',
  INTERNAL: 'internal',
  TIMEOUT: 'timeout',
  CLOSED: 'closed',
});

const CLOSE_TEXT = {
  1000: 'the connection was closed normally',
  1001: 'the server is restarting or shutting down',
  1002: 'the connection broke the WebSocket protocol',
  1003: 'the server does not accept binary messages',
  1005: 'the connection closed without a reason',
  1006: 'the connection was lost',
  1007: 'a message was not valid UTF-8 text',
  1008: 'too many malformed messages were sent',
  1009: 'a message was too big',
  1011: 'the server hit an internal error',
  4001: 'your session expired',
  4003: 'the server disconnected you; a new token is needed',
  4008: 'the connection was too slow or sent too many messages',
};

/** A human sentence for a close code. */
export function describeClose(code) {
  if (Object.prototype.hasOwnProperty.call(CLOSE_TEXT, code)) return CLOSE_TEXT[code];
  if (code >= 4000 && code <= 4999) return `the server closed the connection (code ${code})`;
  return `the connection closed (code ${code})`;
}

/** An error of a request (`code` from the contract), or 'timeout' / 'closed'. */
export class WsgateError extends Error {
  constructor(code, message = code, { channel, id, status } = {}) {
    super(message);
    this.name = 'WsgateError';
    this.code = code;
    this.channel = channel;
    if (id !== undefined) this.id = id;
    if (status !== undefined) this.status = status;
  }
}

/**
 * How long to wait before reconnecting after a close with `code`, as the
 * `attempt`-th reconnect in a row (0 for the first). Pure. null: do not
 * reconnect.
 *
 * - 1000: never (a normal close is only ever one the client started).
 * - 1001 (draining): soon, 100–1000 ms, jittered so a restart's clients spread.
 * - 4001 (expired): right away with a small jitter (0–250 ms); the client
 *   fetches a fresh token for the new connection.
 * - 4003 (disconnected by the server): the same; the client asks getToken
 *   for a new token and stops if that fails.
 * - 4008 (too slow / rate): at least 5 s, plus full jitter over an
 *   exponential window starting at 5 s, capped at max(maxMs, 5 s).
 * - anything else (1006 included): full jitter over initialMs·2^attempt,
 *   capped at maxMs.
 */
export function reconnectDelay(code, attempt, { initialMs = 500, maxMs = 30000 } = {}, random = Math.random) {
  const n = Math.max(0, Math.floor(attempt) || 0);
  const window = (base, cap) => Math.min(cap, base * 2 ** Math.min(n, 30));
  switch (code) {
    case CloseCode.NORMAL:
      return null;
    case CloseCode.GOING_AWAY:
      return Math.round(100 + random() * 900);
    case CloseCode.TOKEN_EXPIRED:
    case CloseCode.DISCONNECTED:
      return Math.round(random() * 250);
    case CloseCode.TOO_SLOW: {
      const floor = 5000;
      return Math.round(floor + random() * window(floor, Math.max(maxMs, floor)));
    }
    default:
      return Math.round(random() * window(Math.max(1, initialMs), Math.max(maxMs, initialMs)));
  }
}

// HTTP answers to the upgrade that mean "stop": retrying cannot help.
const FATAL_STATUS = new Set([400, 401, 403, 404, 426]);

const now = () => (globalThis.performance && typeof performance.now === 'function' ? performance.now() : Date.now());

/** The `exp` (unix s) of a JWT, or undefined. */
function jwtExp(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (part.length % 4)) % 4);
    const json = decodeURIComponent(Array.from(atob(b64), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''));
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' ? exp : undefined;
  } catch {
    return undefined;
  }
}

function rethrowLater(err) {
  setTimeout(() => { throw err; }, 0);
}

/** The URL of `/readyz` on the host of a `wss://` (or `ws://`) URL. */
function readyzUrl(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'ws:' ? 'http:' : 'https:';
  u.pathname = '/readyz';
  u.search = '';
  u.hash = '';
  return u.toString();
}

export class WsgateClient {
  constructor(url, {
    getToken,
    WebSocket = globalThis.WebSocket,
    carrier = 'subprotocol',
    wsOptions = {},
    requestTimeoutMs = 10000,
    pingIntervalMs = 20000,
    refreshMarginMs = 60000,
    backoff = { initialMs: 500, maxMs: 30000 },
    random = Math.random,
    // Extras (not needed by most callers):
    connectTimeoutMs = 10000, // upgrade + `welcome` must arrive within this
    fetch = globalThis.fetch, // for the /readyz probe when the WebSocket hides HTTP statuses
  } = {}) {
    if (typeof getToken !== 'function') throw new TypeError('WsgateClient: getToken is required');
    if (typeof WebSocket !== 'function') throw new TypeError('WsgateClient: no WebSocket implementation (pass the `ws` package\'s WebSocket in Node)');
    if (carrier !== 'subprotocol' && carrier !== 'header') throw new TypeError(`WsgateClient: unknown carrier ${carrier}`);
    this.url = url;
    this._opts = {
      getToken, WebSocket, carrier, wsOptions, requestTimeoutMs, pingIntervalMs,
      refreshMarginMs, backoff: { initialMs: 500, maxMs: 30000, ...backoff }, random, connectTimeoutMs, fetch,
    };
    this._state = 'idle';
    this._listeners = new Map();
    // channel -> { handler, waiters: [{resolve, reject}], confirmed,
    //              position: {epoch, seq} | null (history channels),
    //              presence: asked for join/leave frames,
    //              members: {users: sorted [] | null, count} | null (not known yet),
    //              listing: a presence request of the client's own is on its way }
    this._subs = new Map();
    this._pending = new Map(); // id -> { resolve, reject, timer, op, channel }
    this._nextId = 1;
    this._ws = null; // the current socket
    this._ready = false; // the current socket got its welcome
    this._gen = 0; // bumped per connection attempt and by close(): stale callbacks check it
    this._attempt = 0;
    this._upButFailed = false; // the browser path's first "failed, yet /readyz is 200"
    this._disconnected = false; // closed with 4003: a failing getToken ends the client
    this._timers = { reconnect: null, connect: null, ping: null, refresh: null };
    this._welcome = null;
    this._expiresAtMs = undefined;
    this._connectWaiters = [];
  }

  get state() { return this._state; }

  /** The last `welcome` frame, or null. */
  get welcome() { return this._welcome; }

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return this;
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
    return this;
  }

  _emit(event, arg) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try { fn(arg); } catch (err) { rethrowLater(err); }
    }
  }

  _setState(state, extra = {}) {
    const changed = this._state !== state;
    this._state = state;
    // 'reconnecting' is announced again for each scheduled attempt (new delayMs).
    if (changed || state === 'reconnecting') this._emit('state', { state, ...extra });
  }

  /**
   * Connects (retrying per the reconnect policy). Resolves with the
   * `welcome` frame once open and every remembered channel is subscribed
   * again; rejects with WsgateError('closed') when the client ends in
   * 'closed' first (refused upgrade, close()).
   */
  connect() {
    if (this._state === 'open') return Promise.resolve(this._welcome);
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this._state === 'idle' || this._state === 'closed') {
      this._attempt = 0;
      this._upButFailed = false;
      this._setState('connecting');
      this._open();
    }
    return p;
  }

  /** Closes with 1000 and stops reconnecting. */
  close() {
    if (this._state === 'closed' || this._state === 'idle') {
      this._state = 'closed';
      const err = new WsgateError('closed', 'the client was closed');
      for (const [, entry] of this._subs) for (const w of entry.waiters.splice(0)) w.reject(err);
      return;
    }
    this._gen++;
    const ws = this._ws;
    this._teardown(new WsgateError('closed', 'the client closed the connection'));
    if (ws) {
      try { ws.close(1000, 'client closed'); } catch { /* already closing */ }
    }
    this._finish({ code: 1000, reason: 'client closed' });
  }

  /**
   * Subscribes `handler` to `channel`'s messages, now or as soon as a
   * connection opens. `since` ({epoch, seq}, e.g. saved by the application
   * from position()) resumes from there; otherwise the client resumes from
   * what it saw itself after every reconnect.
   *
   * `presence: true` (a channel that keeps presence, else the error
   * `no_presence`) also follows who is in the channel: remembered like the
   * channel, so every resubscribe after a reconnect asks again and fetches
   * the listing anew (what changed while away came in no frame). Resolves
   * once that first listing is in, so members() answers right away.
   */
  async subscribe(channel, handler, { since, presence } = {}) {
    if (typeof handler !== 'function') throw new TypeError('subscribe: handler must be a function');
    if (presence !== undefined && typeof presence !== 'boolean') throw new TypeError('subscribe: presence must be a boolean');
    let entry = this._subs.get(channel);
    if (entry) {
      entry.handler = handler;
    } else {
      entry = {
        handler, waiters: [], confirmed: false, position: null, presence: false, members: null, listing: false,
      };
      this._subs.set(channel, entry);
    }
    if (presence !== undefined && presence !== entry.presence) {
      entry.presence = presence;
      entry.members = null; // a view only while following the frames
    }
    if (since && typeof since.epoch === 'string' && Number.isInteger(since.seq)) {
      entry.position = { epoch: since.epoch, seq: since.seq };
    }
    if (!this._ready) {
      if (this._state === 'closed') {
        this._subs.delete(channel);
        throw new WsgateError('closed', 'the client is closed', { channel });
      }
      // Remembered: subscribed as soon as a connection opens (connect() when idle).
      return new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
    }
    return this._subscribeNow(channel, entry);
  }

  async _subscribeNow(channel, entry) {
    const since = entry.position ? { epoch: entry.position.epoch, seq: entry.position.seq } : undefined;
    const frame = { op: 'subscribe', channel };
    if (since) frame.since = since;
    const presence = entry.presence;
    if (presence) {
      frame.presence = true;
      // The listing asked for after the ok counts every frame that comes
      // before it (maybe in the same read as the ok): until then a frame
      // asks for no listing of its own.
      entry.listing = true;
    }
    let ok;
    try {
      ok = await this._request(frame);
    } catch (err) {
      if (presence) entry.listing = false;
      if (err.code === ErrorCode.NO_PRESENCE && entry.confirmed && this._subs.get(channel) === entry) {
        // Presence asked for on a subscription that stands: it goes on without.
        entry.presence = false;
        entry.members = null;
      } else if (err.code !== 'closed' && err.code !== 'timeout' && this._subs.get(channel) === entry) {
        // Refused by the gateway: forget it.
        this._subs.delete(channel);
        for (const w of entry.waiters.splice(0)) w.reject(err);
      }
      throw err;
    }
    entry.confirmed = true;
    if (typeof ok?.epoch === 'string' && Number.isInteger(ok.seq)) {
      // Recovered: the replay that follows the ok moves the position on.
      // Otherwise (a first subscribe, or nothing replayed) it starts here.
      if (!(since && ok.recovered === true)) entry.position = { epoch: ok.epoch, seq: ok.seq };
    }
    if (since && ok?.recovered === false) {
      this._emit('unrecovered', {
        channel, reason: ok.reason, since, epoch: ok.epoch, seq: ok.seq,
      });
    }
    if (presence) await this._fetchMembers(channel, entry);
    for (const w of entry.waiters.splice(0)) w.resolve();
  }

  /**
   * Fetches the listing of a presence-subscribed channel into its view.
   * A failure leaves the view as it was (the next reconnect, or the next
   * frame, fetches again); the subscription itself stands.
   */
  async _fetchMembers(channel, entry) {
    entry.listing = true;
    try {
      await this.presence(channel);
    } catch (err) {
      if (err.code !== 'closed' && err.code !== 'timeout' && this._subs.get(channel) === entry) this._emit('error', err);
    } finally {
      entry.listing = false;
    }
  }

  /**
   * A `join` or `leave` frame. Applied to a listed view, it is news only
   * when it changes it (a join of a user listed, or a leave of one not
   * listed, changes nothing). Without a listed view it is passed on as
   * it is: either the listing is on its way (and counts it already), or
   * the channel was above the limit, and a frame means it is back within
   * it: list it again.
   */
  _onMembership(kind, channel, user) {
    const entry = this._subs.get(channel);
    if (!entry || !entry.presence || typeof user !== 'string') return;
    const view = entry.members;
    if (!view || !view.users) {
      this._emit(kind, { channel, user });
      if (!entry.listing && entry.confirmed && this._ready) this._fetchMembers(channel, entry);
      return;
    }
    const { users } = view;
    let i = 0;
    while (i < users.length && users[i] < user) i++;
    const listed = users[i] === user;
    if (kind === 'join') {
      if (listed) return;
      users.splice(i, 0, user);
    } else {
      if (!listed) return;
      users.splice(i, 1);
    }
    view.count = users.length;
    this._emit(kind, { channel, user });
    this._emitMembers(channel, view);
  }

  /** Replaces the view with a listing; 'members' when that changes it. */
  _setMembers(channel, entry, { count, users }) {
    const old = entry.members;
    const view = { count, users: users ? [...users].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)) : null };
    entry.members = view;
    const same = old && old.count === view.count && (old.users === null) === (view.users === null)
      && (!view.users || view.users.every((u, i) => old.users[i] === u));
    if (!same) this._emitMembers(channel, view);
  }

  _emitMembers(channel, view) {
    this._emit('members', { channel, members: view.users ? [...view.users] : null, count: view.count });
  }

  /** Resubscribes `channel` from its last position (after a gap notice). */
  async _recover(channel) {
    const entry = this._subs.get(channel);
    if (!entry || !this._ready) return;
    try {
      await this._request({ op: 'unsubscribe', channel });
    } catch (err) {
      if (err.code !== 'not_subscribed') return; // closed: the reconnect resumes
    }
    if (this._subs.get(channel) !== entry) return;
    await this._subscribeNow(channel, entry).catch((err) => {
      if (err.code !== 'closed' && err.code !== 'timeout') this._emit('error', err);
    });
  }

  /** The last position seen on a history channel ({epoch, seq}), or null. */
  position(channel) {
    const p = this._subs.get(channel)?.position;
    return p ? { epoch: p.epoch, seq: p.seq } : null;
  }

  /**
   * The client's view of who is in a channel subscribed with presence:
   * user ids, sorted. null when not known yet, when the channel has more
   * members than the gateway lists (the 'members' event still has the
   * count), or when the subscription did not ask for presence. While a
   * reconnect is on its way it is the view from before, until the
   * listing is fetched again.
   */
  members(channel) {
    const users = this._subs.get(channel)?.members?.users;
    return users ? [...users] : null;
  }

  /**
   * Who is in a channel that keeps presence, now: { count, users }, users
   * sorted, or null above the gateway's listed-members limit. Needs the
   * subscribe permission only, not a subscription. On a channel this
   * client follows with presence, the answer also becomes its view.
   */
  async presence(channel) {
    const ok = await this._request({ op: 'presence', channel });
    const listing = { count: ok.count, users: Array.isArray(ok.users) ? ok.users : null };
    // Every join and leave before the reply is in it; those after it follow.
    const entry = this._subs.get(channel);
    if (entry?.presence) this._setMembers(channel, entry, listing);
    return { count: listing.count, users: listing.users ? [...listing.users] : null };
  }

  /**
   * The last `limit` (1–1000, default 50) messages of a history channel,
   * oldest first: { epoch, seq, messages: [{from, seq, data}] }.
   */
  async history(channel, limit = 50) {
    const ok = await this._request({ op: 'history', channel, limit });
    return { epoch: ok.epoch, seq: ok.seq, messages: ok.messages ?? [] };
  }

  /** Stops the messages (and, with presence, forgets the members view). */
  async unsubscribe(channel) {
    const entry = this._subs.get(channel);
    this._subs.delete(channel);
    if (entry) {
      for (const w of entry.waiters.splice(0)) w.reject(new WsgateError('closed', 'unsubscribed', { channel }));
    }
    if (!this._ready) return;
    try {
      await this._request({ op: 'unsubscribe', channel });
    } catch (err) {
      if (err.code !== 'not_subscribed') throw err; // already ended: the wanted state
    }
  }

  async publish(channel, data) {
    await this._request({ op: 'publish', channel, data: data === undefined ? null : data });
  }

  async ping() {
    const t0 = now();
    await this._request({ op: 'ping' });
    return now() - t0;
  }

  /** Sends `refresh` with a fresh getToken(); reschedules the automatic refresh. */
  async refresh() {
    const token = await this._opts.getToken();
    const gen = this._gen;
    await this._request({ op: 'refresh', token });
    if (gen !== this._gen) return;
    const exp = jwtExp(token);
    if (exp !== undefined) this._expiresAtMs = exp * 1000;
    this._scheduleRefresh(true);
  }

  // ---- requests ----

  _request(frame) {
    if (!this._ready || !this._ws) {
      return Promise.reject(new WsgateError('closed', 'not connected', { channel: frame.channel }));
    }
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new WsgateError('timeout', `no reply to ${frame.op} within ${this._opts.requestTimeoutMs} ms`, { channel: frame.channel, id }));
      }, this._opts.requestTimeoutMs);
      this._pending.set(id, { resolve, reject, timer, op: frame.op, channel: frame.channel });
      try {
        this._ws.send(JSON.stringify({ ...frame, id }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new WsgateError('closed', `send failed: ${err.message}`, { channel: frame.channel, id }));
      }
    });
  }

  _rejectPending(err) {
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new WsgateError(err.code, err.message, { channel: p.channel, id }));
    }
    this._pending.clear();
  }

  // ---- connection lifecycle ----

  async _open() {
    const gen = ++this._gen;
    const { getToken, WebSocket, carrier, wsOptions, connectTimeoutMs } = this._opts;
    let token;
    try {
      token = await getToken();
    } catch (err) {
      if (gen !== this._gen) return;
      if (this._disconnected) {
        // Thrown out by the server (4003), and no new token to come back with.
        this._finish({ code: CloseCode.DISCONNECTED, reason: `getToken failed after 4003: ${err?.message ?? err}` });
        return;
      }
      this._lost(1006, `getToken failed: ${err?.message ?? err}`);
      return;
    }
    if (gen !== this._gen) return;

    let ws;
    try {
      if (carrier === 'header') {
        const headers = { ...(wsOptions.headers ?? {}), Authorization: `Bearer ${token}` };
        ws = new WebSocket(this.url, ['wsgate.v1'], { ...wsOptions, headers });
      } else if (wsOptions && Object.keys(wsOptions).length > 0) {
        ws = new WebSocket(this.url, ['wsgate.v1', `bearer.${token}`], wsOptions);
      } else {
        ws = new WebSocket(this.url, ['wsgate.v1', `bearer.${token}`]);
      }
    } catch (err) {
      this._lost(1006, `cannot open a WebSocket: ${err?.message ?? err}`);
      return;
    }
    this._ws = ws;
    this._ready = false;
    const conn = { opened: false, refused: null, token };

    this._timers.connect = setTimeout(() => {
      if (gen !== this._gen) return;
      this._abandon(ws);
      this._lost(1006, `no welcome within ${connectTimeoutMs} ms`);
    }, connectTimeoutMs);

    // The `ws` package tells the HTTP status of a refused upgrade; browsers do not.
    const hasStatus = typeof ws.on === 'function';
    if (hasStatus) {
      ws.on('unexpected-response', (req, res) => {
        const retryAfter = Number(res.headers?.['retry-after']);
        conn.refused = { status: res.statusCode, ...(Number.isFinite(retryAfter) ? { retryAfterS: retryAfter } : {}) };
        res.resume?.();
        ws.terminate(); // emits error + close (1006)
      });
    }
    const on = (type, fn) => {
      if (typeof ws.addEventListener === 'function') ws.addEventListener(type, fn);
      else ws[`on${type}`] = fn;
    };
    on('open', () => { conn.opened = true; });
    on('error', () => { /* the close event follows */ });
    on('message', (ev) => {
      if (gen !== this._gen) return;
      if (typeof ev.data !== 'string') return; // the gateway sends text only
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      if (frame && typeof frame === 'object') this._onFrame(frame, conn, gen);
    });
    on('close', (ev) => {
      if (gen !== this._gen) return;
      const code = ev.code ?? 1006;
      const reason = ev.reason ?? '';
      this._onClose(code, reason, conn, hasStatus, gen);
    });
  }

  _onFrame(frame, conn, gen) {
    switch (frame.op) {
      case 'welcome':
        this._onWelcome(frame, conn, gen);
        return;
      case 'ok':
      case 'pong':
      case 'error': {
        const p = frame.id !== undefined && frame.id !== null ? this._pending.get(frame.id) : undefined;
        if (p) {
          this._pending.delete(frame.id);
          clearTimeout(p.timer);
          if (frame.op === 'error') {
            p.reject(new WsgateError(frame.code, frame.message, { channel: frame.channel, id: frame.id }));
          } else {
            p.resolve(frame);
          }
          return;
        }
        if (frame.op === 'error' && (frame.id === undefined || frame.id === null)) {
          const err = new WsgateError(frame.code, frame.message, { channel: frame.channel });
          if (frame.code === 'forbidden' && frame.channel) {
            // The gateway ended this subscription (policy reload or refresh).
            const entry = this._subs.get(frame.channel);
            this._subs.delete(frame.channel);
            if (entry) for (const w of entry.waiters.splice(0)) w.reject(err);
          } else if (frame.code === 'internal' && frame.channel && this._subs.get(frame.channel)?.position) {
            // A replica may have missed messages (Redis gap notice): resume
            // from the last position seen, or learn the new epoch.
            this._recover(frame.channel);
          }
          this._emit('error', err);
        }
        return; // a late reply to a request that timed out
      }
      case 'message': {
        // Only for channels subscribed here: a message that still arrives
        // after unsubscribe() or an ended subscription is dropped.
        const entry = this._subs.get(frame.channel);
        if (!entry) return;
        if (entry.position && Number.isInteger(frame.seq)) {
          // Never hand the application a message twice.
          if (frame.seq <= entry.position.seq) return;
          entry.position.seq = frame.seq;
        }
        try { entry.handler(frame); } catch (err) { rethrowLater(err); }
        this._emit('message', frame);
        return;
      }
      case 'join':
      case 'leave':
        this._onMembership(frame.op, frame.channel, frame.user);
        return;
      default:
        // Unknown ops are ignored (forward compatibility).
    }
  }

  async _onWelcome(frame, conn, gen) {
    clearTimeout(this._timers.connect);
    this._timers.connect = null;
    this._ready = true;
    this._welcome = frame;
    this._expiresAtMs = typeof frame.expires_at === 'number' ? frame.expires_at * 1000 : jwtExp(conn.token) * 1000;
    this._attempt = 0; // the connection works: back-off starts again from the bottom
    this._disconnected = false;
    this._upButFailed = false;
    this._emit('welcome', frame);

    // Subscribe again to every remembered channel (pipelined), then report open.
    const channels = [...this._subs.entries()];
    await Promise.allSettled(channels.map(([channel, entry]) => this._subscribeNow(channel, entry).catch((err) => {
      if (err.code !== 'closed' && err.code !== 'timeout') this._emit('error', err);
      throw err;
    })));
    if (gen !== this._gen) return;

    this._setState('open');
    this._startPing(gen);
    this._scheduleRefresh(false);
    for (const w of this._connectWaiters.splice(0)) w.resolve(frame);
  }

  _startPing(gen) {
    const { pingIntervalMs } = this._opts;
    if (!(pingIntervalMs > 0)) return;
    clearInterval(this._timers.ping);
    let inFlight = false;
    this._timers.ping = setInterval(() => {
      if (gen !== this._gen || inFlight) return;
      inFlight = true;
      this.ping().then(() => { inFlight = false; }, (err) => {
        inFlight = false;
        if (gen !== this._gen || err.code !== 'timeout') return;
        // No pong in time: the connection is dead (or the gateway hangs).
        this._abandon(this._ws);
        this._lost(1006, 'no pong in time: connection treated as dead');
      });
    }, pingIntervalMs);
  }

  /**
   * Schedules the automatic refresh `refreshMarginMs` before expiry. After
   * a refresh, never sooner than half the new token's remaining lifetime,
   * so a margin larger than the token's lifetime cannot make a loop.
   */
  _scheduleRefresh(afterRefresh) {
    clearTimeout(this._timers.refresh);
    this._timers.refresh = null;
    const { refreshMarginMs } = this._opts;
    if (refreshMarginMs === null || refreshMarginMs === false || !Number.isFinite(this._expiresAtMs)) return;
    const left = this._expiresAtMs - Date.now();
    let delay = Math.max(0, left - refreshMarginMs);
    if (afterRefresh) delay = Math.max(delay, left / 2);
    const gen = this._gen;
    this._timers.refresh = setTimeout(() => {
      if (gen !== this._gen) return;
      this.refresh().catch((err) => {
        if (gen !== this._gen || err.code === 'closed') return;
        this._emit('error', err);
        // Try again later; if it never works, 4001 brings a new connection.
        const retryIn = Math.max(1000, (this._expiresAtMs - Date.now()) / 2);
        clearTimeout(this._timers.refresh);
        this._timers.refresh = setTimeout(() => {
          if (gen === this._gen) this._scheduleRefresh(false);
        }, retryIn);
      });
    }, delay);
  }

  /** Drops a socket without waiting for a close handshake. */
  _abandon(ws) {
    if (!ws) return;
    this._gen++; // its events no longer count
    try {
      if (typeof ws.terminate === 'function') ws.terminate();
      else ws.close(4000, 'connection treated as dead');
    } catch { /* ignore */ }
  }

  _teardown(err) {
    for (const k of ['connect', 'refresh', 'reconnect']) { clearTimeout(this._timers[k]); this._timers[k] = null; }
    clearInterval(this._timers.ping);
    this._timers.ping = null;
    this._ready = false;
    this._ws = null;
    this._rejectPending(err);
  }

  async _onClose(code, reason, conn, hasStatus, gen) {
    this._teardown(new WsgateError('closed', `connection closed (${code}${reason ? ': ' + reason : ''})`));
    // Until a connection opens again, a failing getToken ends the client.
    if (code === CloseCode.DISCONNECTED) this._disconnected = true;
    if (conn.refused) {
      const { status } = conn.refused;
      if (FATAL_STATUS.has(status)) {
        this._finish({ code, reason: `upgrade refused with HTTP ${status}`, refused: { status } });
        return;
      }
      const floor = (conn.refused.retryAfterS ?? 0) * 1000;
      this._lost(code, `upgrade refused with HTTP ${status}`, floor);
      return;
    }
    if (!conn.opened && !hasStatus) {
      // A browser hides why the upgrade failed: ask the server whether it is up.
      // Up and ready means it refused us, but only when that happens twice in
      // a row: a gateway that was just starting may fail one attempt and
      // answer the probe a moment later.
      const up = await this._probeReady();
      if (gen !== this._gen) return;
      if (up && this._upButFailed) {
        this._finish({ code, reason: 'upgrade refused (the server is up)', refused: {} });
        return;
      }
      this._upButFailed = up;
      this._lost(code, up ? 'upgrade failed while the server is up' : reason || 'the server is unreachable or not ready');
      return;
    }
    this._lost(code, reason);
  }

  /** true when GET /readyz answers 200 (the gateway is up and ready). */
  async _probeReady() {
    const { fetch, requestTimeoutMs } = this._opts;
    if (typeof fetch !== 'function') return false;
    const ctl = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = setTimeout(() => ctl?.abort(), Math.min(requestTimeoutMs, 5000));
    try {
      const res = await fetch(readyzUrl(this.url), { cache: 'no-store', signal: ctl?.signal });
      return res.status === 200;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  /** The connection is gone (or never came): schedule the next attempt, or stop. */
  _lost(code, reason, floorMs = 0) {
    this._teardown(new WsgateError('closed', `connection closed (${code}${reason ? ': ' + reason : ''})`));
    const delay = reconnectDelay(code, this._attempt, this._opts.backoff, this._opts.random);
    if (delay === null) {
      this._finish({ code, reason });
      return;
    }
    const delayMs = Math.max(delay, floorMs);
    this._attempt++;
    const gen = ++this._gen;
    this._setState('reconnecting', { code, reason, delayMs });
    this._timers.reconnect = setTimeout(() => {
      if (gen === this._gen) this._open();
    }, delayMs);
  }

  _finish({ code, reason, refused }) {
    this._gen++;
    this._teardown(new WsgateError('closed', reason || 'closed'));
    this._setState('closed', { code, reason });
    const info = { code, reason, ...(refused ? { refused } : {}) };
    this._emit('closed', info);
    const err = new WsgateError('closed', refused ? `${reason}` : `closed: ${describeClose(code)}`, refused ? { status: refused.status } : {});
    for (const w of this._connectWaiters.splice(0)) w.reject(err);
    for (const [, entry] of this._subs) for (const w of entry.waiters.splice(0)) w.reject(err);
  }
}
