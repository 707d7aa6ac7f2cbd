//! The rules of comment-service.
//!
//! | call | on failure |
//! |---|---|
//! | message-service CheckMessage (does the message exist?) | AddComment answers UNAVAILABLE at once; a comment is never stored on a message nobody could vouch for |
//!
//! A positive answer is remembered for MESSAGE_EXISTS_CACHE_TTL (default 5 s),
//! so a burst of comments on one message costs one check.

use std::time::Duration;

use service_kit::events::{Event, Payload};

use crate::{
    clients::MessageClient,
    domain::{Body, Caller, Comment, CommentId, MessageId, MessageIds, Page, PageRequest, UserId},
    error::{Error, Result},
    store::Store,
};

/// Producer name in the events this service writes.
pub const PRODUCER: &str = "comment-service";

pub struct Comments {
    store: Store,
    messages: MessageClient,
    /// Messages known to exist, bounded in entries and age.
    known_messages: Option<moka::sync::Cache<MessageId, UserId>>,
}

impl Comments {
    #[must_use]
    pub fn new(store: Store, messages: MessageClient, exists_ttl: Duration) -> Self {
        let known_messages = (!exists_ttl.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(exists_ttl)
                .build()
        });
        Self {
            store,
            messages,
            known_messages,
        }
    }

    pub async fn prepare_store(&self) -> Result<()> {
        self.store.prepare().await
    }

    pub async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    pub async fn add(&self, caller: Caller, message: MessageId, body: Body) -> Result<Comment> {
        let message_author_id = self.message_author(message).await?;
        let comment = Comment {
            id: CommentId::new(),
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
            Ok(None) => Err(Error::NotFound("no message has that id")),
            Err(status) => Err(Error::MessageCheckUnavailable(status)),
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
            .ok_or(Error::NotFound("no comment has that id"))?;
        if comment.author_id != UserId::from(caller.user_id) && !caller.role.can_moderate() {
            return Err(Error::PermissionDenied(
                "only the author, a moderator or an admin may delete a comment",
            ));
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
        if self.store.delete(id, &deleted).await? {
            Ok(())
        } else {
            Err(Error::NotFound("no comment has that id"))
        }
    }

    /// Removes every comment of `user`. Idempotent: a repeat removes nothing.
    pub async fn purge(&self, caller: Caller, user: UserId) -> Result<u64> {
        if !caller.role.can_moderate() {
            return Err(Error::PermissionDenied("only moderators and admins may purge comments"));
        }
        self.store.purge(user, PRODUCER).await
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
