//! Revoked tokens, as every service but user-service knows them.
//!
//! user-service owns the truth: a ban, deletion, role change or password
//! change writes a `TokensRevoked` event ("tokens of user U issued before T
//! are void") in the same transaction as the change. Each consuming service
//! stores the latest such revocation per user in its own store when the
//! event is delivered (so it survives restarts and reaches every replica),
//! and keeps a copy in memory ([`Revocations`]) that the token verifier
//! consults on every request without a store round trip.
//!
//! The memory copy is read from the store before the service turns SERVING
//! (and until it is, a token is answered UNAVAILABLE, not trusted),
//! then merged again every [`SYNC_INTERVAL`] so a revocation applied by
//! another replica takes effect here too. Revocations are never undone (a
//! lifted ban is a new revocation with reason `SessionEnded`), so merging
//! keeps, per user, the one with the latest cutoff.
//!
//! Bounded: a revocation only matters while a token issued before it can
//! still be live, so entries older than [`MAX_TOKEN_LIFETIME`] (plus clock
//! leeway) are dropped from memory and pruned from the store.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{
    auth::{AuthError, MAX_TOKEN_LIFETIME},
    events::RevocationReason,
};

/// How often the memory copy is merged with the store.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(500);
/// How often revocations too old to matter are deleted from the store.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Tokens of `user_id` with `iat` (Unix seconds) below `issued_before` are
/// void.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub user_id: Uuid,
    pub issued_before: DateTime<Utc>,
    pub reason: RevocationReason,
}

impl Revocation {
    /// Whether `self` should replace `stored` (the later cutoff wins; on a
    /// tie the later decision, `self`, wins).
    #[must_use]
    pub fn supersedes(&self, stored: &Self) -> bool {
        self.issued_before >= stored.issued_before
    }
}

/// A service's store of revocations.
pub trait RevocationStore: Send + Sync + 'static {
    /// Every stored revocation with a cutoff after `since`.
    fn active(&self, since: DateTime<Utc>) -> impl Future<Output = anyhow::Result<Vec<Revocation>>> + Send;
    /// Deletes revocations with a cutoff before `before`.
    fn prune(&self, before: DateTime<Utc>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The oldest cutoff that can still void a live token.
#[must_use]
pub fn horizon(now: DateTime<Utc>) -> DateTime<Utc> {
    let keep = MAX_TOKEN_LIFETIME + Duration::from_secs(60);
    now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX)
}

/// The memory copy; `None` until first read from the store.
#[derive(Default)]
pub struct Revocations {
    by_user: RwLock<Option<HashMap<Uuid, Revocation>>>,
}

impl Revocations {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether a token of `user` issued at `issued_at` (Unix seconds) may
    /// act.
    ///
    /// # Errors
    /// [`AuthError::Banned`] or [`AuthError::Revoked`] for a void token;
    /// [`AuthError::RevocationsUnavailable`] before the store was first read.
    pub fn check(&self, user: Uuid, issued_at: i64) -> Result<(), AuthError> {
        let guard = self.by_user.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let by_user = guard.as_ref().ok_or(AuthError::RevocationsUnavailable)?;
        match by_user.get(&user) {
            Some(revocation) if issued_at < revocation.issued_before.timestamp() => Err(match revocation.reason {
                RevocationReason::Banned => AuthError::Banned,
                RevocationReason::Deleted | RevocationReason::SessionEnded => AuthError::Revoked,
            }),
            _ => Ok(()),
        }
    }

