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
//! Counting many messages' comments is one pipelined round trip of `ZCARD`s.

use std::{collections::HashMap, time::Duration};

use chrono::{SecondsFormat, TimeZone as _, Utc};
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::StreamRangeReply,
    AsyncCommands as _, Script,
};
use service_kit::{
    events::Event,
    relay::{Backlog, Outbox, Pending},
    store::StoreStatus,
};

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

#[derive(Clone)]
pub struct Store {
    redis: ConnectionManager,
    prefix: String,
    status: StoreStatus,
    delete: Script,
    purge: Script,
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
        })
    }

    fn ready(&self) -> Result<ConnectionManager> {
        if self.status.is_up() {
            Ok(self.redis.clone())
        } else {
            Err(Error::StoreUnavailable(None))
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
            return Err(Error::Internal(anyhow::anyhow!(
                "Redis holds schema version {stored}; this build knows up to {SCHEMA_VERSION}"
            )));
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        let mut redis = self.redis.clone();
        let _: String = redis::cmd("PING").query_async(&mut redis).await.map_err(classify)?;
        Ok(())
    }

    fn outbox_key(&self) -> String {
        format!("{}outbox", self.prefix)
    }

    /// Stores a comment and its event in one `MULTI`/`EXEC`.
    pub async fn insert(&self, comment: &Comment, event: &Event) -> Result<()> {
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
    }

    pub async fn get(&self, id: CommentId) -> Result<Option<Comment>> {
        let mut redis = self.ready()?;
        let fields: HashMap<String, String> = redis.hgetall(self.comment_key(id)).await.map_err(classify)?;
        comment_from_hash(id, fields)
    }

    /// A message's comments, oldest first.
    pub async fn list(&self, message: MessageId, page: PageRequest) -> Result<Page> {
        let mut redis = self.ready()?;
        let min = page.after.map_or_else(|| "-".to_owned(), |after| format!("({after}"));
        // One more than asked says whether another page follows.
        let ids: Vec<String> = redis
            .zrangebylex_limit(self.message_key(message), &min, "+", 0, page.size as isize + 1)
            .await
            .map_err(classify)?;
        let more = ids.len() > page.size as usize;
        let ids: Vec<CommentId> = ids
            .iter()
            .take(page.size as usize)
            .map(|raw| CommentId::parse("id", raw).map_err(|_| corrupt("a comment id in a message's set")))
            .collect::<Result<_>>()?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(self.comment_key(*id));
        }
        let hashes: Vec<HashMap<String, String>> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut redis).await.map_err(classify)?
        };
        let mut comments = Vec::with_capacity(ids.len());
        for (id, fields) in ids.iter().zip(hashes) {
            // Deleted between the two round trips: skip it.
            if let Some(comment) = comment_from_hash(*id, fields)? {
                comments.push(comment);
            }
        }
        let next = if more { ids.last().copied() } else { None };
        Ok(Page { comments, next })
    }

    /// Comment counts of many messages in one round trip.
    pub async fn counts(&self, messages: &[MessageId]) -> Result<Vec<(MessageId, i64)>> {
        let mut redis = self.ready()?;
        let mut pipe = redis::pipe();
        for id in messages {
            pipe.zcard(self.message_key(*id));
        }
        let counts: Vec<i64> = pipe.query_async(&mut redis).await.map_err(classify)?;
        Ok(messages.iter().copied().zip(counts).collect())
    }

    /// Deletes a comment and writes its event, atomically; `false` when it
    /// was already gone (and then no event is written).
    pub async fn delete(&self, id: CommentId, event: &Event) -> Result<bool> {
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
    }

    /// Deletes every comment of a user, a batch per atomic step, each
    /// deletion with its `CommentDeleted` event from `producer`; the number
    /// deleted (0 when repeated).
    pub async fn purge(&self, user: UserId, producer: &str) -> Result<u64> {
        let mut redis = self.ready()?;
        let mut total = 0u64;
        loop {
            let occurred_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
            let mut invocation = self.purge.key(self.user_key(user));
            invocation
                .arg(&self.prefix)
                .arg(PURGE_BATCH)
                .arg(user.to_string())
                .arg(producer)
                .arg(occurred_at);
            for _ in 0..PURGE_BATCH {
                invocation.arg(uuid::Uuid::now_v7().to_string());
            }
            let deleted: usize = invocation.invoke_async(&mut redis).await.map_err(classify)?;
            total += deleted as u64;
            if deleted < PURGE_BATCH {
                return Ok(total);
            }
        }
    }
}

impl Store {
    /// The outbox stream, for the relay.
    #[must_use]
    pub fn outbox(&self) -> RedisOutbox {
        RedisOutbox {
            redis: self.redis.clone(),
            key: self.outbox_key(),
        }
    }
}

/// The outbox stream as the relay sees it: entries are read oldest first and
/// deleted (`XDEL`) once delivered.
#[derive(Clone)]
pub struct RedisOutbox {
    redis: ConnectionManager,
    key: String,
}

impl Outbox for RedisOutbox {
    async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let mut redis = self.redis.clone();
        let reply: StreamRangeReply = redis.xrange_count(&self.key, "-", "+", limit).await?;
        reply
            .ids
            .into_iter()
            .map(|entry| {
                let json: String = entry
                    .get("event")
                    .ok_or_else(|| anyhow::anyhow!("outbox entry {} has no event", entry.id))?;
                Ok(Pending {
                    event: Event::from_json(&json)?,
                    position: entry.id,
                })
            })
            .collect()
    }

    async fn mark_delivered(&self, delivered: &[Pending]) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let ids: Vec<&str> = delivered.iter().map(|p| p.position.as_str()).collect();
        let _: i64 = redis.xdel(&self.key, &ids).await?;
        Ok(())
    }

    async fn backlog(&self) -> anyhow::Result<Backlog> {
        let mut redis = self.redis.clone();
        let depth: u64 = redis.xlen(&self.key).await?;
        let first: StreamRangeReply = redis.xrange_count(&self.key, "-", "+", 1).await?;
        // A stream id starts with the milliseconds it was added at.
        let oldest = first
            .ids
            .first()
            .and_then(|e| e.id.split('-').next()?.parse::<i64>().ok())
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
        Ok(Backlog { depth, oldest })
    }
}

fn comment_from_hash(id: CommentId, mut fields: HashMap<String, String>) -> Result<Option<Comment>> {
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
    Error::Internal(anyhow::anyhow!("Redis holds a malformed {what}"))
}

/// Tells "Redis is unreachable" (UNAVAILABLE) from everything else.
fn classify(err: redis::RedisError) -> Error {
    if err.is_io_error() || err.is_connection_refusal() || err.is_timeout() || err.is_connection_dropped() {
        Error::StoreUnavailable(Some(anyhow::Error::new(err)))
    } else {
        Error::Internal(anyhow::Error::new(err).context("querying Redis"))
    }
}
