//! The only module that talks to Redis.
//!
//! # Data model
//!
//! Every key starts with the configured prefix `{p}` (default
//! `chirp:comments:`).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}schema_version` | string | the data model's version, written at start-up |
//! | `{p}c:{comment_id}` | hash | `message_id`, `author_id`, `message_author_id`, `body` |
//! | `{p}m:{message_id}` | sorted set | the message's comment ids, all at score 0 |
//! | `{p}u:{user_id}` | set | the user's comment ids, for purging |
//! | `{p}outbox` | stream | events waiting for delivery (field `event`: JSON), deleted once delivered |
//! | `{p}outbox:dead` | stream | outbox entries set aside (rejected by analytics-service, or unreadable): `event` as stored, `reason`, `position` (the outbox id); the entry id tells when |
//! | `{p}revocations` | hash | user id → `{issued_before unix seconds}:{reason}`, the latest `TokensRevoked` per user |
//! | `{p}purge:users` | set | users whose comments are still being purged (ban, erasure) |
//! | `{p}purge:messages` | set | deleted messages whose comments are still being deleted |
//! | `{p}purge:traces` | hash | purge member → `traceparent` of the request that asked for it (only while traced) |
//! | `{p}hidden` | set | messages message-service hides (their author is banned): their comments are kept but not listed |
//!
//! Comment ids are UUIDv7: their text sorts by creation time, so with every
//! score equal a sorted set orders them by time and `ZRANGEBYLEX` pages them
//! from a cursor (the last id seen), stable however many share a millisecond.
//! The creation time itself is read back from the id.
//!
//! # Atomicity
//!
//! Adding a comment writes three keys and its outbox event in one
//! `MULTI`/`EXEC`. Deleting one and purging a user's (events included) run as
//! Lua scripts, because which keys to touch depends
//! on what the comment hash holds; a script reads and writes in one atomic
//! step. (Those scripts derive keys from data, so they need a single Redis
//! or a cluster with one hash slot per prefix; Chirp runs a single primary.)
//! Listing a page takes two pipelined round trips (the ids with the hidden
//! check and the total, then the comments); a comment deleted between them
//! is neither listed nor counted, so a page and its total agree.
//! Counting many messages' comments is one pipelined round trip of `ZCARD`s.

mod maintenance;

use std::{collections::HashMap, time::Duration};

pub use maintenance::Maintenance;

use chrono::{DateTime, SecondsFormat, TimeZone as _, Utc};
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::StreamRangeReply,
    AsyncCommands as _, Script,
};
use service_kit::{
    events::{Event, RevocationReason},
    relay::{Backlog, DeadLetter, Outbox, Pending, Rejected},
    revocation::{Revocation, RevocationStore},
    store::StoreStatus,
};
use tracing::Instrument as _;

use crate::{
    domain::{Body, Comment, CommentId, MessageId, Page, PageRequest, UserId},
    error::{Error, Result},
};

/// The data model above. Bump it with a migration when keys change.
const SCHEMA_VERSION: u32 = 1;
/// Comments purged per script run, so a prolific user does not block Redis.
const PURGE_BATCH: usize = 500;

/// KEYS[1] comment hash; ARGV: prefix, comment id, event JSON.
const DELETE_SCRIPT: &str = r"
local fields = redis.call('HMGET', KEYS[1], 'message_id', 'author_id')
if not fields[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. 'm:' .. fields[1], ARGV[2])
redis.call('SREM', ARGV[1] .. 'u:' .. fields[2], ARGV[2])
redis.call('XADD', ARGV[1] .. 'outbox', '*', 'event', ARGV[3])
return 1
";

/// KEYS[1] the user's set; ARGV: prefix, batch size, user id, producer,
/// occurred_at, then one fresh event id per comment the batch may delete.
/// Events are built here, beside the deletes they record, so both happen or
/// neither does.
const PURGE_SCRIPT: &str = r"
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
for i, id in ipairs(ids) do
  local fields = redis.call('HMGET', ARGV[1] .. 'c:' .. id, 'message_id', 'message_author_id')
  if fields[1] then
    redis.call('ZREM', ARGV[1] .. 'm:' .. fields[1], id)
    redis.call('DEL', ARGV[1] .. 'c:' .. id)
    local event = cjson.encode({
      id = ARGV[5 + i], producer = ARGV[4], occurred_at = ARGV[5],
      payload = { type = 'comment_deleted', comment_id = id, message_id = fields[1],
                  author_id = ARGV[3], message_author_id = fields[2] }
    })
    redis.call('XADD', ARGV[1] .. 'outbox', '*', 'event', event)
  end