    /// Whether the store has been read at least once.
    #[must_use]
    pub fn is_loaded(&self) -> bool {
        self.by_user
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// Takes effect at once on this replica; call it after the revocation is
    /// stored.
    pub fn note(&self, revocation: Revocation) {
        let mut guard = self.by_user.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(by_user) = guard.as_mut() {
            merge(by_user, revocation);
        }
        // Not loaded yet: the first load reads it from the store.
    }

    /// Merges what the store holds, and forgets what is too old to matter.
    pub fn load(&self, stored: Vec<Revocation>, now: DateTime<Utc>) {
        let mut guard = self.by_user.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let by_user = guard.get_or_insert_with(HashMap::new);
        for revocation in stored {
            merge(by_user, revocation);
        }
        let horizon = horizon(now);
        by_user.retain(|_, r| r.issued_before >= horizon);
    }

    /// Reads `store` once. Services call it in their store's `prepare`
    /// step, so they turn SERVING only once they know every revocation
    /// stored before they started.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn refresh<S: RevocationStore>(&self, store: &S) -> anyhow::Result<()> {
        let now = Utc::now();
        let stored = store.active(horizon(now)).await?;
        self.load(stored, now);
        Ok(())
    }

    /// Reads `store` now and every [`SYNC_INTERVAL`] until the handle is
    /// dropped.
    #[must_use]
    pub fn sync<S: RevocationStore>(self: &Arc<Self>, store: S) -> SyncHandle {
        let revocations = self.clone();
        let task = tokio::spawn(async move {
            let mut last_prune = tokio::time::Instant::now();
            loop {
                let now = Utc::now();
                match store.active(horizon(now)).await {
                    Ok(stored) => revocations.load(stored, now),
                    // The service's own store is down; its health says so.
                    Err(err) => tracing::debug!(error = format!("{err:#}"), "reading revocations"),
                }
                if last_prune.elapsed() >= PRUNE_INTERVAL {
                    if let Err(err) = store.prune(horizon(now)).await {
                        tracing::debug!(error = format!("{err:#}"), "pruning revocations");
                    }
                    last_prune = tokio::time::Instant::now();
                }
                tokio::time::sleep(SYNC_INTERVAL).await;
            }
        });
        SyncHandle(task)
    }
}

fn merge(by_user: &mut HashMap<Uuid, Revocation>, revocation: Revocation) {
    match by_user.get(&revocation.user_id) {
        Some(stored) if !revocation.supersedes(stored) => {}
        _ => {
            by_user.insert(revocation.user_id, revocation);
        }
    }
}

/// The running sync; stops when dropped.
pub struct SyncHandle(JoinHandle<()>);

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    #[test]
    fn tokens_issued_before_the_cutoff_are_refused_by_reason_and_later_ones_pass() {
        let revocations = Revocations::default();
        let user = Uuid::new_v4();
        assert!(matches!(
            revocations.check(user, 1),
            Err(AuthError::RevocationsUnavailable)
        ));
        let now = Utc::now();
        revocations.load(Vec::new(), now);
        assert!(revocations.check(user, 1).is_ok());
        let cutoff = now.timestamp();
        revocations.note(Revocation {
            user_id: user,
            issued_before: at(cutoff),
            reason: RevocationReason::Banned,
        });
        assert!(matches!(revocations.check(user, cutoff - 1), Err(AuthError::Banned)));
        assert!(revocations.check(user, cutoff).is_ok());
        assert!(revocations.check(Uuid::new_v4(), cutoff - 1).is_ok());

        // A later decision replaces the reason; an older one changes nothing.
        revocations.note(Revocation {
            user_id: user,
            issued_before: at(cutoff + 5),
            reason: RevocationReason::Deleted,
        });
        revocations.load(
            vec![Revocation {
                user_id: user,
                issued_before: at(cutoff),
                reason: RevocationReason::Banned,
            }],
            now,
        );
        assert!(matches!(revocations.check(user, cutoff + 4), Err(AuthError::Revoked)));
    }

    #[test]
    fn revocations_too_old_to_matter_are_forgotten() {
        let revocations = Revocations::default();
        let user = Uuid::new_v4();
        let now = Utc::now();
        revocations.load(
            vec![Revocation {
                user_id: user,
                issued_before: horizon(now) - chrono::Duration::seconds(1),
                reason: RevocationReason::Banned,
            }],
            now,
        );
        assert!(revocations.by_user.read().unwrap().as_ref().unwrap().is_empty());
    }
}
