//! The rules of message-service and how its replies are put together from
//! its own store and its neighbours' answers.
//!
//! What happens when a neighbour fails (ARCHITECTURE.md, "Calls between services"):
//!
//! | call | on failure |
//! |---|---|
//! | user-service BatchGetUsers | the message still comes back; its author part is UNAVAILABLE |
//! | comment-service CountComments / ListComments | the comments part is UNAVAILABLE |
//! | user-service ListFollowing | the last known list (up to FOLLOWING_CACHE_MAX_AGE old), else the caller's own messages; the timeline says `degraded` |
//!
//! Each degraded part is also logged and counted in `degraded_parts_total`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, Opts, Registry};
use service_kit::{
    events::{Event, Payload},
    revocation::{Revocation, Revocations},
};
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::{
    clients::{CommentClient, UserClient},
    domain::{Author, Body, Caller, Comments, Enriched, Message, MessageId, Page, PageRequest, Part, Timeline, UserId},
    error::{Error, Result},
    store::Store,
};

/// Producer name in the events this service writes.
pub const PRODUCER: &str = "message-service";

/// Following lists, fresh for `ttl`, usable as a fallback up to `max_age`.
/// Bounded by the ids it holds in all, not by its number of lists, so
/// neither the user base nor a few users who follow thousands can grow it.
struct FollowingCache {
    entries: moka::sync::Cache<UserId, (Instant, std::sync::Arc<Vec<UserId>>)>,
    ttl: Duration,
}

pub struct CacheSettings {
    pub ttl: Duration,
    pub max_age: Duration,
    /// Followed ids held in all.
    pub max_ids: u64,
}

/// How to wake the background workers when a job is recorded.
pub struct Wakers {
    pub erasures: std::sync::Arc<Notify>,
    pub visibility: std::sync::Arc<Notify>,
}

pub struct Messages {
    store: Store,
    users: UserClient,
    comments: CommentClient,
    following: FollowingCache,
    preview_size: u32,
    degraded: IntCounterVec,
    revocations: std::sync::Arc<Revocations>,
    /// Wakes the erasure worker when an erasure is recorded.
    erasures: std::sync::Arc<Notify>,
    /// Wakes the visibility worker when a ban or unban is recorded.
    visibility: std::sync::Arc<Notify>,
}

