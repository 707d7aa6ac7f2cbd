//! The only module that talks to Redis.
//!
//! # Data model (schema version 2)
//!
//! Every key is `{p}{tag}rest`, `{p}` the configured prefix (default
//! `chirp:comments:`) and `{tag}` a Redis Cluster hash tag: a group's tag
//! (`{g<k>.<n>}`, one of sixteen, chosen by the message) or `{meta}`. Why,
//! and how a group is chosen: [`keys`].
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}{meta}schema_version` | string | the data model's version, written at start-up |
//! | `{p}{g}c:{comment_id}` | string | `message_id author_id message_author_id body` ([`value`]) |
//! | `{p}{g}m:{message_id}` | sorted set | the message's comment ids, all at score 0 |
//! | `{p}{g}u:{user_id}` | set | the user's comment ids in this group, for purging |
//! | `{p}{g}hidden` | set | the group's messages that message-service hides (their author is banned): their comments are kept but not listed |
//! | `{p}{g}outbox` | stream | the group's events waiting for delivery (field `event`: JSON), deleted once delivered |
//! | `{p}{g}outbox:dead` | stream | outbox entries set aside (rejected by analytics-service, or unreadable): `event` as stored, `reason`, `position`; the entry id tells when |
//! | `{p}{meta}revocations` | hash | user id → `{issued_before unix seconds}:{reason}`, the latest `TokensRevoked` per user |
//! | `{p}{meta}purge:users` | set | users whose comments are still being purged (ban, erasure) |
//! | `{p}{meta}purge:messages` | set | deleted messages whose comments are still being deleted |
//! | `{p}{meta}purge:traces` | hash | purge member → `traceparent` of the request that asked for it (only while traced) |
//!
//! Comment ids are UUIDv7: their text sorts by creation time, so with every
//! score equal a sorted set orders them by time and `ZRANGEBYLEX` pages them
//! from a cursor (the last id seen), stable however many share a millisecond.
//! The creation time itself is read back from the id.
//!
//! # Atomicity
//!
//! Every atomic step touches keys of one group, so one hash slot: adding a
//! comment (the comment, its message's list, its author's set and its
//! outbox event), deleting one, and each batch of a purge, is a script
//! ([`scripts`]) given every key it touches; on a cluster the replica's
//! `WAIT` follows it in the same pipeline ([`replication`]). Listing a
//! page takes two round trips to the group's node (the ids with the hidden
//! check and the total, then one `MGET` of the comments); a comment deleted
//! between them is neither listed nor counted, so a page and its total
//! agree. Counting many messages' comments is one pipeline of `ZCARD`s per
//! group, sent at once. The outbox is one stream per group, because an
//! event must be written in the same step as its comment; the relay reads
//! all sixteen ([`outbox`]).

mod connection;
pub mod keys;
mod maintenance;
mod outbox;
mod purge;
mod replication;
mod revocations;
mod scripts;
pub mod value;

use std::{collections::BTreeMap, sync::Arc};

pub use connection::{Address, Redis};
pub use keys::new_comment_id;
use keys::{Group, Keys};
pub use maintenance::Maintenance;
pub use outbox::RedisOutbox;
pub use purge::PurgeOf;
use redis::AsyncCommands as _;
use replication::{Replication, Slot};
pub use revocations::RedisRevocations;
use scripts::Lua;
use service_kit::{events::Event, store::StoreStatus};

use crate::{
    domain::{Comment, CommentId, MessageId, Page, PageRequest},
    error::{Error, Result},
};

/// The data model above. Bump it with a migration when keys change.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Clone)]
pub struct Store {
    redis: Redis,
    keys: Keys,
    status: StoreStatus,
    /// On a cluster: writes wait for the master's replica.
    replication: Option<Arc<Replication>>,
    insert: Lua,
    request_purge: Lua,
    delete: Lua,
    purge: Lua,
    revoke: Lua,
}

impl Store {
    /// A connection made on demand (and remade after Redis restarts or a
    /// cluster fails over), so the service starts (and reports
    /// NOT_SERVING) while Redis is down.
    ///
    /// # Errors
    /// When an URL cannot be parsed.
    pub fn connect_lazy(address: &Address, prefix: &str, status: StoreStatus) -> anyhow::Result<Self> {
        Ok(Self {
            redis: Redis::connect_lazy(address)?,
            keys: Keys::new(prefix),
            status,
            replication: matches!(address, Address::Cluster(_)).then(|| Arc::new(Replication::new())),
            insert: Lua::new(scripts::INSERT),
            request_purge: Lua::new(scripts::REQUEST_PURGE),
            delete: Lua::new(scripts::DELETE),
            purge: Lua::new(scripts::PURGE),
            revoke: Lua::new(scripts::REVOKE),
        })
    }

    /// Whether the store is a cluster (the only kind with replicas to wait
    /// for).
    fn on_cluster(&self) -> bool {
        self.replication.is_some()
    }

    fn ready(&self) -> Result<Redis> {
        if self.status.is_up() {
            Ok(self.redis.clone())
        } else {
            Err(Error::store_unavailable(None))
        }
    }

    /// Writes the schema version if none is there, and refuses to run against
    /// data written by another version.
    pub async fn prepare(&self) -> Result<()> {
        let mut redis = self.redis.clone();
        // Data model 1 kept its version outside any hash tag: its data is
        // not this layout's, and would be invisible rather than read.
        let before_tags: bool = redis
            .exists(format!("{}schema_version", self.keys.prefix()))
            .await
            .map_err(classify)?;
        if before_tags {
            return Err(Error::internal(anyhow::anyhow!(
                "Redis holds comment-service's data model 1 under this prefix; this build reads and writes {SCHEMA_VERSION}: \
                 start from an empty prefix"
            )));
        }
        let key = self.keys.schema_version();
        let _: bool = redis.set_nx(&key, SCHEMA_VERSION).await.map_err(classify)?;
        let stored: u32 = redis.get(&key).await.map_err(classify)?;
        if stored != SCHEMA_VERSION {
            return Err(Error::internal(anyhow::anyhow!(
                "Redis holds comment-service's data model {stored}; this build reads and writes {SCHEMA_VERSION}"
            )));
        }
        Ok(())
    }

    /// Whether Redis serves (on a cluster: every slot).
    pub async fn ping(&self) -> Result<()> {
        service_kit::store::timed(
            "redis",
            "ping",
            async move { self.redis.probe().await.map_err(classify) },
        )
        .await
    }

    /// Stores a comment and its event in one atomic step.
    pub async fn insert(&self, comment: &Comment, event: &Event) -> Result<()> {
        service_kit::store::timed("redis", "insert", async move {
            let mut redis = self.ready()?;
            let group = Group::of_message(comment.message_id);
            let keys = [
                self.keys.comment(comment.id),
                self.keys.outbox(group),
                self.keys.message(comment.message_id),
                self.keys.user(group, comment.author_id),
            ];
            let args = [value::encode(comment), event.to_json()?, comment.id.to_string()];
            let _: i64 = self.eval(&mut redis, group.index(), &self.insert, &keys, &args).await?;
            Ok(())
        })
        .await
    }

    /// `script` as a write in `slot` (see [`replication`]).
    async fn eval<T: redis::FromRedisValue>(
        &self,
        redis: &mut Redis,
        slot: Slot,
        script: &Lua,
        keys: &[String],
        args: &[String],
    ) -> Result<T> {
        replication::eval(redis, self.replication.as_deref(), slot, script, keys, args)
            .await
            .map_err(classify)
    }

    pub async fn get(&self, id: CommentId) -> Result<Option<Comment>> {
        service_kit::store::timed("redis", "get", async move {
            let mut redis = self.ready()?;
            let stored: Option<String> = redis.get(self.keys.comment(id)).await.map_err(classify)?;
            stored.map(|v| value::decode(id, &v)).transpose()
        })
        .await
    }

    /// Records whether message-service hides `message` (idempotent; the
    /// events arrive in the order message-service wrote them).
    pub async fn set_message_hidden(&self, message: MessageId, hidden: bool) -> Result<()> {
        service_kit::store::timed("redis", "set_message_hidden", async move {
            let mut redis = self.ready()?;
            let group = Group::of_message(message);
            let mut cmd = redis::cmd(if hidden { "SADD" } else { "SREM" });
            cmd.arg(self.keys.hidden(group)).arg(message.to_string());
            let _: i64 = replication::write(&mut redis, self.replication.as_deref(), group.index(), cmd)
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// A message's comments, oldest first; none while the message is hidden.
    pub async fn list(&self, message: MessageId, page: PageRequest) -> Result<Page> {
        service_kit::store::timed("redis", "list", async move {
            let mut redis = self.ready()?;
            let list = self.keys.message(message);
            let min = page.after().map_or_else(|| "-".to_owned(), |after| format!("({after}"));
            // One more than asked says whether another page follows; the hidden
            // check and the total ride in the same round trip.
            let (hidden, ids, mut total): (bool, Vec<String>, i64) = redis::pipe()
                .sismember(self.keys.hidden(Group::of_message(message)), message.to_string())
                .zrangebylex_limit(&list, &min, "+", 0, page.size() as isize + 1)
                .zcard(&list)
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
                .map(|raw| CommentId::parse("id", raw).map_err(|_| corrupt("a comment id in a message's list")))
                .collect::<Result<_>>()?;
            let values: Vec<Option<String>> = if ids.is_empty() {
                Vec::new()
            } else {
                // `MGET` of one key answers a bare value: always ask for a list.
                redis::cmd("MGET")
                    .arg(ids.iter().map(|id| self.keys.comment(*id)).collect::<Vec<_>>())
                    .query_async(&mut redis)
                    .await
                    .map_err(classify)?
            };
            let mut comments = Vec::with_capacity(ids.len());
            for (id, stored) in ids.iter().zip(values) {
                match stored {
                    Some(stored) => comments.push(value::decode(*id, &stored)?),
                    // Deleted (a purge, most likely) since the ids were read:
                    // not listed, so not counted either.
                    None => total -= 1,
                }
            }
            let next = if more { ids.last().copied() } else { None };
            Ok(Page { comments, next, total })
        })
        .await
    }

    /// Comment counts of many messages: on one server one pipeline; on a
    /// cluster one per group (a pipeline stays in one slot), all sent at
    /// once.
    pub async fn counts(&self, messages: &[MessageId]) -> Result<Vec<(MessageId, i64)>> {
        service_kit::store::timed("redis", "counts", async move {
            let mut redis = self.ready()?;
            if !self.on_cluster() {
                let mut pipe = redis::pipe();
                for id in messages {
                    pipe.zcard(self.keys.message(*id));
                }
                let counts: Vec<i64> = pipe.query_async(&mut redis).await.map_err(classify)?;
                return Ok(messages.iter().copied().zip(counts).collect());
            }
            let mut by_group: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
            for (at, id) in messages.iter().enumerate() {
                by_group.entry(Group::of_message(*id)).or_default().push(at);
            }
            let asked = by_group.into_values().map(|positions| {
                let mut redis = redis.clone();
                let mut pipe = redis::pipe();
                for at in &positions {
                    pipe.zcard(self.keys.message(messages[*at]));
                }
                async move {
                    let counts: Vec<i64> = pipe.query_async(&mut redis).await?;
                    Ok::<_, redis::RedisError>(positions.into_iter().zip(counts))
                }
            });
            let mut counts = vec![0; messages.len()];
            for answer in futures::future::try_join_all(asked).await.map_err(classify)? {
                for (at, count) in answer {
                    counts[at] = count;
                }
            }
            Ok(messages.iter().copied().zip(counts).collect())
        })
        .await
    }

    /// Deletes `comment` (as read) and writes its event, atomically;
    /// `false` when it was already gone (and then no event is written).
    pub async fn delete(&self, comment: &Comment, event: &Event) -> Result<bool> {
        service_kit::store::timed("redis", "delete", async move {
            let mut redis = self.ready()?;
            let group = Group::of_message(comment.message_id);
            let keys = [
                self.keys.comment(comment.id),
                self.keys.message(comment.message_id),
                self.keys.user(group, comment.author_id),
                self.keys.outbox(group),
            ];
            let args = [comment.id.to_string(), event.to_json()?];
            let deleted: i64 = self.eval(&mut redis, group.index(), &self.delete, &keys, &args).await?;
            Ok(deleted == 1)
        })
        .await
    }
}

fn corrupt(what: &str) -> Error {
    Error::internal(anyhow::anyhow!("Redis holds a malformed {what}"))
}

/// Tells "Redis is unreachable" (UNAVAILABLE) from everything else. On a
/// cluster, a slot whose master is gone (`CLUSTERDOWN`, a failover under
/// way) is unreachable too.
fn classify(err: redis::RedisError) -> Error {
    if err.is_io_error()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_cluster_error()
        || matches!(
            err.kind(),
            redis::ErrorKind::ClusterConnectionNotFound | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
        )
    {
        Error::store_unavailable(Some(anyhow::Error::new(err)))
    } else {
        Error::internal(anyhow::Error::new(err).context("querying Redis"))
    }
}
