//! Purges: every comment of a user (ban, erasure, PurgeUserComments) or of
//! a deleted message, a bounded batch per atomic step, each deletion with
//! its `CommentDeleted` event. A user's comments are spread over the
//! groups of the messages they commented on, so a user's purge visits
//! each group that holds some; a message's comments are all in its group.

use redis::AsyncCommands as _;
use service_kit::events::{Event, Payload};
use tracing::Instrument as _;

use super::{
    classify, corrupt,
    keys::{Group, Keys},
    replication, value, Redis, Store,
};
use crate::{
    domain::{Comment, CommentId, MessageId, UserId},
    error::Result,
};

/// Comments purged per script run, so a prolific user does not block Redis.
const BATCH: usize = 500;

/// What a recorded purge is of.
#[derive(Clone, Copy, Debug)]
pub enum PurgeOf {
    User(UserId),
    Message(MessageId),
}

fn deleted(comment: &Comment, producer: &str) -> anyhow::Result<String> {
    Event::new(
        producer,
        Payload::CommentDeleted {
            comment_id: comment.id.as_uuid(),
            message_id: comment.message_id.as_uuid(),
            author_id: comment.author_id.as_uuid(),
            message_author_id: comment.message_author_id.as_uuid(),
        },
    )
    .to_json()
}

/// The comments `ids` as stored now (`None`: gone already), in one `MGET`
/// (they share a group).
async fn read(redis: &mut Redis, keys: &Keys, ids: &[String]) -> Result<Vec<(CommentId, Option<Comment>)>> {
    let ids: Vec<CommentId> = ids
        .iter()
        .map(|raw| CommentId::parse("id", raw).map_err(|_| corrupt("a comment id in a purge's set")))
        .collect::<Result<_>>()?;
    let stored: Vec<Option<String>> = redis::cmd("MGET")
        .arg(ids.iter().map(|id| keys.comment(*id)).collect::<Vec<_>>())
        .query_async(redis)
        .await
        .map_err(classify)?;
    ids.into_iter()
        .zip(stored)
        .map(|(id, stored)| Ok((id, stored.map(|v| value::decode(id, &v)).transpose()?)))
        .collect()
}

impl Store {
    /// Deletes every comment of a user, a batch per atomic step; the number
    /// deleted (0 when repeated).
    pub async fn purge(&self, user: UserId, producer: &str) -> Result<u64> {
        service_kit::store::timed("redis", "purge", async move {
            let mut total = 0u64;
            for group in self.groups_holding(user).await? {
                loop {
                    let (taken, deleted) = self.purge_user_batch(group, user, producer).await?;
                    total += deleted;
                    if taken < BATCH {
                        break;
                    }
                }
            }
            Ok(total)
        })
        .await
    }

