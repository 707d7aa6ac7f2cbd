//! The rules of comment-service.
//!
//! | call | on failure |
//! |---|---|
//! | message-service CheckMessage (does the message exist?) | AddComment answers UNAVAILABLE at once; a comment is never stored on a message nobody could vouch for |
//!
//! A positive answer is remembered for MESSAGE_EXISTS_CACHE_TTL (default 5 s),
//! so a burst of comments on one message costs one check.

use std::time::Duration;

use std::sync::Arc;

use service_kit::{
    events::{Event, Payload},
    revocation::{Revocation, Revocations},
};
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::{
    clients::{MessageClient, UserClient},
    domain::{Body, Caller, Comment, CommentId, MessageId, MessageIds, Page, PageRequest, UserId},
    error::{Error, Result},
    store::{PurgeOf, Store},
};

/// Who sent a batch to ApplyEvents, proven by the credential presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Producer {
    /// user-service's service token: revocations, bans, erasures.
    UserService,
    /// The ingest token: message-service's deletions.
    MessageService,
}

/// Producer name in the events this service writes.
pub const PRODUCER: &str = "comment-service";

pub struct Comments {
    store: Store,
    messages: MessageClient,
    users: UserClient,
    revocations: Arc<Revocations>,
    /// Wakes the purge worker when a purge is recorded.
    purges: Arc<Notify>,
    /// Messages known to exist, bounded in entries and age.
    known_messages: Option<moka::sync::Cache<MessageId, UserId>>,
}

