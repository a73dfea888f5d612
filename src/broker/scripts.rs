//! The Lua scripts Redis runs for the broker: one per publication, one
//! per read of a position or of history. Each runs atomically.

/// The channel's epoch, in a numbering that starts now: the server's
/// clock in microseconds, in hex (scripts run one at a time, so no two
/// numberings of a channel share one; a restarted Redis has moved on).
pub(super) const NEW_EPOCH: &str = r"
local function new_epoch(key, ttl)
  local t = redis.call('TIME')
  local epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
  redis.call('SET', key, epoch, 'EX', ttl * 2)
  return epoch
end
";

/// Takes the channel's next `seq` (a counter that did not exist starts a
/// new epoch and an empty history), appends the message to the channel's
/// history stream when it keeps history (trimmed by length and age),
/// refreshes the keys' expiry (the epoch's is longer, so a counter never
/// outlives it) and publishes `seq`, the epoch and the payload, all
/// atomically. KEYS: seq, history, epoch. ARGV: topic, max_len (0: no
/// history), max_age_ms (0: none), ttl_s, payload.
pub(super) const PUBLISH_SCRIPT: &str = r"
local ttl = tonumber(ARGV[4])
local fresh = redis.call('EXISTS', KEYS[1]) == 0
local seq = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[3])
if fresh or not epoch then
  redis.call('DEL', KEYS[2])
  epoch = new_epoch(KEYS[3], ttl)
else
  redis.call('EXPIRE', KEYS[3], ttl * 2)
end
local max_len = tonumber(ARGV[2])
if max_len > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', max_len, '*', 'seq', seq, 'msg', ARGV[5])
  local age = tonumber(ARGV[3])
  if age > 0 then
    local t = redis.call('TIME')
    local min = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age
    redis.call('XTRIM', KEYS[2], 'MINID', '~', min)
  end
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[1], seq .. ' ' .. epoch .. ' ' .. ARGV[5])
return {seq, epoch}
";

/// A channel's position and, atomically with it, what a resume or a
/// history request needs. A channel never numbered starts at seq 0 in a
/// new epoch here, so a client can resume from it. KEYS: seq, history,
/// epoch. ARGV: mode (`position`, `resume`, `history`), since epoch,
/// since seq, max_replay, history limit, ttl_s. Returns the epoch, the
/// seq, the outcome (`position`, `recovered`, `epoch_changed`, `trimmed`,
/// `too_many`, `history`) and the entries' seq and payload, oldest first.
pub(super) const READ_SCRIPT: &str = r"
local ttl = tonumber(ARGV[6])
local seq = redis.call('GET', KEYS[1])
local epoch = redis.call('GET', KEYS[3])
if not seq then
  redis.call('SET', KEYS[1], 0, 'EX', ttl)
  redis.call('DEL', KEYS[2])
  seq = 0
  epoch = new_epoch(KEYS[3], ttl)
elseif not epoch then
  epoch = new_epoch(KEYS[3], ttl)
end
seq = tonumber(seq)
local mode = ARGV[1]
local outcome = mode
local count = 0
if mode == 'resume' then
  local since = tonumber(ARGV[3])
  if ARGV[2] ~= epoch or since > seq then
    outcome = 'epoch_changed'
  elseif seq - since > tonumber(ARGV[4]) then
    outcome = 'too_many'
  else
    outcome = 'recovered'
    count = seq - since
  end
elseif mode == 'history' then
  count = tonumber(ARGV[5])
end
local out = {epoch, seq, outcome}
if count > 0 then
  local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', count)
  if mode == 'resume' then
    local oldest = entries[#entries]
    if #entries < count or tonumber(oldest[2][2]) ~= seq - count + 1 then
      out[3] = 'trimmed'
      return out
    end
  end
  for i = #entries, 1, -1 do
    local fields = entries[i][2]
    table.insert(out, fields[2])
    table.insert(out, fields[4])
  end
end
return out
";

/// Presence in Redis (protocol.md §6), one channel at a time. KEYS:
/// members (a sorted set of `"<replica> <user>"` scored by when the entry
/// expires, in ms), users (a hash of user → how many replicas hold them),
/// the sweep lock. ARGV: mode, topic, replica, lifetime_ms (the grace in
/// `handoff`), max_listed, key_ttl_ms, sweep_ms, then users.
///
/// Modes: `enter` and `refresh` add or renew this replica's entry of each
/// user (a user whose first entry it is joins); `exit` removes them (a
/// user whose last entry it was leaves); `handoff` shortens them to the
/// grace (a replica shutting down leaves its members to the sweep);
/// `read` answers the count, and the users when there are at most
/// `max_listed`. Every mode first sweeps expired entries (`read` always,
/// the others when they take the sweep lock, so one replica sweeps a
/// channel at a time), their users leaving as above. A join or leave is
/// published (`J user`, `L user`) on the channel's topic only when the
/// channel then has at most `max_listed` members. The others answer
/// {published, suppressed, expired, swept}.
pub(super) const PRESENCE_SCRIPT: &str = r"
local members, users, lock = KEYS[1], KEYS[2], KEYS[3]
local mode, topic, replica = ARGV[1], ARGV[2], ARGV[3]
local life, max_listed = tonumber(ARGV[4]), tonumber(ARGV[5])
local key_ttl, sweep_ms = tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local published, suppressed, expired, swept = 0, 0, 0, 0
local function tell(kind, user)
  if redis.call('HLEN', users) <= max_listed then
    redis.call('PUBLISH', topic, kind .. ' ' .. user)
    published = published + 1
  else
    suppressed = suppressed + 1
  end
end
local function gone(user)
  if redis.call('HINCRBY', users, user, -1) <= 0 then
    redis.call('HDEL', users, user)
    tell('L', user)
  end
end
if mode == 'read' or (sweep_ms > 0 and redis.call('SET', lock, replica, 'NX', 'PX', sweep_ms)) then
  swept = 1
  local old = redis.call('ZRANGEBYSCORE', members, '-inf', now, 'LIMIT', 0, 1000)
  for _, m in ipairs(old) do
    redis.call('ZREM', members, m)
    local sp = string.find(m, ' ', 1, true)
    if sp then gone(string.sub(m, sp + 1)) end
    expired = expired + 1
  end
end
if mode == 'read' then
  local n = redis.call('HLEN', users)
  if n > max_listed then return {n} end
  local out = redis.call('HKEYS', users)
  table.insert(out, 1, n)
  return out
end
for i = 8, #ARGV do
  local user = ARGV[i]
  local m = replica .. ' ' .. user
  if mode == 'exit' then
    if redis.call('ZREM', members, m) == 1 then gone(user) end
  elseif mode == 'handoff' then
    redis.call('ZADD', members, 'XX', 'LT', now + life, m)
  elseif redis.call('ZADD', members, now + life, m) == 1 then
    if redis.call('HINCRBY', users, user, 1) == 1 then tell('J', user) end
  end
end
if redis.call('EXISTS', members) == 1 then
  redis.call('PEXPIRE', members, key_ttl)
  redis.call('PEXPIRE', users, key_ttl)
else
  redis.call('DEL', users)
end
return {published, suppressed, expired, swept}
";
