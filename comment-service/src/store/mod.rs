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
//! | `{p}c:{comment_id}` | hash | `message_id`, `author_id`, `body` |
//! | `{p}m:{message_id}` | sorted set | the message's comment ids, all at score 0 |
//! | `{p}u:{user_id}` | set | the user's comment ids, for purging |
//!
//! Comment ids are UUIDv7: their text sorts by creation time, so with every
//! score equal a sorted set orders them by time and `ZRANGEBYLEX` pages them
//! from a cursor (the last id seen), stable however many share a millisecond.
//! The creation time itself is read back from the id.
//!
//! # Atomicity
//!
//! Adding a comment writes three keys in one `MULTI`/`EXEC`. Deleting one and
//! purging a user's run as Lua scripts, because which keys to touch depends
//! on what the comment hash holds; a script reads and writes in one atomic
//! step. (Those scripts derive keys from data, so they need a single Redis
//! or a cluster with one hash slot per prefix; Chirp runs a single primary.)
//! Counting many messages' comments is one pipelined round trip of `ZCARD`s.

use std::{collections::HashMap, time::Duration};

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    AsyncCommands as _, Script,
};
use service_kit::store::StoreStatus;

use crate::{
    domain::{Body, Comment, CommentId, MessageId, Page, PageRequest, UserId},
    error::{Error, Result},
};

/// The data model above. Bump it with a migration when keys change.
const SCHEMA_VERSION: u32 = 1;
/// Comments purged per script run, so a prolific user does not block Redis.
const PURGE_BATCH: usize = 500;

const DELETE_SCRIPT: &str = r"
local fields = redis.call('HMGET', KEYS[1], 'message_id', 'author_id')
if not fields[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. 'm:' .. fields[1], ARGV[2])
redis.call('SREM', ARGV[1] .. 'u:' .. fields[2], ARGV[2])
return 1
";

const PURGE_SCRIPT: &str = r"
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local message = redis.call('HGET', ARGV[1] .. 'c:' .. id, 'message_id')
  if message then redis.call('ZREM', ARGV[1] .. 'm:' .. message, id) end
  redis.call('DEL', ARGV[1] .. 'c:' .. id)
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

    pub async fn insert(&self, comment: &Comment) -> Result<()> {
        let mut redis = self.ready()?;
        let id = comment.id.to_string();
        redis::pipe()
            .atomic()
            .hset_multiple(
                self.comment_key(comment.id),
                &[
                    ("message_id", comment.message_id.to_string()),
                    ("author_id", comment.author_id.to_string()),
                    ("body", comment.body.as_str().to_owned()),
                ],
            )
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

    /// Deletes a comment; `false` when it was already gone.
    pub async fn delete(&self, id: CommentId) -> Result<bool> {
        let mut redis = self.ready()?;
        let deleted: i64 = self
            .delete
            .key(self.comment_key(id))
            .arg(&self.prefix)
            .arg(id.to_string())
            .invoke_async(&mut redis)
            .await
            .map_err(classify)?;
        Ok(deleted == 1)
    }

    /// Deletes every comment of a user, a batch per atomic step; the number
    /// deleted (0 when repeated).
    pub async fn purge(&self, user: UserId) -> Result<u64> {
        let mut redis = self.ready()?;
        let mut total = 0u64;
        loop {
            let deleted: usize = self
                .purge
                .key(self.user_key(user))
                .arg(&self.prefix)
                .arg(PURGE_BATCH)
                .invoke_async(&mut redis)
                .await
                .map_err(classify)?;
            total += deleted as u64;
            if deleted < PURGE_BATCH {
                return Ok(total);
            }
        }
    }
}

fn comment_from_hash(id: CommentId, mut fields: HashMap<String, String>) -> Result<Option<Comment>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut take = |name: &str| fields.remove(name).ok_or_else(|| corrupt("a comment hash"));
    let message_id = MessageId::parse("message_id", &take("message_id")?).map_err(|_| corrupt("a message id"))?;
    let author_id = UserId::parse("author_id", &take("author_id")?).map_err(|_| corrupt("an author id"))?;
    let body = Body::from_stored(take("body")?);
    Ok(Some(Comment {
        id,
        message_id,
        author_id,
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