impl Comments {
    #[must_use]
    pub fn new(
        store: Store,
        messages: MessageClient,
        users: UserClient,
        revocations: Arc<Revocations>,
        purges: Arc<Notify>,
        exists_ttl: Duration,
    ) -> Self {
        let known_messages = (!exists_ttl.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(exists_ttl)
                .build()
        });
        Self {
            store,
            messages,
            users,
            revocations,
            purges,
            known_messages,
        }
    }

    /// The schema version, then the revocations the store holds: the
    /// service turns SERVING only when it knows them.
    pub async fn prepare_store(&self) -> Result<()> {
        self.store.prepare().await?;
        self.revocations
            .refresh(&self.store.revocation_store())
            .await
            .map_err(Error::internal)
    }

    pub async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    pub async fn add(&self, caller: Caller, message: MessageId, body: Body) -> Result<Comment> {
        let message_author_id = self.message_author(message).await?;
        let comment = Comment {
            id: crate::store::new_comment_id(message),
            message_id: message,
            author_id: caller.user_id.into(),
            message_author_id,
            body,
        };
        let added = Event::new(
            PRODUCER,
            Payload::CommentAdded {
                comment_id: comment.id.as_uuid(),
                message_id: comment.message_id.as_uuid(),
                author_id: comment.author_id.as_uuid(),
                message_author_id: comment.message_author_id.as_uuid(),
            },
        );
        self.store.insert(&comment, &added).await?;
        Ok(comment)
    }

    async fn message_author(&self, message: MessageId) -> Result<UserId> {
        if let Some(author) = self.known_messages.as_ref().and_then(|c| c.get(&message)) {
            return Ok(author);
        }
        match self.messages.author_of(message).await {
            Ok(Some(author)) => {
                if let Some(cache) = &self.known_messages {
                    cache.insert(message, author);
                }
                Ok(author)
            }
            Ok(None) => Err(Error::not_found("no message has that id")),
            Err(status) => Err(Error::peer_unavailable("that the message exists", status)),
        }
    }

    pub async fn list(&self, message: MessageId, page: PageRequest) -> Result<Page> {
        self.store.list(message, page).await
    }

    pub async fn counts(&self, messages: &MessageIds) -> Result<Vec<(MessageId, i64)>> {
        self.store.counts(messages.as_slice()).await
    }

    /// Authors delete their own comments; moderators and admins anyone's.
    pub async fn delete(&self, caller: Caller, id: CommentId) -> Result<()> {
        let comment = self
            .store
            .get(id)
            .await?
            .ok_or(Error::not_found("no comment has that id"))?;
        if comment.author_id != UserId::from(caller.user_id) {
            if !caller.role.can_moderate() {
                return Err(Error::permission_denied(
                    "only the author, a moderator or an admin may delete a comment",
                ));
            }
            self.check_rank(caller, comment.author_id).await?;
        }
        let deleted = Event::new(
            PRODUCER,
            Payload::CommentDeleted {
                comment_id: comment.id.as_uuid(),
                message_id: comment.message_id.as_uuid(),
                author_id: comment.author_id.as_uuid(),
                message_author_id: comment.message_author_id.as_uuid(),
            },
        );
        if self.store.delete(&comment, &deleted).await? {
            Ok(())
        } else {
            Err(Error::not_found("no comment has that id"))
        }
    }

    /// Removes every comment of `user`. Idempotent: a repeat removes nothing.
    pub async fn purge(&self, caller: Caller, user: UserId) -> Result<u64> {
        if !caller.role.can_moderate() {
            return Err(Error::permission_denied(
                "only moderators and admins may purge comments",
            ));
        }
        self.check_rank(caller, user).await?;
        self.store.purge(user, PRODUCER).await
    }

    /// A moderator acts only on users below them (asked of user-service,
    /// which owns roles; when it cannot answer, the action is refused).
    async fn check_rank(&self, caller: Caller, target: UserId) -> Result<()> {
        let role = self
            .users
            .role(target)
            .await
            .map_err(|status| Error::peer_unavailable("the user's role", status))?;
        if caller.role.may_moderate(role) {
            Ok(())
        } else {
            Err(Error::permission_denied("the user's role is not below the caller's"))
        }
    }

    /// Applies the decisions of `producer`, authorised there: void tokens,
    /// purge a banned or deleted user's comments, delete a deleted message's
    /// comments (purges are recorded, then done by the worker in batches),
    /// stop listing a hidden message's comments (and list them again when it
    /// is shown).
    /// Events of a kind this producer may not send here are ignored. Returns,
    /// for each event in order, whether it changed something.
    pub async fn apply_events(&self, producer: Producer, events: &[Event]) -> Result<Vec<bool>> {
        let mut done = Vec::with_capacity(events.len());
        for event in events {
            let applied = async {
                Ok::<bool, crate::error::Error>(match (producer, &event.payload) {
                    (
                        Producer::UserService,
                        Payload::TokensRevoked {
                            user_id,
                            issued_before,
                            reason,
                        },
                    ) => {
                        let revocation = Revocation {
                            user_id: *user_id,
                            issued_before: *issued_before,
                            reason: *reason,
                        };
                        self.store.revoke(&revocation).await?;
                        self.revocations.note(revocation);
                        true
                    }
                    (Producer::UserService, Payload::UserBanned { user_id, .. } | Payload::UserDeleted { user_id }) => {
                        self.store
                            .request_purge(PurgeOf::User(UserId::from(*user_id)), event.trace.as_deref())
                            .await?;
                        true
                    }
                    (Producer::MessageService, Payload::MessageDeleted { message_id, .. }) => {
                        let message = MessageId::from(*message_id);
                        if let Some(cache) = &self.known_messages {
                            cache.invalidate(&message);
                        }
                        self.store
                            .request_purge(PurgeOf::Message(message), event.trace.as_deref())
                            .await?;
                        self.store.set_message_hidden(message, false).await?;
                        true
                    }
                    (Producer::MessageService, Payload::MessageHidden { message_id, hidden, .. }) => {
                        let message = MessageId::from(*message_id);
                        if let Some(cache) = &self.known_messages {
                            cache.invalidate(&message);
                        }
                        self.store.set_message_hidden(message, *hidden).await?;
                        true
                    }
                    _ => false,
                })
            }
            .instrument(event.apply_span())
            .await?;
            done.push(applied);
        }
        if done.contains(&true) {
            self.purges.notify_one();
        }
        Ok(done)
    }
}

/// The purge worker's view of the store: each step deletes one batch of a
/// recorded purge, each deletion with its `CommentDeleted` event.
pub struct Purges(pub Store);

impl service_kit::jobs::Jobs for Purges {
    async fn pending(&self) -> anyhow::Result<u64> {
        Ok(self.0.purges_pending().await?)
    }

    async fn step(&self) -> anyhow::Result<bool> {
        Ok(self.0.purge_step(PRODUCER).await?)
    }
}

impl service_kit::store::Probe for Comments {
    async fn prepare(&self) -> anyhow::Result<()> {
        Ok(self.prepare_store().await?)
    }

    async fn ping(&self) -> anyhow::Result<()> {
        Ok(Comments::ping(self).await?)
    }
}
