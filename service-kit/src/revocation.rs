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
//! The memory copy is read from the store, and caught up with user-service
//! (`ListRevocations`: what was decided while this service was down and not
//! delivered yet), before the service turns SERVING (and until it is, a
//! token is answered UNAVAILABLE, not trusted),
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

use chirp_proto::events::v1 as pb;
use chrono::{DateTime, TimeZone as _, Utc};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{
    auth::{AuthError, MAX_TOKEN_LIFETIME},
    events::RevocationReason,
    relay::IngestToken,
    validate::{violation, FieldViolation},
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

impl Revocation {
    /// The wire form (events and ListRevocations).
    #[must_use]
    pub fn to_pb(&self) -> pb::TokensRevoked {
        pb::TokensRevoked {
            user_id: self.user_id.to_string(),
            issued_before: Some(prost_types::Timestamp {
                seconds: self.issued_before.timestamp(),
                nanos: 0,
            }),
            reason: match self.reason {
                RevocationReason::Banned => pb::RevocationReason::Banned,
                RevocationReason::Deleted => pb::RevocationReason::Deleted,
                RevocationReason::SessionEnded => pb::RevocationReason::SessionEnded,
            }
            .into(),
        }
    }

    /// Parses the wire form; `field` names it in violations.
    ///
    /// # Errors
    /// The first field that does not parse.
    pub fn from_pb(field: &str, p: &pb::TokensRevoked) -> Result<Self, FieldViolation> {
        Ok(Self {
            user_id: crate::validate::uuid(&format!("{field}.user_id"), &p.user_id)?,
            issued_before: p
                .issued_before
                .as_ref()
                .and_then(|t| Utc.timestamp_opt(t.seconds, 0).single())
                .ok_or_else(|| violation(&format!("{field}.issued_before"), "is required"))?,
            reason: match pb::RevocationReason::try_from(p.reason) {
                Ok(pb::RevocationReason::Banned) => RevocationReason::Banned,
                Ok(pb::RevocationReason::Deleted) => RevocationReason::Deleted,
                Ok(pb::RevocationReason::SessionEnded) => RevocationReason::SessionEnded,
                _ => {
                    return Err(violation(
                        &format!("{field}.reason"),
                        "must be BANNED, DELETED or SESSION_ENDED",
                    ))
                }
            },
        })
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
    catch_up: Option<CatchUp>,
}

/// Where [`Revocations::refresh`] catches up from: user-service, with the
/// producers' ingest token.
struct CatchUp {
    user_service: Arc<crate::client::Peer>,
    ingest_token: IngestToken,
}

impl Revocations {
    /// Knows only what its service's store holds.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Also asks user-service, when first read, for what the store missed
    /// (see [`catch_up`]).
    ///
    /// # Errors
    /// When the ingest token is not a valid metadata value.
    pub fn catching_up_from(user_service: Arc<crate::client::Peer>, ingest_token: &str) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            by_user: RwLock::default(),
            catch_up: Some(CatchUp {
                user_service,
                ingest_token: IngestToken::new(ingest_token)?,
            }),
        }))
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
        if let Some(source) = &self.catch_up {
            // Revocations decided while this service was down are still in
            // user-service's outbox; asking now makes them known before the
            // first request rather than at the relay's next retry. They
            // reach the store too, when the relay delivers them.
            match catch_up(&source.user_service, &source.ingest_token).await {
                Ok(missed) => {
                    tracing::info!(revocations = missed.len(), "caught up with user-service's revocations");
                    self.load(missed, Utc::now());
                }
                Err(err) => tracing::warn!(
                    error = format!("{err:#}"),
                    "cannot catch up with user-service's revocations; serving with the stored ones"
                ),
            }
        }
        Ok(())
    }

    /// Reads `store` now and every [`SYNC_INTERVAL`] until the handle is
    /// dropped; prunes it while `status` says it may be written (a prune
    /// counts as a store operation under way, so maintenance waits for it).
    #[must_use]
    pub fn sync<S: RevocationStore>(self: &Arc<Self>, store: S, status: crate::store::StoreStatus) -> SyncHandle {
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
                if last_prune.elapsed() >= PRUNE_INTERVAL && status.is_up() {
                    let _prune = status.working(SYNC_INTERVAL).await;
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

/// Most pages one catch-up reads (100 revocations a page).
const MAX_CATCH_UP_PAGES: usize = 1_000;

/// Asks user-service for every revocation that may still void a live token
/// (`ListRevocations`, with the producers' ingest token). A service calls it
/// before it turns SERVING, so the revocations decided while it was down
/// are known before its first request, not when user-service's relay next
/// retries.
///
/// # Errors
/// When user-service cannot answer (the caller then serves with what its
/// own store holds; the relay delivers the rest).
pub async fn catch_up(
    user_service: &crate::client::Peer,
    ingest_token: &IngestToken,
) -> anyhow::Result<Vec<Revocation>> {
    use chirp_proto::user::v1::{user_service_client::UserServiceClient, ListRevocationsRequest};
    let mut revocations = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_CATCH_UP_PAGES {
        let request = ListRevocationsRequest {
            page_size: 100,
            page_token,
        };
        let page = user_service
            .call(
                crate::client::Idempotency::Idempotent,
                request,
                |channel, mut request| {
                    ingest_token.attach(&mut request);
                    async move { UserServiceClient::new(channel).list_revocations(request).await }
                },
            )
            .await
            .map_err(|status| anyhow::anyhow!("ListRevocations: {:?} {}", status.code(), status.message()))?;
        for (i, raw) in page.revocations.iter().enumerate() {
            let revocation = Revocation::from_pb(&format!("revocations[{i}]"), raw)
                .map_err(|v| anyhow::anyhow!("user-service sent a bad revocation: {v}"))?;
            revocations.push(revocation);
        }
        if page.next_page_token.is_empty() {
            return Ok(revocations);
        }
        page_token = page.next_page_token;
    }
    anyhow::bail!("ListRevocations did not end within {MAX_CATCH_UP_PAGES} pages")
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
