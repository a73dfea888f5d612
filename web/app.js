// The wsgate demo chat. A plain ES module, no build step, loaded under a
// strict CSP (scripts and styles from 'self' only), so nothing is inline.
// Everything that comes from the network or the user is rendered with
// textContent, never innerHTML.
//
// wsgate.js does the protocol work: it reconnects with back-off, asks
// getToken() for a token at every (re)connect and before expiry (refresh),
// and re-subscribes every channel it remembers after each reconnect. This
// page keeps its own list of joined channels only to show them. In rooms
// (chat:*) it also asks for presence, and shows who is in the room as
// wsgate.js keeps it up to date (the listing, then join and leave).
import { WsgateClient, WsgateError, describeClose, CloseCode } from './wsgate.js';

const $ = (id) => document.getElementById(id);
const ui = {
  state: $('state'),
  whoami: $('whoami'),
  connCard: $('conn-card'),
  connSummary: $('conn-summary'),
  token: $('token'),
  tokenInfo: $('token-info'),
  connect: $('connect'),
  disconnect: $('disconnect'),
  devPanel: $('dev-panel'),
  devUser: $('dev-user'),
  devRole: $('dev-role'),
  devTokenBtn: $('dev-token-btn'),
  joinForm: $('join-form'),
  channel: $('channel'),
  leave: $('leave'),
  joined: $('joined'),
  notice: $('notice'),
  noticeText: $('notice-text'),
  noticeClose: $('notice-close'),
  room: $('room'),
  membersPanel: $('members-panel'),
  membersCount: $('members-count'),
  members: $('members'),
  membersNote: $('members-note'),
  scroller: $('scroller'),
  empty: $('empty'),
  messages: $('messages'),
  sendForm: $('send-form'),
  message: $('message'),
  send: $('send'),
};

const WS_URL = `${location.protocol === 'http:' ? 'ws' : 'wss'}://${location.host}/ws`;
const CHANNEL_RE = /^[A-Za-z0-9_.@=+-]+(?::[A-Za-z0-9_.@=+-]+)*$/;
const NAME_RE = /^[A-Za-z0-9_.@=+-]{1,64}$/;
// The rooms whose subscriptions ask for presence: what `serve --dev` keeps it for.
const PRESENCE_RE = /^chat:[^:]+$/;
const MAX_MESSAGES = 500;
const EXPIRY_WARNING_S = 120;
const TOKEN_EXPIRED = CloseCode.TOKEN_EXPIRED; // 4001
const narrow = window.matchMedia('(max-width: 760px)');

const app = {
  client: null,        // the current WsgateClient; events of older ones are ignored
  state: 'idle',
  user: null,
  expiresAt: null,     // unix seconds, from welcome
  welcomes: 0,         // welcomes seen by the current client
  tokenSource: null,   // 'dev' | 'pasted'
  dev: null,           // { sub, role } of the dev token, to mint again
  devFreshToken: null, // a just-minted dev token that getToken hands out once
  tokenInUse: null,    // the token getToken last handed out
  devAvailable: false,
  // channel -> { status: 'joining' | 'joined' | 'pending', unread, lastSeq,
  //              scrolled: its recent history was shown,
  //              presence: { members: sorted [] | null (too many), count } | null }
  channels: new Map(),
  active: null,        // the channel shown and written to
  countdown: null,
  expiryTimer: null,
};

// ---------------------------------------------------------------- notices

/** Shows one message for people; kind: info | success | warn | error. */
function notice(kind, text) {
  ui.notice.dataset.kind = kind;
  ui.noticeText.textContent = text;
  ui.notice.hidden = false;
}

function clearNotice() {
  ui.notice.hidden = true;
  ui.notice.dataset.kind = 'info';
  ui.noticeText.textContent = '';
}

ui.noticeClose.addEventListener('click', clearNotice);

// ---------------------------------------------------------------- tokens

