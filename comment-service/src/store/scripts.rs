//! The store's Lua scripts. Each runs atomically on one server, and every
//! key it touches is passed in `KEYS` and shares one hash slot (see
//! [`super::keys`]), so each also runs on a cluster; nothing here builds a
//! key from data. What a script must decide from data (which list a
//! comment is in) the caller has read first: a comment never changes, so
//! the keys derived from it stay right, and each script checks that the
//! comment still exists before it deletes anything.

/// A script: sent by its hash, and whole where a server does not know it
/// (a replica promoted since the script was last sent has none cached).
#[derive(Clone)]
pub struct Lua {
    pub body: &'static str,
    pub script: redis::Script,
}

impl Lua {
    #[must_use]
    pub fn new(body: &'static str) -> Self {
        Self {
            body,
            script: redis::Script::new(body),
        }
    }
}

/// KEYS: the comment, the outbox, its message's list, its author's set.
/// ARGV: the stored comment, its event, its id. A script rather than a
/// `MULTI`, so that the replica's `WAIT` can follow it in one pipeline.
pub const INSERT: &str = r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
redis.call('SADD', KEYS[4], ARGV[3])
return 1
";

/// KEYS[1] a purge set, KEYS[2] the purge traces; ARGV: the member, and
/// its `traceparent` or nothing. Records a purge to do.
pub const REQUEST_PURGE: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return 1
";

/// KEYS: the comment, its message's list, its author's set, the outbox.
/// ARGV: the comment id, its event. 1 when deleted, 0 when already gone.
pub const DELETE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'event', ARGV[2])
return 1
";

/// One batch of a purge in one group, from the user's side or the
/// message's. KEYS: the purge's own container (the user's set or the
/// message's list), the outbox, then per comment its key and the other
/// container it is in (its message's list, or its author's set). ARGV[1]
/// and ARGV[2] the commands that remove a member from the purge's
/// container and from the other one (`SREM`, `ZREM`), then per comment its
/// id and its event. A comment gone already only leaves the purge's
/// container. The number deleted.
pub const PURGE: &str = r"
local deleted = 0
for i = 3, #ARGV, 2 do
  local comment, other = KEYS[i], KEYS[i + 1]
  if redis.call('EXISTS', comment) == 1 then
    redis.call('DEL', comment)
    redis.call(ARGV[2], other, ARGV[i])
    redis.call('XADD', KEYS[2], '*', 'event', ARGV[i + 1])
    deleted = deleted + 1
  end
  redis.call(ARGV[1], KEYS[1], ARGV[i])
end
return deleted
";

/// KEYS[1] the revocations hash; ARGV: user id, cutoff (Unix seconds),
/// reason. Keeps the stored revocation if its cutoff is later.
pub const REVOKE: &str = r"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  local cutoff = tonumber(string.match(stored, '^(%d+):'))
  if cutoff and cutoff > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
";

/// KEYS[1] a group's outbox, KEYS[2] its dead letters; ARGV: pairs of
/// outbox id and reason. Each entry leaves the outbox and arrives in the
/// dead letters in one step.
pub const DEAD_LETTER: &str = r"
for i = 1, #ARGV, 2 do
  local entries = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #entries == 1 then
    local fields, event = entries[1][2], ''
    for j = 1, #fields, 2 do
      if fields[j] == 'event' then event = fields[j + 1] end
    end
    redis.call('XADD', KEYS[2], '*', 'event', event, 'reason', ARGV[i + 1], 'position', ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
return 1
";

/// KEYS[1] a group's outbox, KEYS[2] its dead letters; ARGV: how many.
/// Moves the oldest dead letters back to the end of the outbox.
pub const RETRY: &str = r"
local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', tonumber(ARGV[1]))
for _, entry in ipairs(entries) do
  local fields, event = entry[2], ''
  for j = 1, #fields, 2 do
    if fields[j] == 'event' then event = fields[j + 1] end
  end
  redis.call('XADD', KEYS[1], '*', 'event', event)
  redis.call('XDEL', KEYS[2], entry[1])
end
return #entries
";