impl Messages {
    /// # Errors
    /// When the metrics cannot be registered.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        users: UserClient,
        comments: CommentClient,
        cache: &CacheSettings,
        preview_size: u32,
        registry: &Registry,
        revocations: std::sync::Arc<Revocations>,
        workers: Wakers,
    ) -> anyhow::Result<Self> {
        let degraded = IntCounterVec::new(
            Opts::new(
                "degraded_parts_total",
                "Reply parts served degraded because a peer failed",
            ),
            &["part"],
        )?;
        registry.register(Box::new(degraded.clone()))?;
        Ok(Self {
            store,
            users,
            comments,
            following: FollowingCache {
                entries: moka::sync::Cache::builder()
                    .weigher(|_, (_, list): &(Instant, std::sync::Arc<Vec<UserId>>)| {
                        u32::try_from(list.len()).unwrap_or(u32::MAX).saturating_add(1)
                    })
                    .max_capacity(cache.max_ids)
                    .time_to_live(cache.max_age)
                    .build(),
                ttl: cache.ttl,
            },
            preview_size,
            degraded,
            revocations,
            erasures: workers.erasures,
            visibility: workers.visibility,
        })
    }

    /// The store's collections and indexes, then the revocations it holds:
    /// the service turns SERVING only when it knows them.
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

    pub async fn post(&self, caller: Caller, body: Body) -> Result<Message> {
        let message = Message {
            id: MessageId::new(),
            author_id: caller.user_id.into(),
            body,
            created_at: crate::domain::now(),
        };
        let posted = Event::new(
            PRODUCER,
            Payload::MessagePosted {
                message_id: message.id.as_uuid(),
                author_id: message.author_id.as_uuid(),
            },
        );
        self.store.insert(&message, &posted).await?;
        Ok(message)
    }

    /// One message with its author and its comments (count and the oldest
    /// few, in one call), both asked for at once.
    pub async fn get(&self, id: MessageId) -> Result<Enriched> {
        let message = self
            .store
            .get(id)
            .await?
            .ok_or(Error::not_found("no message has that id"))?;
        let author_ids = [message.author_id];
        let (authors, comments) = tokio::join!(
            self.users.authors(&author_ids),
            self.comments.preview(id, self.preview_size),
        );
        let author = match authors {
            Ok(authors) => authors
                .get(&message.author_id)
                .cloned()
                .map_or(Part::NotFound, Part::Ok),
            Err(status) => self.unavailable("author", &status),
        };
        let comments = match comments {
            Ok((count, preview)) => Part::Ok(Comments { count, preview }),
            Err(status) => self.unavailable("comments", &status),
        };
        Ok(Enriched {
            message,
            author,
            comments,
        })
    }

    pub async fn by_user(&self, user: UserId, page: PageRequest) -> Result<Page<Enriched>> {
        let page = self.store.by_authors(&[user], page).await?;
        Ok(self.enrich_page(page).await)
    }

    /// The caller's messages and those of everyone they follow.
    pub async fn timeline(&self, caller: Caller, page: PageRequest) -> Result<Timeline> {
        let me = UserId::from(caller.user_id);
        let (following, degraded) = self.following(me).await;
        let mut authors = Vec::with_capacity(following.len() + 1);
        authors.push(me);
        authors.extend(following.iter().copied().filter(|id| *id != me));
        let page = self.store.by_authors(&authors, page).await?;
        Ok(Timeline {
            page: self.enrich_page(page).await,
            degraded,
        })
    }

    /// The following list, and whether it is stale or missing.
    async fn following(&self, user: UserId) -> (std::sync::Arc<Vec<UserId>>, bool) {
        let cached = self.following.entries.get(&user);
        if let Some((fetched, list)) = &cached {
            if fetched.elapsed() < self.following.ttl {
                return (list.clone(), false);
            }
        }
        match self.users.following(user).await {
            Ok(list) => {
                let list = std::sync::Arc::new(list);
                self.following.entries.insert(user, (Instant::now(), list.clone()));
                (list, false)
            }
            Err(status) => {
                self.unavailable::<()>("timeline", &status);
                let fallback = cached.map(|(_, list)| list).unwrap_or_default();
                (fallback, true)
            }
        }
    }

    /// Authors and comment counts for a whole page: one call per peer, both
    /// at once, whatever the page size.
    async fn enrich_page(&self, page: Page<Message>) -> Page<Enriched> {
        let mut author_ids: Vec<UserId> = page.items.iter().map(|m| m.author_id).collect();
        author_ids.sort_unstable();
        author_ids.dedup();
        let message_ids: Vec<MessageId> = page.items.iter().map(|m| m.id).collect();
        if page.items.is_empty() {
            return Page {
                items: Vec::new(),
                next: page.next,
            };
        }
        let (authors, counts) = tokio::join!(self.users.authors(&author_ids), self.comments.counts(&message_ids));
        let authors: Option<HashMap<UserId, Author>> =
            authors.map_err(|status| self.unavailable::<()>("author", &status)).ok();
        let counts: Option<HashMap<MessageId, i64>> = counts
            .map_err(|status| self.unavailable::<()>("comments", &status))
            .ok();
        let items = page
            .items
            .into_iter()
            .map(|message| Enriched {
                author: match &authors {
                    Some(authors) => authors
                        .get(&message.author_id)
                        .cloned()
                        .map_or(Part::NotFound, Part::Ok),
                    None => Part::Unavailable,
                },
                comments: match &counts {
                    Some(counts) => Part::Ok(Comments {
                        count: counts.get(&message.id).copied().unwrap_or(0),
                        preview: Vec::new(),
                    }),
                    None => Part::Unavailable,
                },
                message,
            })
            .collect();
        Page { items, next: page.next }
    }

    fn unavailable<T>(&self, part: &'static str, status: &tonic::Status) -> Part<T> {
        tracing::warn!(part, code = ?status.code(), reason = status.message(), "serving a degraded part");
        self.degraded.with_label_values(&[part]).inc();
        Part::Unavailable
    }

    /// The author of a visible message, or `None`.
    pub async fn check(&self, id: MessageId) -> Result<Option<UserId>> {
        Ok(self.store.get(id).await?.map(|m| m.author_id))
    }

    /// Authors delete their own messages; moderators and admins anyone's.
    pub async fn delete(&self, caller: Caller, id: MessageId) -> Result<()> {
        let author = self
            .store
            .author_of(id)
            .await?
            .ok_or(Error::not_found("no message has that id"))?;
        if author != UserId::from(caller.user_id) {
            if !caller.role.can_moderate() {
                return Err(Error::permission_denied(
                    "only the author, a moderator or an admin may delete a message",
                ));
            }
            self.check_rank(caller, author).await?;
        }
        let deleted = |message: &Message| {
            Event::new(
                PRODUCER,
                Payload::MessageDeleted {
                    message_id: message.id.as_uuid(),
                    author_id: message.author_id.as_uuid(),
                },
            )
        };
        if self.store.delete(id, deleted).await? {
            Ok(())
        } else {
            Err(Error::not_found("no message has that id"))
        }
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

    /// Hides or shows all of a user's messages (moderation). Idempotent.
    pub async fn set_hidden(&self, caller: Caller, author: UserId, hidden: bool) -> Result<u64> {
        if !caller.role.can_moderate() {
            return Err(Error::permission_denied("only moderators and admins may hide messages"));
        }
        self.check_rank(caller, author).await?;
        self.set_hidden_unchecked(author, hidden).await
    }

    /// Applies user-service's decisions, already authorised there: void
    /// tokens, record that a banned or unbanned user's messages are to be
    /// hidden or shown, record an erasure (both done by workers, in chunks).
    /// Each is idempotent. Returns, for each event in order, whether it was
    /// one this service acts on.
    pub async fn apply_user_events(&self, events: &[Event]) -> Result<Vec<bool>> {
        let mut done = Vec::with_capacity(events.len());
        for event in events {
            let applied = async {
                Ok::<bool, crate::error::Error>(match &event.payload {
                    Payload::TokensRevoked {
                        user_id,
                        issued_before,
                        reason,
                    } => {
                        let revocation = Revocation {
                            user_id: *user_id,
                            issued_before: *issued_before,
                            reason: *reason,
                        };
                        self.store.revoke(&revocation).await?;
                        self.revocations.note(revocation);
                        true
                    }
                    // Recorded, then done by the worker in chunks: a user with
                    // 50,000 messages must not hold this delivery (or the ones
                    // behind it) past its deadline.
                    Payload::UserBanned { user_id, .. } => {
                        self.store.request_visibility(UserId::from(*user_id), true).await?;
                        self.visibility.notify_one();
                        true
                    }
                    Payload::UserUnbanned { user_id, .. } => {
                        self.store.request_visibility(UserId::from(*user_id), false).await?;
                        self.visibility.notify_one();
                        true
                    }
                    Payload::UserDeleted { user_id } => {
                        self.store.request_erasure(UserId::from(*user_id)).await?;
                        self.erasures.notify_one();
                        true
                    }
                    _ => false,
                })
            }
            .instrument(event.apply_span())
            .await?;
            done.push(applied);
        }
        Ok(done)
    }

    async fn set_hidden_unchecked(&self, author: UserId, hidden: bool) -> Result<u64> {
        let changed = |message: MessageId| {
            Event::new(
                PRODUCER,
                Payload::MessageHidden {
                    message_id: message.as_uuid(),
                    author_id: author.as_uuid(),
                    hidden,
                },
            )
        };
        self.store.set_hidden(author, hidden, changed).await
    }
}