    /// The groups where `user` has comments: one `SCARD` per group, sent at
    /// once.
    async fn groups_holding(&self, user: UserId) -> Result<Vec<Group>> {
        let redis = self.ready()?;
        let asked = Group::all().map(|group| {
            let mut redis = redis.clone();
            let key = self.keys.user(group, user);
            async move {
                let n: u64 = redis.scard(&key).await?;
                Ok::<_, redis::RedisError>((group, n))
            }
        });
        Ok(futures::future::try_join_all(asked)
            .await
            .map_err(classify)?
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(group, _)| group)
            .collect())
    }

    /// One atomic batch of `user`'s comments in `group`: how many ids it
    /// took from the set, and how many comments it deleted.
    async fn purge_user_batch(&self, group: Group, user: UserId, producer: &str) -> Result<(usize, u64)> {
        let mut redis = self.ready()?;
        let set = self.keys.user(group, user);
        let ids: Vec<String> = redis
            .srandmember_multiple(&set, BATCH as isize)
            .await
            .map_err(classify)?;
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let deleted = self
            .purge_batch(
                &mut redis,
                group,
                (&set, "SREM"),
                (|c: &Comment| self.keys.message(c.message_id), "ZREM"),
                &ids,
                producer,
            )
            .await?;
        Ok((ids.len(), deleted))
    }

    /// Deletes the comments `ids` of `group` that still exist, each with
    /// its event, and takes every id out of `from` (the purge's container,
    /// with the command that removes a member from it); `other` is the
    /// other container a comment is in, with the command that removes it
    /// from there. The number deleted.
    async fn purge_batch(
        &self,
        redis: &mut Redis,
        group: Group,
        (from, remove): (&str, &str),
        (other, other_remove): (impl Fn(&Comment) -> String, &str),
        ids: &[String],
        producer: &str,
    ) -> Result<u64> {
        let mut keys = vec![from.to_owned(), self.keys.outbox(group)];
        let mut args = vec![remove.to_owned(), other_remove.to_owned()];
        for (id, comment) in read(redis, &self.keys, ids).await? {
            let key = self.keys.comment(id);
            args.push(id.to_string());
            match comment {
                Some(comment) => {
                    keys.extend([key, other(&comment)]);
                    args.push(deleted(&comment, producer)?);
                }
                // Gone already: it only leaves `from` (the second key is
                // not touched).
                None => {
                    keys.extend([key.clone(), key]);
                    args.push(String::new());
                }
            }
        }
        self.eval(redis, group.index(), &self.purge, &keys, &args).await
    }

    /// One atomic batch of a deleted message's comments: how many ids it
    /// took from the message's list.
    async fn purge_message_batch(&self, message: MessageId, producer: &str) -> Result<usize> {
        let mut redis = self.ready()?;
        let group = Group::of_message(message);
        let list = self.keys.message(message);
        let ids: Vec<String> = redis.zrange(&list, 0, BATCH as isize - 1).await.map_err(classify)?;
        if ids.is_empty() {
            return Ok(0);
        }
        self.purge_batch(
            &mut redis,
            group,
            (&list, "ZREM"),
            (|c: &Comment| self.keys.user(group, c.author_id), "SREM"),
            &ids,
            producer,
        )
        .await?;
        Ok(ids.len())
    }

    /// Records that the comments of a user (ban, erasure) or of a deleted
    /// message are to be purged (idempotent; the worker does it in batches).
    /// `trace` is the `traceparent` of the request that caused it (the ban,
    /// the deletion), kept beside the job so the worker's spans link to it.
    pub async fn request_purge(&self, what: PurgeOf, trace: Option<&str>) -> Result<()> {
        service_kit::store::timed("redis", "request_purge", async move {
            let mut redis = self.ready()?;
            let (set, member) = self.purge_member(what);
            let keys = [set, self.keys.purge_traces()];
            let args = [member, trace.unwrap_or_default().to_owned()];
            let _: i64 = self
                .eval(&mut redis, replication::META, &self.request_purge, &keys, &args)
                .await?;
            Ok(())
        })
        .await
    }

    fn purge_member(&self, what: PurgeOf) -> (String, String) {
        match what {
            PurgeOf::User(id) => (self.keys.purge_users(), id.to_string()),
            PurgeOf::Message(id) => (self.keys.purge_messages(), id.to_string()),
        }
    }

    pub async fn purges_pending(&self) -> Result<u64> {
        service_kit::store::timed("redis", "purges_pending", async move {
            let mut redis = self.ready()?;
            let (users, messages): (u64, u64) = redis::pipe()
                .scard(self.keys.purge_users())
                .scard(self.keys.purge_messages())
                .query_async(&mut redis)
                .await
                .map_err(classify)?;
            Ok(users + messages)
        })
        .await
    }

    /// One batch of one recorded purge; the job is dropped once nothing is
    /// left of it. `false` when none is waiting.
    pub async fn purge_step(&self, producer: &str) -> Result<bool> {
        service_kit::store::timed("redis", "purge_step", async move {
            let mut redis = self.ready()?;
            let user: Option<String> = redis.srandmember(self.keys.purge_users()).await.map_err(classify)?;
            let what = if let Some(user) = user {
                PurgeOf::User(UserId::parse("user", &user).map_err(|_| corrupt("a user id in the purge set"))?)
            } else {
                let message: Option<String> = redis.srandmember(self.keys.purge_messages()).await.map_err(classify)?;
                let Some(message) = message else {
                    return Ok(false);
                };
                PurgeOf::Message(
                    MessageId::parse("message", &message).map_err(|_| corrupt("a message id in the purge set"))?,
                )
            };
            let (set, member) = self.purge_member(what);
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
                let trace: Option<String> = redis.hget(self.keys.purge_traces(), &member).await.map_err(classify)?;
                if let Some(trace) = trace {
                    service_kit::telemetry::link(&span, &trace);
                }
                span
            } else {
                tracing::Span::none()
            };
            let batch = async {
                match what {
                    PurgeOf::User(user) => {
                        let groups = self.groups_holding(user).await?;
                        let Some(group) = groups.first() else {
                            return Ok::<_, crate::error::Error>(true);
                        };
                        let (taken, _) = self.purge_user_batch(*group, user, producer).await?;
                        Ok(groups.len() == 1 && taken < BATCH)
                    }
                    PurgeOf::Message(message) => Ok(self.purge_message_batch(message, producer).await? < BATCH),
                }
            };
            let done = service_kit::store::timed("redis", "purge_batch", batch)
                .instrument(span)
                .await?;
            if done {
                let () = redis::pipe()
                    .atomic()
                    .srem(&set, &member)
                    .ignore()
                    .hdel(self.keys.purge_traces(), &member)
                    .ignore()
                    .query_async(&mut redis)
                    .await
                    .map_err(classify)?;
            }
            Ok(true)
        })
        .await
    }
}