end
return #ids
";

/// KEYS[1] the message's sorted set; ARGV: prefix, batch size, message id,
/// producer, occurred_at, then one fresh event id per comment the batch may
/// delete. Like PURGE_SCRIPT, from the message's side.
const PURGE_MESSAGE_SCRIPT: &str = r"
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for i, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local fields = redis.call('HMGET', ARGV[1] .. 'c:' .. id, 'author_id', 'message_author_id')
  if fields[1] then
    redis.call('SREM', ARGV[1] .. 'u:' .. fields[1], id)
    redis.call('DEL', ARGV[1] .. 'c:' .. id)
    local event = cjson.encode({
      id = ARGV[5 + i], producer = ARGV[4], occurred_at = ARGV[5],
      payload = { type = 'comment_deleted', comment_id = id, message_id = ARGV[3],
                  author_id = fields[1], message_author_id = fields[2] }
    })
    redis.call('XADD', ARGV[1] .. 'outbox', '*', 'event', event)
  end
end
return #ids
";

/// KEYS[1] the revocations hash; ARGV: user id, cutoff (Unix seconds),
/// reason. Keeps the stored revocation if its cutoff is later.
const REVOKE_SCRIPT: &str = r"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  local cutoff = tonumber(string.match(stored, '^(%d+):'))
  if cutoff and cutoff > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
";

/// KEYS[1] the outbox, KEYS[2] its dead letters; ARGV: pairs of outbox id
/// and reason. Each entry leaves the outbox and arrives in the dead letters
/// in one step.
const DEAD_LETTER_SCRIPT: &str = r"
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

/// KEYS[1] the outbox, KEYS[2] its dead letters; ARGV: how many. Moves the
/// oldest dead letters back to the end of the outbox.
const RETRY_SCRIPT: &str = r"
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

/// A hash as Redis returns it.
type Fields = HashMap<String, String>;

#[derive(Clone)]
pub struct Store {
    redis: ConnectionManager,
    prefix: String,
    status: StoreStatus,
    delete: Script,
    purge: Script,
    purge_message: Script,
    revoke: Script,
}

