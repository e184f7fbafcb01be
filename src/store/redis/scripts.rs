//! The Lua scripts, each touching one session's keys only (all under its hash tag, so one
//! slot of a Redis Cluster). Their text is the documentation: the module doc of
//! [`super`] says what each does and why it is one script. Loaded with `redis::Script`
//! (EVALSHA, falling back to EVAL after a Redis restart flushed the script cache).
//!
//! Numbers cross as decimal strings and are formatted with `%d`: Lua 5.1 numbers are
//! doubles, exact up to 2^53, and `tostring` would switch to exponents above 1e14.
//!
//! Owns: script text and the `Script` values. Must not touch: connections, decoding.

use std::sync::LazyLock;

use redis::Script;

/// `wb_append`: KEYS wb:seq, wb, meta[, bell]; ARGV node, update, now_ms, seen[, session,
/// bell maxlen]. Returns the seq. With the bell (one Redis server), rings it for `session`.
/// `seen` is the highest seq the node has seen (its floor, see [`NEXT_SEQ`]).
pub(super) static WB_APPEND: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"{NEXT_SEQ}
local n = next_seq(KEYS[1], ARGV[4])
redis.call('XADD', KEYS[2], string.format('0-%d', n), 'n', ARGV[1], 'u', ARGV[2])
redis.call('HSET', KEYS[3], 'last_activity_ms', ARGV[3])
if KEYS[4] then redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 's', ARGV[5]) end
return n
"#
    )
});

/// `raise_seqs`: KEYS wb:seq, chat:seq; ARGV wb seen, chat seen. Raises each counter that
/// is below what the node has seen to it (only a Redis that lost writes has one), so the
/// next append of any node, even one that loaded the session after the loss, goes past
/// every seq this node has seen. Returns 1 when it raised one.
pub(super) const RAISE_SEQS: &str = r#"
local raised = 0
for i = 1, 2 do
  local floor = tonumber(ARGV[i])
  if tonumber(redis.call('GET', KEYS[i]) or '0') < floor then
    redis.call('SET', KEYS[i], string.format('%d', floor))
    raised = 1
  end
end
return raised
"#;

/// The next seq of counter `key`, above `seen`, the highest seq the appending node has
/// seen. The counter is always above it, unless Redis lost its last writes (a crash under
/// `appendfsync everysec`): then the counter jumps past `seen`, so no seq a client was
/// shown is handed out again (SPEC 5.1), and no node, its cursor past the lost seqs,
/// skips the entries that would have reused them. The lost seqs stay a gap: what they
/// numbered is gone.
const NEXT_SEQ: &str = r#"
local function next_seq(key, seen)
  local n = redis.call('INCR', key)
  local floor = tonumber(seen)
  if n <= floor then
    n = floor + 1
    redis.call('SET', key, string.format('%d', n))
  end
  return n
end"#;

/// `load`: KEYS meta, vs, wb, wb:seq; ARGV after, count. Returns {newest version or '0',
/// its state or false, from, wb:seq, up to `count` wb entries after `from`}, read
/// atomically: a page of a scan. With `after` empty (the first page), `from` is
/// snap_through and the state comes with the entries. Otherwise `from` is `after`, unless a
/// snapshot written since the last page trimmed entries past it: then the state comes again
/// and `from` is its snap_through.
pub(super) const LOAD: &str = r#"
local version = redis.call('HGET', KEYS[1], 'last_version')
local through = redis.call('HGET', KEYS[1], 'snap_through') or '0'
local head = redis.call('GET', KEYS[4]) or '0'
local from = through
local state = false
local after = ARGV[1]
if after == '' then after = nil end
if after and tonumber(through) <= tonumber(after) then
  from = after
elseif version then
  state = redis.call('HGET', KEYS[2], version)
end
local entries = redis.call('XRANGE', KEYS[3], '(0-' .. from, '+', 'COUNT', ARGV[2])
return {version or '0', state, from, head, entries}
"#;

