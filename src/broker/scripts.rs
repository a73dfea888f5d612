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