impl Store {
    /// A connection made on demand (and remade after Redis restarts), so the
    /// service starts (and reports NOT_SERVING) while Redis is down.
    ///
    /// # Errors
    /// When the URL cannot be parsed.
    pub fn connect_lazy(url: &str, prefix: &str, status: StoreStatus) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            // Bounds a command when Redis stops answering mid-connection.
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1);
        Ok(Self {
            redis: ConnectionManager::new_lazy_with_config(client, config)?,
            prefix: prefix.to_owned(),
            status,
            delete: Script::new(DELETE_SCRIPT),
            purge: Script::new(PURGE_SCRIPT),
            purge_message: Script::new(PURGE_MESSAGE_SCRIPT),
            revoke: Script::new(REVOKE_SCRIPT),
        })
    }

    fn ready(&self) -> Result<ConnectionManager> {
        if self.status.is_up() {
            Ok(self.redis.clone())
        } else {
            Err(Error::store_unavailable(None))
        }
    }

    fn comment_key(&self, id: CommentId) -> String {
        format!("{}c:{id}", self.prefix)
    }

    fn message_key(&self, id: MessageId) -> String {
        format!("{}m:{id}", self.prefix)
    }

    fn user_key(&self, id: UserId) -> String {
        format!("{}u:{id}", self.prefix)
    }

    /// Writes the schema version if none is there, and refuses to run against
    /// data written by a newer version.
    pub async fn prepare(&self) -> Result<()> {
        let mut redis = self.redis.clone();
        let key = format!("{}schema_version", self.prefix);
        let _: bool = redis.set_nx(&key, SCHEMA_VERSION).await.map_err(classify)?;
        let stored: u32 = redis.get(&key).await.map_err(classify)?;
        if stored > SCHEMA_VERSION {
            return Err(Error::internal(anyhow::anyhow!(
                "Redis holds schema version {stored}; this build knows up to {SCHEMA_VERSION}"
            )));
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        service_kit::store::timed("redis", "ping", async move {
            let mut redis = self.redis.clone();
            let _: String = redis::cmd("PING").query_async(&mut redis).await.map_err(classify)?;
            Ok(())
        })
        .await
    }

    fn outbox_key(&self) -> String {
        format!("{}outbox", self.prefix)
    }

    /// Stores a comment and its event in one `MULTI`/`EXEC`.
    pub async fn insert(&self, comment: &Comment, event: &Event) -> Result<()> {
        service_kit::store::timed("redis", "insert", async move {
            let mut redis = self.ready()?;
            let id = comment.id.to_string();
            redis::pipe()
                .atomic()
                .hset_multiple(
                    self.comment_key(comment.id),
                    &[
                        ("message_id", comment.message_id.to_string()),
                        ("author_id", comment.author_id.to_string()),
                        ("message_author_id", comment.message_author_id.to_string()),
                        ("body", comment.body.as_str().to_owned()),
                    ],
                )
                .ignore()
                .xadd(self.outbox_key(), "*", &[("event", event.to_json()?)])
                .ignore()
                .zadd(self.message_key(comment.message_id), &id, 0)
                .ignore()
                .sadd(self.user_key(comment.author_id), &id)
                .ignore()
                .query_async::<()>(&mut redis)
                .await
                .map_err(classify)
        })
        .await
    }

    pub async fn get(&self, id: CommentId) -> Result<Option<Comment>> {
        service_kit::store::timed("redis", "get", async move {
            let mut redis = self.ready()?;
            let fields: Fields = redis.hgetall(self.comment_key(id)).await.map_err(classify)?;
            comment_from_hash(id, fields)
        })
        .await
    }

    fn hidden_key(&self) -> String {
        format!("{}hidden", self.prefix)
    }

    /// Records whether message-service hides `message` (idempotent; the
    /// events arrive in the order message-service wrote them).
    pub async fn set_message_hidden(&self, message: MessageId, hidden: bool) -> Result<()> {
        service_kit::store::timed("redis", "set_message_hidden", async move {
            let mut redis = self.ready()?;
            let (key, member) = (self.hidden_key(), message.to_string());
            let _: i64 = if hidden {
                redis.sadd(key, member).await
            } else {
                redis.srem(key, member).await
            }
            .map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// A message's comments, oldest first; none while the message is hidden.
    pub async fn list(&self, message: MessageId, page: PageRequest) -> Result<Page> {
        service_kit::store::timed("redis", "list", async move {
            let mut redis = self.ready()?;
            let min = page.after().map_or_else(|| "-".to_owned(), |after| format!("({after}"));
            // One more than asked says whether another page follows; the hidden
            // check and the total ride in the same round trip.
            let (hidden, ids, mut total): (bool, Vec<String>, i64) = redis::pipe()
                .sismember(self.hidden_key(), message.to_string())
                .zrangebylex_limit(self.message_key(message), &min, "+", 0, page.size() as isize + 1)
                .zcard(self.message_key(message))
                .query_async(&mut redis)
                .await
                .map_err(classify)?;
            if hidden {
                return Ok(Page {
                    comments: Vec::new(),
                    next: None,
                    total: 0,
                });
            }
            let more = ids.len() > page.size() as usize;
            let ids: Vec<CommentId> = ids
                .iter()
                .take(page.size() as usize)
                .map(|raw| CommentId::parse("id", raw).map_err(|_| corrupt("a comment id in a message's set")))
                .collect::<Result<_>>()?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(self.comment_key(*id));
            }
            let hashes: Vec<Fields> = if ids.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut redis).await.map_err(classify)?
            };
            let mut comments = Vec::with_capacity(ids.len());
            for (id, fields) in ids.iter().zip(hashes) {
                match comment_from_hash(*id, fields)? {
                    Some(comment) => comments.push(comment),
                    // Deleted (a purge, most likely) since the ids were read:
                    // not listed, so not counted either. One script doing
                    // both reads would be exact, but costs Redis three times
                    // the CPU of these two pipelines (BENCHMARKS.md).
                    None => total -= 1,
                }
            }
            let next = if more { ids.last().copied() } else { None };
            Ok(Page { comments, next, total })
        })
        .await
    }

    /// Comment counts of many messages in one round trip.
    pub async fn counts(&self, messages: &[MessageId]) -> Result<Vec<(MessageId, i64)>> {
        service_kit::store::timed("redis", "counts", async move {
            let mut redis = self.ready()?;
            let mut pipe = redis::pipe();
            for id in messages {
                pipe.zcard(self.message_key(*id));
            }
            let counts: Vec<i64> = pipe.query_async(&mut redis).await.map_err(classify)?;
            Ok(messages.iter().copied().zip(counts).collect())
        })
        .await
    }

    /// Deletes a comment and writes its event, atomically; `false` when it
    /// was already gone (and then no event is written).
    pub async fn delete(&self, id: CommentId, event: &Event) -> Result<bool> {
        service_kit::store::timed("redis", "delete", async move {
            let mut redis = self.ready()?;
            let deleted: i64 = self
                .delete
                .key(self.comment_key(id))
                .arg(&self.prefix)
                .arg(id.to_string())
                .arg(event.to_json()?)
                .invoke_async(&mut redis)
                .await
                .map_err(classify)?;
            Ok(deleted == 1)
        })
        .await
    }

    /// Deletes every comment of a user, a batch per atomic step, each
    /// deletion with its `CommentDeleted` event from `producer`; the number
    /// deleted (0 when repeated).
    pub async fn purge(&self, user: UserId, producer: &str) -> Result<u64> {
        service_kit::store::timed("redis", "purge", async move {
            let mut total = 0u64;
            loop {
                let deleted = self
                    .purge_batch(&self.purge, &self.user_key(user), &user.to_string(), producer)
                    .await?;
                total += deleted as u64;
                if deleted < PURGE_BATCH {
                    return Ok(total);
                }
            }
        })
        .await
    }

    /// One atomic step of `script` (PURGE_SCRIPT or PURGE_MESSAGE_SCRIPT)
    /// over the set at `key`; the number of comments it took.
    async fn purge_batch(&self, script: &Script, key: &str, owner: &str, producer: &str) -> Result<usize> {
        let mut redis = self.ready()?;
        let occurred_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut invocation = script.key(key);
        invocation
            .arg(&self.prefix)
            .arg(PURGE_BATCH)
            .arg(owner)
            .arg(producer)
            .arg(occurred_at);
        for _ in 0..PURGE_BATCH {
            invocation.arg(uuid::Uuid::now_v7().to_string());
        }
        invocation.invoke_async(&mut redis).await.map_err(classify)
    }

    fn purge_traces_key(&self) -> String {
        format!("{}purge:traces", self.prefix)
    }

    fn purge_set(&self, what: PurgeOf) -> String {
        match what {
            PurgeOf::User(_) => format!("{}purge:users", self.prefix),
            PurgeOf::Message(_) => format!("{}purge:messages", self.prefix),
        }
    }

    /// Records that the comments of a user (ban, erasure) or of a deleted
    /// message are to be purged (idempotent; the worker does it in batches).
    /// `trace` is the `traceparent` of the request that caused it (the ban,
    /// the deletion), kept beside the job so the worker's spans link to it.
    pub async fn request_purge(&self, what: PurgeOf, trace: Option<&str>) -> Result<()> {
        service_kit::store::timed("redis", "request_purge", async move {
            let mut redis = self.ready()?;
            let member = match what {
                PurgeOf::User(id) => id.to_string(),
                PurgeOf::Message(id) => id.to_string(),
            };
            let mut pipe = redis::pipe();
            pipe.atomic().sadd(self.purge_set(what), &member).ignore();
            if let Some(trace) = trace {
                pipe.hset(self.purge_traces_key(), &member, trace).ignore();
            }
            let () = pipe.query_async(&mut redis).await.map_err(classify)?;
            Ok(())
        })
        .await
    }

    pub async fn purges_pending(&self) -> Result<u64> {
        service_kit::store::timed("redis", "purges_pending", async move {
            let mut redis = self.ready()?;
            let (users, messages): (u64, u64) = redis::pipe()
                .scard(format!("{}purge:users", self.prefix))
                .scard(format!("{}purge:messages", self.prefix))
                .query_async(&mut redis)
                .await
                .map_err(classify)?;
            Ok(users + messages)
        })
        .await
    }

    /// One batch of one recorded purge; the job is dropped once a batch
    /// comes back short. `false` when none is waiting.
    pub async fn purge_step(&self, producer: &str) -> Result<bool> {
        service_kit::store::timed("redis", "purge_step", async move {
            let mut redis = self.ready()?;
            let users = format!("{}purge:users", self.prefix);
            let messages = format!("{}purge:messages", self.prefix);
            let user: Option<String> = redis.srandmember(&users).await.map_err(classify)?;
            let (set, member, script, key) = if let Some(user) = user {
                let id = UserId::parse("user", &user).map_err(|_| corrupt("a user id in the purge set"))?;
                (users, user, &self.purge, self.user_key(id))
            } else {
                let message: Option<String> = redis.srandmember(&messages).await.map_err(classify)?;
                let Some(message) = message else {
                    return Ok(false);
                };
                let id = MessageId::parse("message", &message).map_err(|_| corrupt("a message id in the purge set"))?;
                (messages, message, &self.purge_message, self.message_key(id))
            };
            // A batch is a root span of its own (the worker runs outside any
            // request), linked to the request that asked for the purge.
            let span = if service_kit::telemetry::exporting() {
                let span = tracing::info_span!(
                    target: "chirp::job",
                    parent: None,
                    "purge batch",
                    otel.name = "purge batch",
                    purge.of = %member,
                );
                let trace: Option<String> = redis.hget(self.purge_traces_key(), &member).await.map_err(classify)?;
                if let Some(trace) = trace {
                    service_kit::telemetry::link(&span, &trace);
                }
                span
            } else {
                tracing::Span::none()
            };
            let batch = self.purge_batch(script, &key, &member, producer);
            let taken = service_kit::store::timed("redis", "purge_batch", batch)
                .instrument(span)
                .await?;
            if taken < PURGE_BATCH {
                let () = redis::pipe()
                    .atomic()
                    .srem(&set, &member)
                    .ignore()
                    .hdel(self.purge_traces_key(), &member)
                    .ignore()
                    .query_async(&mut redis)
                    .await
                    .map_err(classify)?;
            }
            Ok(true)
        })
        .await
    }

    fn revocations_key(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    /// Stores `revocation` unless a later one is stored already.
    pub async fn revoke(&self, revocation: &Revocation) -> Result<()> {
        service_kit::store::timed("redis", "revoke", async move {
            let mut redis = self.ready()?;
            let _: i64 = self
                .revoke
                .key(self.revocations_key())
                .arg(revocation.user_id.to_string())
                .arg(revocation.issued_before.timestamp())
                .arg(revocation.reason.as_str())
                .invoke_async(&mut redis)
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// The revocations hash, for the verifier's sync.
    #[must_use]
    pub fn revocation_store(&self) -> RedisRevocations {
        RedisRevocations {
            redis: self.redis.clone(),
            key: self.revocations_key(),
        }
    }
}

/// What a recorded purge is of.
#[derive(Clone, Copy, Debug)]
pub enum PurgeOf {
    User(UserId),
    Message(MessageId),
}

/// The revocations hash as the verifier's sync reads it. Small by
/// construction (pruned past the longest token lifetime), so it is read
/// whole.
#[derive(Clone)]
pub struct RedisRevocations {
    redis: ConnectionManager,
    key: String,
}

impl RedisRevocations {
    async fn all(&self) -> anyhow::Result<Vec<Revocation>> {
        let mut redis = self.redis.clone();
        let raw: HashMap<String, String> = redis.hgetall(&self.key).await?;
        Ok(raw
            .iter()
            .filter_map(|(user, value)| {
                let (cutoff, reason) = value.split_once(':')?;
                Some(Revocation {
                    user_id: uuid::Uuid::try_parse(user).ok()?,
                    issued_before: Utc.timestamp_opt(cutoff.parse().ok()?, 0).single()?,
                    reason: RevocationReason::parse(reason)?,
                })
            })
            .collect())
    }
}

impl RevocationStore for RedisRevocations {
    async fn active(&self, since: DateTime<Utc>) -> anyhow::Result<Vec<Revocation>> {
        let mut all = self.all().await?;
        all.retain(|r| r.issued_before > since);
        Ok(all)
    }

    async fn prune(&self, before: DateTime<Utc>) -> anyhow::Result<()> {
        let old: Vec<String> = self
            .all()
            .await?
            .into_iter()
            .filter(|r| r.issued_before < before)
            .map(|r| r.user_id.to_string())
            .collect();
        if !old.is_empty() {
            let mut redis = self.redis.clone();
            let _: i64 = redis.hdel(&self.key, old).await?;
        }
        Ok(())
    }
}

impl Store {
    /// The outbox stream, for the relay.
    #[must_use]
    pub fn outbox(&self) -> RedisOutbox {
        RedisOutbox {
            redis: self.redis.clone(),
            key: self.outbox_key(),
            dead_key: format!("{}:dead", self.outbox_key()),
            dead_letter: Script::new(DEAD_LETTER_SCRIPT),
            retry: Script::new(RETRY_SCRIPT),
        }
    }
}

/// The outbox stream as the relay sees it: entries are read oldest first and
/// deleted (`XDEL`) once delivered, or moved to `{p}outbox:dead`.
#[derive(Clone)]
pub struct RedisOutbox {
    redis: ConnectionManager,
    key: String,
    dead_key: String,
    dead_letter: Script,
    retry: Script,
}

/// When a stream entry was added: its id starts with the milliseconds.
fn stream_id_time(id: &str) -> Option<DateTime<Utc>> {
    let ms = id.split('-').next()?.parse::<i64>().ok()?;
    Utc.timestamp_millis_opt(ms).single()
}

impl Outbox for RedisOutbox {
    async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let mut redis = self.redis.clone();
        let reply: StreamRangeReply = redis.xrange_count(&self.key, "-", "+", limit).await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| {
                let event = entry
                    .get::<String>("event")
                    .ok_or_else(|| "the entry has no event".to_owned())
                    .and_then(|json| Event::from_json(&json).map_err(|e| e.to_string()));
                Pending {
                    event,
                    position: entry.id,
                }
            })
            .collect())
    }

    async fn mark_delivered(&self, delivered: &[Pending]) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let ids: Vec<&str> = delivered.iter().map(|p| p.position.as_str()).collect();
        let _: i64 = redis.xdel(&self.key, &ids).await?;
        Ok(())
    }

    async fn dead_letter(&self, rejected: &[Rejected]) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let mut invocation = self.dead_letter.key(&self.key);
        invocation.key(&self.dead_key);
        for r in rejected {
            invocation.arg(&r.position).arg(&r.reason);
        }
        let _: i64 = invocation.invoke_async(&mut redis).await?;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let mut redis = self.redis.clone();
        let reply: StreamRangeReply = redis.xrange_count(&self.dead_key, "-", "+", limit).await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| DeadLetter {
                position: entry.get("position").unwrap_or_default(),
                event_id: entry
                    .get::<String>("event")
                    .and_then(|json| Event::from_json(&json).ok())
                    .map(|event| event.id.to_string()),
                reason: entry.get("reason").unwrap_or_default(),
                failed_at: stream_id_time(&entry.id).unwrap_or_default(),
            })
            .collect())
    }

    async fn retry_dead_letters(&self, limit: usize) -> anyhow::Result<u64> {
        let mut redis = self.redis.clone();
        let moved: u64 = self
            .retry
            .key(&self.key)
            .key(&self.dead_key)
            .arg(limit)
            .invoke_async(&mut redis)
            .await?;
        Ok(moved)
    }

    async fn backlog(&self) -> anyhow::Result<Backlog> {
        let mut redis = self.redis.clone();
        let (depth, first, dead_letters): (u64, StreamRangeReply, u64) = redis::pipe()
            .xlen(&self.key)
            .xrange_count(&self.key, "-", "+", 1)
            .xlen(&self.dead_key)
            .query_async(&mut redis)
            .await?;
        Ok(Backlog {
            depth,
            oldest: first.ids.first().and_then(|e| stream_id_time(&e.id)),
            dead_letters,
        })
    }
}

fn comment_from_hash(id: CommentId, mut fields: Fields) -> Result<Option<Comment>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut take = |name: &str| fields.remove(name).ok_or_else(|| corrupt("a comment hash"));
    let message_id = MessageId::parse("message_id", &take("message_id")?).map_err(|_| corrupt("a message id"))?;
    let author_id = UserId::parse("author_id", &take("author_id")?).map_err(|_| corrupt("an author id"))?;
    let message_author_id =
        UserId::parse("message_author_id", &take("message_author_id")?).map_err(|_| corrupt("an author id"))?;
    let body = Body::from_stored(take("body")?);
    Ok(Some(Comment {
        id,
        message_id,
        author_id,
        message_author_id,
        body,
    }))
}

fn corrupt(what: &str) -> Error {
    Error::internal(anyhow::anyhow!("Redis holds a malformed {what}"))
}

/// Tells "Redis is unreachable" (UNAVAILABLE) from everything else.
fn classify(err: redis::RedisError) -> Error {
    if err.is_io_error() || err.is_connection_refusal() || err.is_timeout() || err.is_connection_dropped() {
        Error::store_unavailable(Some(anyhow::Error::new(err)))
    } else {
        Error::internal(anyhow::Error::new(err).context("querying Redis"))
    }
}