/// `snapshot_write`: KEYS lease, meta, v, vs, wb, wb:seq; ARGV node, version, header,
/// state, log_through, keep, now_ms. Only under our lease, only as the next version, and
/// never behind what the newest version already includes (its entries are trimmed: a
/// state that lacks them would lose them). Writes the version, moves `snap_through`,
/// trims the stream up to it (entries appended meanwhile stay) and prunes the versions
/// beyond `keep`. Returns the version, or -1 (not our lease), -2 (another version was
/// written meanwhile), -3 (the state is behind `snap_through`).
pub(super) const SNAPSHOT_WRITE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_version') or '0')
if tonumber(ARGV[2]) ~= last + 1 then return -2 end
local head = tonumber(redis.call('GET', KEYS[6]) or '0')
local through = tonumber(ARGV[5])
if through > head then through = head end
local snapped = tonumber(redis.call('HGET', KEYS[2], 'snap_through') or '0')
if through < snapped then return -3 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[4])
redis.call('HSET', KEYS[2], 'last_version', ARGV[2], 'snap_through', string.format('%d', through), 'last_activity_ms', ARGV[7])
redis.call('XTRIM', KEYS[5], 'MINID', string.format('0-%d', through + 1))
local versions = redis.call('HKEYS', KEYS[3])
local keep = tonumber(ARGV[6])
if #versions > keep then
  local numbers = {}
  for i, v in ipairs(versions) do numbers[i] = tonumber(v) end
  table.sort(numbers)
  for i = 1, #numbers - keep do
    local old = string.format('%d', numbers[i])
    redis.call('HDEL', KEYS[3], old)
    redis.call('HDEL', KEYS[4], old)
  end
end
return tonumber(ARGV[2])
"#;

/// `lease_release`: KEYS lease; ARGV node. Deletes the lease only if it is ours.
pub(super) const LEASE_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// `lease_takeover`: KEYS lease; ARGV holder, node, ttl_ms. Takes a dead node's lease
/// only if that node still holds it (not one taken by a third node meanwhile).
pub(super) const LEASE_TAKEOVER: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#;

/// `chat_append`: KEYS chat:seq, chat, chat:amended, edits, edits:seq, meta[, bell]; ARGV
/// node, message JSON, history_limit, now_ms, seen[, session, bell maxlen]. Assigns the
/// seq (above `seen`, see [`NEXT_SEQ`]) and appends in one step (gapless, one order across
/// nodes), then trims the history to the newest `history_limit` seqs, taking the trimmed
/// messages' amendments and edit-log entries with them. Returns the seq.
pub(super) static CHAT_APPEND: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"{NEXT_SEQ}
local n = next_seq(KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], string.format('0-%d', n), 'n', ARGV[1], 'm', ARGV[2])
redis.call('HSET', KEYS[6], 'last_activity_ms', ARGV[4])
if KEYS[7] then redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[7], '*', 's', ARGV[6]) end
local keep_from = n - tonumber(ARGV[3]) + 1
if keep_from > 1 then
  local gone = redis.call('XRANGE', KEYS[2], '-', string.format('(0-%d', keep_from))
  if #gone > 0 then
    for _, entry in ipairs(gone) do
      local seq = string.sub(entry[1], 3)
      redis.call('HDEL', KEYS[3], seq)
      local member = redis.call('HGET', KEYS[5], seq)
      if member then
        redis.call('ZREM', KEYS[4], member)
        redis.call('HDEL', KEYS[5], seq)
      end
    end
    redis.call('XTRIM', KEYS[2], 'MINID', string.format('0-%d', keep_from))
  end
end
return n
"#
    )
});

/// `chat_read`: KEYS chat, chat:amended; ARGV 'after' | 'before', seq, limit. Up to
/// `limit` messages after (oldest first) or before (newest first) `seq`, each as its
/// entry id and its JSON, the amended form when there is one: {id, json, id, json, ...}.
pub(super) const CHAT_READ: &str = r#"
local entries
if ARGV[1] == 'after' then
  entries = redis.call('XRANGE', KEYS[1], '(0-' .. ARGV[2], '+', 'COUNT', ARGV[3])
else
  entries = redis.call('XREVRANGE', KEYS[1], '(0-' .. ARGV[2], '-', 'COUNT', ARGV[3])
