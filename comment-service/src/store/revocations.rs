//! Revoked tokens: the latest `TokensRevoked` per user, in one hash.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone as _, Utc};
use redis::AsyncCommands as _;
use service_kit::{
    events::RevocationReason,
    revocation::{Revocation, RevocationStore},
};

use super::{Redis, Store};
use crate::error::Result;

impl Store {
    /// Stores `revocation` unless a later one is stored already.
    pub async fn revoke(&self, revocation: &Revocation) -> Result<()> {
        service_kit::store::timed("redis", "revoke", async move {
            let mut redis = self.ready()?;
            let keys = [self.keys.revocations()];
            let args = [
                revocation.user_id.to_string(),
                revocation.issued_before.timestamp().to_string(),
                revocation.reason.as_str().to_owned(),
            ];
            let _: i64 = self
                .eval(&mut redis, super::replication::META, &self.revoke, &keys, &args)
                .await?;
            Ok(())
        })
        .await
    }

    /// The revocations hash, for the verifier's sync.
    #[must_use]
    pub fn revocation_store(&self) -> RedisRevocations {
        RedisRevocations {
            redis: self.redis.clone(),
            key: self.keys.revocations(),
        }
    }
}

/// The revocations hash as the verifier's sync reads it. Small by
/// construction (pruned past the longest token lifetime), so it is read
/// whole.
#[derive(Clone)]
pub struct RedisRevocations {
    redis: Redis,
    key: String,
}

impl RedisRevocations {
    async fn all(&self) -> anyhow::Result<Vec<Revocation>> {
        let mut redis = self.redis.clone();
        let raw: HashMap<String, String> = redis.hgetall(&self.key).await?;
        Ok(raw
            .iter()
            .filter_map(|(user, value)| {
                let (cutoff, reason) = value.split_once(':')?;
                Some(Revocation {
                    user_id: uuid::Uuid::try_parse(user).ok()?,
                    issued_before: Utc.timestamp_opt(cutoff.parse().ok()?, 0).single()?,
                    reason: RevocationReason::parse(reason)?,
                })
            })
            .collect())
    }
}

impl RevocationStore for RedisRevocations {
    async fn active(&self, since: DateTime<Utc>) -> anyhow::Result<Vec<Revocation>> {
        let mut all = self.all().await?;
        all.retain(|r| r.issued_before > since);
        Ok(all)
    }

    async fn prune(&self, before: DateTime<Utc>) -> anyhow::Result<()> {
        let old: Vec<String> = self
            .all()
            .await?
            .into_iter()
            .filter(|r| r.issued_before < before)
            .map(|r| r.user_id.to_string())
            .collect();
        if !old.is_empty() {
            let mut redis = self.redis.clone();
            let _: i64 = redis.hdel(&self.key, old).await?;
        }
        Ok(())
    }
}
