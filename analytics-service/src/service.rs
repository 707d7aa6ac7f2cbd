//! analytics-service's rules: what a recorded batch does beyond its store
//! write (revocations take effect on this replica at once), who may read
//! what, and the bounds of a read. Knows neither prost nor sqlx.

use std::sync::Arc;

use service_kit::{auth::Caller, events::Payload, revocation::Revocations};

use crate::{
    domain::{Bucket, Event, HistogramRequest, MessageId, MessageStats, TopLimit, UserId, UserStats, Window},
    error::{Error, Result},
    store::Store,
};

pub struct Analytics {
    store: Store,
    revocations: Arc<Revocations>,
}

impl Analytics {
    #[must_use]
    pub fn new(store: Store, revocations: Arc<Revocations>) -> Self {
        Self { store, revocations }
    }

    /// Stores `events` (each id once) and returns, for each, whether it was
    /// new. A revocation takes effect on this replica at once, before the
    /// next sync from the store.
    pub async fn record(&self, events: &[Event]) -> Result<Vec<bool>> {
        let stored = self.store.record(events).await?;
        for event in events {
            if let Payload::TokensRevoked {
                user_id,
                issued_before,
                reason,
            } = &event.payload
            {
                self.revocations.note(service_kit::revocation::Revocation {
                    user_id: *user_id,
                    issued_before: *issued_before,
                    reason: *reason,
                });
            }
        }
        Ok(stored)
    }

    /// Any signed-in caller may read a user's numbers.
    pub async fn user_stats(&self, _caller: &Caller, user: UserId) -> Result<UserStats> {
        self.store.user_stats(user).await
    }

    /// Any signed-in caller may read a message's numbers.
    pub async fn message_stats(&self, _caller: &Caller, message: MessageId) -> Result<MessageStats> {
        self.store.message_stats(message).await
    }

    /// The most commented messages of the window.
    pub async fn top_messages(&self, _caller: &Caller, window: Window, limit: TopLimit) -> Result<Vec<(String, i64)>> {
        self.store.top_messages(window, limit.get()).await
    }

    /// Whether `caller` may read activity over time: moderators and admins.
    /// Asked before the request is parsed, so a caller without the role
    /// learns nothing from validation.
    ///
    /// # Errors
    /// PermissionDenied for anyone else.
    pub fn may_read_activity(caller: &Caller) -> Result<()> {
        if caller.role.can_moderate() {
            Ok(())
        } else {
            Err(Error::permission_denied("only moderators and admins may read activity"))
        }
    }

    /// Activity over time, in buckets.
    pub async fn activity(&self, caller: &Caller, request: HistogramRequest) -> Result<Vec<Bucket>> {
        Self::may_read_activity(caller)?;
        self.store.histogram(request.window(), request.granularity()).await
    }
}