end
local out = {}
for _, entry in ipairs(entries) do
  local message = ''
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'm' then message = fields[i + 1] end
  end
  local amended = redis.call('HGET', KEYS[2], string.sub(entry[1], 3))
  out[#out + 1] = entry[1]
  out[#out + 1] = amended or message
end
return out
"#;

/// `chat_amend`: KEYS chat, chat:amended, edits, edits:seq, meta; ARGV seq, message JSON,
/// edit-log member, now_ms. Only for a message still stored: records its amended form and
/// replaces its edit-log entry (one per message). Returns 1, or 0 (no such message).
pub(super) const CHAT_AMEND: &str = r#"
local id = '0-' .. ARGV[1]
if #redis.call('XRANGE', KEYS[1], id, id) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local old = redis.call('HGET', KEYS[4], ARGV[1])
if old then redis.call('ZREM', KEYS[3], old) end
redis.call('ZADD', KEYS[3], 0, ARGV[3])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[5], 'last_activity_ms', ARGV[4])
return 1
"#;

/// Sums `node\nuser` fields of a presence hash per user (shared by the presence scripts).
const PRESENCE_TOTALS: &str = r#"
local function totals(all)
  local t = {}
  for i = 1, #all, 2 do
    local nl = string.find(all[i], '\n', 1, true)
    if nl then
      local user = string.sub(all[i], nl + 1)
      t[user] = (t[user] or 0) + tonumber(all[i + 1])
    end
  end
  return t
end
"#;

/// `presence_change`: KEYS presence, presence:info; ARGV node, user id, count, user JSON.
/// Sets the user's count on this node (deleting the field at 0): a field belongs to one
/// node and holds an absolute count, so writing it again (a retry after a reply that did
/// not come) changes nothing. Keeps the user's info while it has a connection anywhere.
/// Returns {the user's total after, the presence hash, the info hash}.
pub(super) static PRESENCE_CHANGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{PRESENCE_TOTALS}{}",
        r#"
local field = ARGV[1] .. '\n' .. ARGV[2]
local count = tonumber(ARGV[3])
if count <= 0 then
  redis.call('HDEL', KEYS[1], field)
else
  redis.call('HSET', KEYS[1], field, count)
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
end
local all = redis.call('HGETALL', KEYS[1])
local total = totals(all)[ARGV[2]] or 0
if total <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
return {total, all, redis.call('HGETALL', KEYS[2])}
"#
    )
});

/// `presence_drop_node`: KEYS presence, presence:info; ARGV node. Removes every count of
/// that node. Returns {users whose total went to 0 as id, info pairs; the presence hash;
/// the info hash}.
pub(super) static PRESENCE_DROP_NODE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{PRESENCE_TOTALS}{}",
        r#"
local prefix = ARGV[1] .. '\n'
local affected = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[1], all[i])
    affected[#affected + 1] = string.sub(all[i], #prefix + 1)
  end
end
local after = redis.call('HGETALL', KEYS[1])
local left = totals(after)
local gone = {}
for _, user in ipairs(affected) do
  if not left[user] then
    gone[#gone + 1] = user
    gone[#gone + 1] = redis.call('HGET', KEYS[2], user) or ''
    redis.call('HDEL', KEYS[2], user)
  end
end
return {gone, after, redis.call('HGETALL', KEYS[2])}
"#
    )
});

/// `presence_read`: KEYS presence, presence:info. {the presence hash, the info hash}.
pub(super) const PRESENCE_READ: &str = r#"
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"#;

/// Every script, compiled once (the SHA1 is computed here, not per call).
pub(super) struct Scripts {
    pub(super) wb_append: Script,
    pub(super) load: Script,
    pub(super) snapshot_write: Script,
    pub(super) lease_release: Script,
    pub(super) lease_takeover: Script,
    pub(super) chat_append: Script,
    pub(super) raise_seqs: Script,
    pub(super) chat_read: Script,
    pub(super) chat_amend: Script,
    pub(super) presence_change: Script,
    pub(super) presence_drop_node: Script,
    pub(super) presence_read: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            wb_append: Script::new(&WB_APPEND),
            load: Script::new(LOAD),
            snapshot_write: Script::new(SNAPSHOT_WRITE),
            lease_release: Script::new(LEASE_RELEASE),
            lease_takeover: Script::new(LEASE_TAKEOVER),
            chat_append: Script::new(&CHAT_APPEND),
            raise_seqs: Script::new(RAISE_SEQS),
            chat_read: Script::new(CHAT_READ),
            chat_amend: Script::new(CHAT_AMEND),
            presence_change: Script::new(&PRESENCE_CHANGE),
            presence_drop_node: Script::new(&PRESENCE_DROP_NODE),
            presence_read: Script::new(PRESENCE_READ),
        }
    }
}