/** The claims of a JWT, decoded without verification (for display only). */
function decodeJwt(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

function fieldToken() {
  return ui.token.value.trim();
}

/** true when the token in the field has an `exp` in the past. */
function fieldTokenExpired() {
  const exp = decodeJwt(fieldToken())?.exp;
  return typeof exp === 'number' && exp * 1000 <= Date.now();
}

function clock(date) {
  return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

function inWords(seconds) {
  if (seconds < 90) return `${Math.max(0, Math.round(seconds))} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

function rolesOf(claims) {
  return Array.isArray(claims?.roles) ? claims.roles.filter((r) => typeof r === 'string') : [];
}

/** Describes the token in the field, under it and in the card's summary. */
function showTokenInfo() {
  const token = fieldToken();
  ui.connSummary.textContent = '';
  if (!token) {
    ui.tokenInfo.textContent = app.devAvailable
      ? 'No token yet: paste one, or get a dev token below.'
      : 'No token yet: paste one.';
    ui.tokenInfo.dataset.kind = 'info';
    return;
  }
  const claims = decodeJwt(token);
  if (!claims) {
    ui.tokenInfo.textContent = 'This does not look like a JWT (three base64url parts separated by dots).';
    ui.tokenInfo.dataset.kind = 'error';
    return;
  }
  const roles = rolesOf(claims);
  const who = typeof claims.sub === 'string' ? claims.sub : '(no sub)';
  ui.connSummary.textContent = `${who} · ${roles.length ? roles.join(', ') : 'no role'}`;
  let text = `For ${who}, roles: ${roles.length ? roles.join(', ') : 'none'}`;
  let kind = 'info';
  if (typeof claims.exp === 'number') {
    const left = claims.exp - Date.now() / 1000;
    if (left > 0) {
      text += `, expires ${clock(new Date(claims.exp * 1000))} (in ${inWords(left)})`;
    } else {
      text += ', expired';
      kind = 'error';
    }
  }
  text += app.tokenSource === 'dev' ? '. A dev token: renewed automatically.' : '.';
  ui.tokenInfo.textContent = text;
  ui.tokenInfo.dataset.kind = kind;
}

ui.token.addEventListener('input', () => {
  // A token typed or pasted by hand cannot be renewed by the page.
  app.tokenSource = 'pasted';
  app.dev = null;
  app.devFreshToken = null;
  showTokenInfo();
});

/** `GET /dev/token`, which exists only under `wsgate serve --dev`. */
async function mintDevToken({ sub, role }) {
  const params = new URLSearchParams({ sub });
  if (role && role !== 'none') params.append('role', role);
  const res = await fetch(`/dev/token?${params}`, { cache: 'no-store' });
  const body = await res.json().catch(() => ({}));
  if (!res.ok || typeof body.token !== 'string') {
    throw new Error(res.status === 404
      ? 'This gateway does not mint dev tokens (it is not running with --dev).'
      : `Could not get a dev token: ${body.error || `HTTP ${res.status}`}.`);
  }
  return body.token;
}

/**
 * The client's token source, asked at every connect, reconnect and
 * refresh. A dev token is minted afresh each time (after the one just
 * minted by the button has been used once); a pasted token can only be
 * handed out again: if it has expired, the gateway refuses it and the
 * client stops, and the page says to paste a new one.
 */
async function getToken() {
  if (app.tokenSource === 'dev' && app.dev) {
    let token = app.devFreshToken;
    app.devFreshToken = null;
    if (!token) token = await mintDevToken(app.dev);
    ui.token.value = token;
    showTokenInfo();
    app.tokenInUse = token;
    return token;
  }
  app.tokenInUse = fieldToken();
  setTimeout(scheduleExpiryWarning, 0);
  return app.tokenInUse;
}

async function probeDevEndpoint() {
  try {
    // Without `sub` the endpoint answers 400 when it exists, 404 when not.
    const res = await fetch('/dev/token', { cache: 'no-store' });
    app.devAvailable = res.status !== 404 && res.status < 500;
  } catch {
    app.devAvailable = false;
  }
  ui.devPanel.hidden = !app.devAvailable;
  showTokenInfo();
}

ui.devTokenBtn.addEventListener('click', async () => {
  const sub = ui.devUser.value.trim();
  if (!NAME_RE.test(sub)) {
    notice('error', 'A user name is 1 to 64 of the characters A-Z a-z 0-9 _ . @ = + - (no spaces).');
    ui.devUser.focus();
    return;
  }
  ui.devTokenBtn.disabled = true;
  try {
    const dev = { sub, role: ui.devRole.value };
    const token = await mintDevToken(dev);
    ui.token.value = token;
    app.tokenSource = 'dev';
    app.dev = dev;
    app.devFreshToken = token;
    showTokenInfo();
    connect();
  } catch (err) {
    notice('error', err.message);
  } finally {
    ui.devTokenBtn.disabled = false;
  }
});

// ---------------------------------------------------------------- state badge

function setBadge(state, label, why = '') {
  ui.state.dataset.state = state;
  const l = document.createElement('span');
  l.className = 'label';
  l.textContent = label;
  const parts = [l];
  if (why) {
    const w = document.createElement('span');
    w.className = 'why';
    w.textContent = why;
    parts.push(w);
  }
  ui.state.replaceChildren(...parts);
}

function stopCountdown() {
  clearInterval(app.countdown);
  app.countdown = null;
}

/** "the server is restarting or shutting down (1001)" */
function meaning(code) {
  return `${describeClose(code)} (${code})`;
}

function onState({ state, code, delayMs }) {
  app.state = state;
  stopCountdown();
  switch (state) {
    case 'connecting':
      setBadge('connecting', 'Connecting…');
      break;
    case 'open':
      setBadge('open', 'Connected');
      // The client has re-subscribed every channel it remembers (a refusal
      // came as an `error` event first and removed that channel).
      for (const entry of app.channels.values()) if (entry.status === 'pending') entry.status = 'joined';
      renderChips();
      break;
    case 'reconnecting': {
      const why = code ? meaning(code) : '';
      const until = Date.now() + (Number(delayMs) || 0);
      const tick = () => {
        const left = (until - Date.now()) / 1000;
        setBadge('reconnecting', left > 0.05 ? `Reconnecting in ${left.toFixed(1)} s` : 'Reconnecting…', why);
        if (left <= 0.05) stopCountdown();
      };
      tick();
      if (until > Date.now()) app.countdown = setInterval(tick, 100);
      markChannelsPending();
      if (code === TOKEN_EXPIRED) {
        if (app.tokenSource === 'dev' || (fieldToken() !== app.tokenInUse && !fieldTokenExpired())) {
          explainExpiry(true); // getToken() has a new token to offer
        } else {
          stopExpired();
        }
      }
      break;
    }
    case 'closed':
      setBadge('closed', 'Closed', code ? meaning(code) : '');
      markChannelsPending();
      // No longer followed: who was here is not known any more.
      for (const entry of app.channels.values()) entry.presence = null;
      renderMembers();
      break;
    default:
      setBadge('idle', 'Not connected');
  }
  updateControls();
}

/**
 * A pasted token expired (4001) and no new one was pasted: reconnecting
 * would only offer the same token again (which the gateway may even
 * accept for the rest of its last second, then close again), so stop.
 */
function stopExpired() {
  dropClient();
  ui.whoami.hidden = true;
  showTokenInfo();
  app.state = 'closed';
  setBadge('closed', 'Closed', meaning(TOKEN_EXPIRED));
  explainExpiry(false);
  updateControls();
}

function explainExpiry(reconnecting) {
  ui.connCard.open = true;
  if (app.tokenSource === 'dev') {
    notice('warn', reconnecting
      ? 'Your token expired. Reconnecting with a fresh dev token…'
      : 'Your token expired. Get a new dev token to connect again.');
  } else if (reconnecting) {
    notice('warn', 'Your token expired. Reconnecting with the new token you pasted…');
  } else {
    notice('warn', 'Your token expired, and a pasted token cannot be renewed by this page: '
      + 'paste a new token and press Connect'
      + (app.devAvailable ? ', or get a dev token.' : '.'));
  }
}

// ---------------------------------------------------------------- connection

function connect() {
  const token = fieldToken();
  if (!token) {
    notice('error', app.devAvailable ? 'Paste a token or get a dev token first.' : 'Paste a token first.');
    ui.token.focus();
    return;
  }
  if (!decodeJwt(token)) {
    notice('error', 'That token is not a JWT: it should be three base64url parts separated by dots.');
    return;
  }
  if (!app.tokenSource) app.tokenSource = 'pasted';
  dropClient();
  clearNotice();

  const client = new WsgateClient(WS_URL, { getToken });
  app.client = client;
  app.welcomes = 0;
  const mine = (fn) => (arg) => { if (app.client === client) fn(arg); };
  client.on('state', mine(onState));
  client.on('welcome', mine(onWelcome));
  client.on('error', mine(onClientError));
  client.on('unrecovered', mine(onUnrecovered));
  client.on('closed', mine(onClosed));
  client.on('members', mine(onMembers));
  client.on('join', mine((e) => onPresenceChange('joined', e)));
  client.on('leave', mine((e) => onPresenceChange('left', e)));
  // Channels joined before (with another token, or before a Disconnect)
  // are joined again on this connection.
  for (const channel of app.channels.keys()) subscribe(channel);
  updateControls();
  // Refusals and closes are reported by the `closed` event.
  client.connect().catch(() => {});
}

function dropClient() {
  const old = app.client;
  app.client = null;
  app.user = null;
  clearTimeout(app.expiryTimer);
  stopCountdown();
  if (old) old.close();
  // Who is in a room is known only while a client follows it.
  for (const entry of app.channels.values()) entry.presence = null;
  renderMembers();
}

function onWelcome(w) {
  app.welcomes += 1;
  app.user = w.user;
  app.expiresAt = w.expires_at;
  ui.whoami.hidden = false;
  ui.whoami.textContent = w.user;
  ui.whoami.title = `Session ${w.session}`;
  renderMembers(); // which member is you
  if (app.welcomes === 1) {
    // On a phone, make room for the conversation once connected.
    if (narrow.matches) ui.connCard.open = false;
  } else {
    systemLine('Reconnected. Rooms that keep history catch up on what you missed.', null);
    if (ui.notice.dataset.kind !== 'error') clearNotice();
  }
  scheduleExpiryWarning();
  showTokenInfo();
}

/**
 * A pasted token is not renewed: warn a little before it expires. (A new
 * token pasted for the same user meanwhile is sent by wsgate.js's
 * automatic refresh, which asks getToken(); then the warning moves.)
 */
function scheduleExpiryWarning() {
  clearTimeout(app.expiryTimer);
  if (app.tokenSource === 'dev' || !app.client) return;
  const inUse = decodeJwt(app.tokenInUse ?? '')?.exp;
  const exp = Math.max(typeof inUse === 'number' ? inUse : 0, app.expiresAt ?? 0);
  if (!exp) return;
  const ms = (exp - EXPIRY_WARNING_S) * 1000 - Date.now();
  if (ms > 0) {
    app.expiryTimer = setTimeout(scheduleExpiryWarning, Math.min(ms, 2 ** 31 - 1));
    return;
  }
  const left = exp - Date.now() / 1000;
  if (left > 0) {
    notice('warn', `Your token expires in ${inWords(left)}, and a pasted token cannot be renewed by this page: `
      + 'paste a new one for the same user (it is used automatically), or paste any token and press Connect.');
    app.expiryTimer = setTimeout(scheduleExpiryWarning, Math.max(1000, left * 1000));
  }
}

function onClosed({ code, reason, refused }) {
  if (refused || code === TOKEN_EXPIRED) showTokenInfo();
  if (refused) {
    // Browsers hide the HTTP status of a refused upgrade (wsgate.js knows
    // only that the gateway is up), so `status` is usually absent here.
    ui.connCard.open = true;
    const status = refused.status;
    if (fieldTokenExpired()) {
      setBadge('closed', 'Closed', 'token expired');
      explainExpiry(false);
      return;
    }
    setBadge('closed', 'Closed', 'connection refused');
    if (status === 401 || status === undefined) {
      notice('error', 'The gateway refused the connection: the token is not valid here'
        + (status === undefined ? ' (or this user has too many open connections)' : '')
        + `. ${app.tokenSource === 'dev' ? 'Get a new dev token.' : `Paste a valid token${app.devAvailable ? ' or get a dev token' : ''}.`}`);
    } else if (status === 403) {
      notice('error', 'The gateway does not accept connections from this page’s origin.');
    } else {
      notice('error', `The gateway refused the connection (HTTP ${status}).`);
    }
    return;
  }
  if (code === TOKEN_EXPIRED) {
    explainExpiry(false);
  } else if (code && code !== CloseCode.NORMAL) {
    notice('error', `Disconnected: ${meaning(code)}${reason ? `: ${reason}` : ''}.`);
  }
}

/** Errors not answering a request of the page: ended subscriptions, failed refreshes. */
/** A resume that could not replay what was missed (protocol.md §6). */
function onUnrecovered({ channel, reason }) {
  const why = {
    epoch_changed: 'the room started over (the gateway restarted or forgot it)',
    trimmed: 'they are no longer kept',
    too_many: 'too many were missed to replay',
    no_history: 'this room keeps no history',
  }[reason] ?? reason;
  systemLine(`Messages sent to ${channel} while you were away could not be recovered: ${why}.`, channel);
  const entry = app.channels.get(channel);
  if (entry) entry.lastSeq = null; // the numbering may have started again
}

function onClientError(err) {
  if (err?.code === 'forbidden' && err.channel) {
    // The gateway ended the subscription (policy change, refreshed token),
    // or refused it when re-subscribing after a reconnect. A refusal of
    // the page's own pending subscribe() is reported where that rejects.
    const entry = app.channels.get(err.channel);
    if (!entry || entry.status === 'joining') return;
    removeChannel(err.channel);
    notice('error', `You may no longer read ${err.channel}: access was withdrawn.`);
    systemLine(`You left ${err.channel}: access was withdrawn.`, null);
    return;
  }
  if (err?.code === 'invalid_token' || err?.code === 'token_mismatch') {
    notice('warn', `Could not renew the token (${errorText(err)}). The connection ends when the current token expires.`);
    return;
  }
  notice('error', errorText(err));
}

ui.connect.addEventListener('click', connect);
ui.disconnect.addEventListener('click', () => {
  dropClient();
  app.state = 'closed';
  markChannelsPending();
  setBadge('closed', 'Disconnected');
  ui.whoami.hidden = true;
  updateControls();
});

// ---------------------------------------------------------------- channels

function errorText(err, channel) {
  const ch = channel || err?.channel || 'this channel';
  switch (err?.code) {
    case 'forbidden': return `You may not do that in ${ch}.`;
    case 'rate_limited': return 'You are sending messages too fast. Wait a moment, then send again.';
    case 'too_many_subscriptions': return 'You have joined too many channels. Leave one first.';
    case 'not_subscribed': return `You are not in ${ch}.`;
    case 'no_presence': return `${ch} keeps no list of who is in it.`;
    case 'bad_request': return `The gateway did not accept that: ${err.message}`;
    case 'invalid_token': return 'the gateway did not accept the new token';
    case 'token_mismatch': return 'the new token is for another user';
    case 'timeout': return 'The gateway did not answer in time. Try again.';
    case 'closed': return 'Not connected.';
    default: return err?.message ? `Something went wrong: ${err.message}` : 'Something went wrong.';
  }
}

function isOpen() {
  return Boolean(app.client) && app.state === 'open';
}

function join(channel) {
  if (!CHANNEL_RE.test(channel) || new TextEncoder().encode(channel).length > 255) {
    notice('error', `“${channel}” is not a channel name: use tokens of A-Z a-z 0-9 _ . @ = + - `
      + 'separated by “:”, like chat:lobby.');
    return;
  }
  const existing = app.channels.get(channel);
  if (existing) {
    setActive(channel);
    return;
  }
  app.channels.set(channel, { status: 'joining', unread: 0, lastSeq: null });
  setActive(channel);
  if (app.client && app.state !== 'closed') {
    subscribe(channel);
  } else if (fieldToken()) {
    connect(); // subscribes every channel in the list
  } else {
    app.channels.get(channel).status = 'pending';
    renderChips();
    notice('info', app.devAvailable
      ? `Get a dev token or paste a token to join ${channel}.`
      : `Paste a token to join ${channel}.`);
  }
}

/**
 * Asks the current client to subscribe. It remembers the channel and
 * subscribes again after every reconnect, so this runs once per client.
 */
async function subscribe(channel) {
  const client = app.client;
  const entry = app.channels.get(channel);
  if (!client || !entry) return;
  entry.status = 'joining';
  renderChips();
  try {
    // A room that keeps history: show its recent messages, then subscribe
    // from exactly where they end, so nothing is shown twice or skipped.
    // After a reconnect the client resumes by itself.
    let since;
    if (!entry.scrolled && !client.position(channel)) {
      const page = await client.history(channel, 50).catch((err) => {
        if (err?.code === 'no_history' || err?.code === 'forbidden') return null;
        throw err;
      });
      if (app.client !== client || app.channels.get(channel) !== entry) return;
      if (page) {
        entry.scrolled = true;
        if (page.messages.length > 0) systemLine(`Recent messages in ${channel}:`, channel);
        for (const m of page.messages) onMessage({ op: 'message', channel, ...m });
        since = { epoch: page.epoch, seq: page.seq };
      }
    }
    const handler = (msg) => {
      if (app.client === client) onMessage(msg);
    };
    try {
      // In a room, also follow who is in it (wsgate.js asks again after
      // every reconnect).
      await client.subscribe(channel, handler, { since, presence: PRESENCE_RE.test(channel) });
    } catch (err) {
      if (err?.code !== 'no_presence') throw err;
      // This gateway keeps no presence for the room: join it without.
      if (app.client !== client || app.channels.get(channel) !== entry) return;
      await client.subscribe(channel, handler, { since });
    }
    if (app.client !== client || app.channels.get(channel) !== entry) return;
    entry.status = 'joined';
  } catch (err) {
    if (app.client !== client || app.channels.get(channel) !== entry) return;
    if (err?.code === 'closed' || err?.code === 'timeout') {
      entry.status = 'pending'; // joined again with the next connection
    } else if (err?.code === 'forbidden') {
      notice('error', `You may not join ${channel}: your token’s roles do not allow it.`);
      removeChannel(channel);
    } else {
      notice('error', errorText(err, channel));
      removeChannel(channel);
    }
  }
  renderChips();
  updateControls();
}

function markChannelsPending() {
  for (const entry of app.channels.values()) {
    entry.status = 'pending';
  }
  renderChips();
}

async function leave(channel) {
  if (!app.channels.has(channel)) return;
  removeChannel(channel);
  systemLine(`You left ${channel}.`, null);
  const client = app.client;
  if (!client) return;
  try {
    await client.unsubscribe(channel);
  } catch (err) {
    if (err?.code !== 'closed') notice('error', errorText(err, channel));
  }
}

function removeChannel(channel) {
  app.channels.delete(channel);
  if (app.active === channel) setActive(app.channels.keys().next().value ?? null);
  renderChips();
  renderMembers();
  updateControls();
}

function setActive(channel) {
  app.active = channel;
  const entry = channel && app.channels.get(channel);
  if (entry) entry.unread = 0;
  if (channel) ui.channel.value = channel;
  ui.room.textContent = channel || 'No channel joined';
  for (const li of ui.messages.children) li.hidden = !visibleIn(li, channel);
  updateEmpty();
  renderChips();
  renderMembers();
  updateControls();
  scrollToEnd(true);
}

function visibleIn(li, channel) {
  return li.dataset.channel === '*' || li.dataset.channel === channel;
}

const STATUS_TEXT = { joined: 'joined', joining: 'joining…', pending: 'waiting for the connection' };

function renderChips() {
  const items = [];
  for (const [channel, entry] of app.channels) {
    const li = document.createElement('li');
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'chip';
    btn.dataset.channel = channel;
    btn.dataset.status = entry.status;
    btn.setAttribute('aria-pressed', String(channel === app.active));
    btn.title = `${channel}: ${STATUS_TEXT[entry.status] ?? entry.status}`;
    const dot = document.createElement('span');
    dot.className = 'dot';
    dot.setAttribute('aria-hidden', 'true');
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = channel;
    btn.append(dot, name);
    if (entry.unread) {
      const count = document.createElement('span');
      count.className = 'unread';
      count.textContent = entry.unread > 99 ? '99+' : String(entry.unread);
      btn.append(count);
    }
    btn.addEventListener('click', () => setActive(channel));
    li.append(btn);
    items.push(li);
  }
  ui.joined.replaceChildren(...items);
}

ui.joinForm.addEventListener('submit', (e) => {
  e.preventDefault();
  join(ui.channel.value.trim());
});
ui.leave.addEventListener('click', () => leave(ui.channel.value.trim()));
ui.channel.addEventListener('input', updateControls);

// ---------------------------------------------------------------- members

/** wsgate.js's view of a room changed (the listing, a join or a leave). */
function onMembers({ channel, members, count }) {
  const entry = app.channels.get(channel);
  if (!entry) return;
  entry.presence = { members, count };
  if (channel === app.active) renderMembers();
}

/** "bob joined." in the room's conversation (not for yourself). */
function onPresenceChange(what, { channel, user }) {
  if (user === app.user || !app.channels.has(channel)) return;
  systemLine(`${user} ${what}.`, channel);
}

/**
 * Who is in the shown room: each user once (however many tabs), yourself
 * marked; only the count when there are more than the gateway lists.
 * Hidden for a channel without presence.
 */
function renderMembers() {
  const p = app.active && app.channels.get(app.active)?.presence;
  ui.membersPanel.hidden = !p;
  if (!p) {
    ui.members.replaceChildren();
    return;
  }
  ui.membersCount.textContent = String(p.count);
  const items = (p.members ?? []).map((user) => {
    const li = document.createElement('li');
    li.className = 'member';
    li.dataset.user = user;
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = user;
    li.append(name);
    if (user === app.user) {
      li.dataset.own = 'true';
      const you = document.createElement('span');
      you.className = 'you';
      you.textContent = '(you)';
      li.append(you);
    }
    return li;
  });
  ui.members.replaceChildren(...items);
  ui.members.hidden = p.members === null;
  ui.membersNote.hidden = p.members !== null;
  ui.membersNote.textContent = p.members === null
    ? `${p.count} people are here: too many to list.`
    : '';
}

// ---------------------------------------------------------------- messages

function nearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToEnd(force) {
  if (force || nearBottom()) ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

function updateEmpty() {
  ui.empty.hidden = [...ui.messages.children].some((li) => !li.hidden);
}

function append(li) {
  const stick = nearBottom();
  li.hidden = !visibleIn(li, app.active);
  ui.messages.append(li);
  while (ui.messages.children.length > MAX_MESSAGES) ui.messages.firstElementChild.remove();
  updateEmpty();
  if (stick) scrollToEnd(true);
}

/** A line from the page itself; channel null: shown in every channel. */
function systemLine(text, channel) {
  const li = document.createElement('li');
  li.className = 'sys';
  li.dataset.channel = channel ?? '*';
  li.textContent = text;
  append(li);
}

function messageText(data) {
  if (data && typeof data === 'object' && typeof data.text === 'string') return data.text;
  return JSON.stringify(data);
}

function onMessage(msg) {
  const entry = app.channels.get(msg.channel);
  if (!entry) return; // left or ended: drop late ones
  if (entry.lastSeq !== null && Number.isInteger(msg.seq) && msg.seq > entry.lastSeq + 1) {
    const missed = msg.seq - entry.lastSeq - 1;
    systemLine(`${missed} message${missed === 1 ? '' : 's'} missed.`, msg.channel);
  }
  if (Number.isInteger(msg.seq)) entry.lastSeq = msg.seq;

  const now = new Date();
  const li = document.createElement('li');
  li.className = 'msg';
  li.dataset.from = msg.from;
  li.dataset.seq = String(msg.seq);
  li.dataset.channel = msg.channel;
  if (msg.from === app.user) li.dataset.own = 'true';

  const meta = document.createElement('div');
  meta.className = 'meta';
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = msg.from;
  const time = document.createElement('time');
  time.dateTime = now.toISOString();
  time.textContent = clock(now);
  const seq = document.createElement('span');
  seq.className = 'seq';
  seq.title = 'Number of this message in the channel (seq)';
  seq.textContent = `#${msg.seq}`;
  meta.append(from, time, seq);

  const text = document.createElement('p');
  text.className = 'text';
  text.textContent = messageText(msg.data);
  li.append(meta, text);
  append(li);

  if (msg.channel !== app.active) {
    entry.unread += 1;
    renderChips();
  }
}

ui.sendForm.addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = ui.message.value;
  const channel = app.active;
  if (!text.trim() || !channel) return;
  if (!isOpen()) {
    notice('warn', 'Not connected: wait until the connection is open again.');
    return;
  }
  ui.send.disabled = true;
  try {
    await app.client.publish(channel, { text });
    if (ui.message.value === text) ui.message.value = '';
    if (ui.notice.dataset.kind === 'warn' && ui.noticeText.textContent.includes('too fast')) clearNotice();
  } catch (err) {
    if (!(err instanceof WsgateError)) notice('error', errorText(err, channel));
    else if (err.code === 'forbidden') notice('error', `You may not write in ${channel}: your token’s roles do not allow it.`);
    else if (err.code === 'rate_limited') notice('warn', errorText(err, channel));
    else notice('error', errorText(err, channel));
  } finally {
    updateControls();
    ui.message.focus();
  }
});

// ---------------------------------------------------------------- controls

function updateControls() {
  const entry = app.active && app.channels.get(app.active);
  const canWrite = isOpen() && Boolean(entry) && entry.status === 'joined';
  ui.message.disabled = !canWrite;
  ui.send.disabled = !canWrite;
  ui.message.placeholder = canWrite
    ? `Message ${app.active}`
    : !app.client ? 'Not connected'
      : app.active ? 'Waiting for the connection…' : 'Join a channel to write';
  ui.disconnect.disabled = !app.client;
  ui.connect.textContent = app.client ? 'Reconnect' : 'Connect';
  ui.leave.disabled = !app.channels.has(ui.channel.value.trim());
}

// ---------------------------------------------------------------- start

setInterval(showTokenInfo, 30_000);
setBadge('idle', 'Not connected');
updateControls();
updateEmpty();
probeDevEndpoint();