/// The visibility worker's view of the store: each step hides or shows a
/// chunk of a banned or unbanned user's messages, each change with its
/// `MessageHidden` event.
pub struct Visibility(pub Store);

impl service_kit::jobs::Jobs for Visibility {
    async fn pending(&self) -> anyhow::Result<u64> {
        Ok(self.0.visibility_pending().await?)
    }

    async fn step(&self) -> anyhow::Result<bool> {
        let changed = |message_id: MessageId, author_id: UserId, hidden: bool| {
            Event::new(
                PRODUCER,
                Payload::MessageHidden {
                    message_id: message_id.as_uuid(),
                    author_id: author_id.as_uuid(),
                    hidden,
                },
            )
        };
        Ok(self.0.visibility_step(changed).await?)
    }
}

/// The erasure worker's view of the store: each step deletes a chunk of a
/// deleted user's messages with their `MessageDeleted` events (to analytics
/// and to comment-service, which deletes their comments).
pub struct Erasures(pub Store);

impl service_kit::jobs::Jobs for Erasures {
    async fn pending(&self) -> anyhow::Result<u64> {
        Ok(self.0.erasures_pending().await?)
    }

    async fn step(&self) -> anyhow::Result<bool> {
        let deleted = |message_id: MessageId, author_id: UserId| {
            Event::new(
                PRODUCER,
                Payload::MessageDeleted {
                    message_id: message_id.as_uuid(),
                    author_id: author_id.as_uuid(),
                },
            )
        };
        Ok(self.0.erase_step(deleted).await?)
    }
}

impl service_kit::store::Probe for Messages {
    async fn prepare(&self) -> anyhow::Result<()> {
        Ok(self.prepare_store().await?)
    }

    async fn ping(&self) -> anyhow::Result<()> {
        Ok(Messages::ping(self).await?)
    }
}
