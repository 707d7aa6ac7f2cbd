//! How often one client may make user-service check a password: Login and
//! Register are limited per client address, and Login per username, before
//! any password is hashed. The per-username limit counts every attempt, so
//! guessing one account's password slows that account's logins only, not
//! anyone else's; the per-address limit keeps one client from spreading
//! guesses over many usernames. Both answer RESOURCE_EXHAUSTED with the
//! time until the next attempt is allowed.
//!
//! The limiters keep one small entry per key seen recently; a task forgets
//! idle ones every [`FORGET_INTERVAL`], and the per-address limit bounds how
//! fast new usernames can be added.

use std::{net::IpAddr, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    clock::{Clock as _, DefaultClock},
    DefaultKeyedRateLimiter, Quota, RateLimiter,
};
use tokio::task::JoinHandle;

use crate::{domain::Username, error::Error};

/// How often keys with a full allowance again are dropped.
const FORGET_INTERVAL: Duration = Duration::from_secs(30);

pub struct AuthLimits {
    per_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_username: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl AuthLimits {
    /// Requests per minute per client address and attempts per minute per
    /// username (each also the burst allowed); 0 turns a limit off.
    #[must_use]
    pub fn new(per_address_per_minute: u32, per_username_per_minute: u32) -> Arc<Self> {
        Arc::new(Self {
            per_address: keyed(per_address_per_minute),
            per_username: keyed(per_username_per_minute),
            clock: DefaultClock::default(),
        })
    }

    /// Charges one request to `address` (unknown addresses are not limited
    /// here: the concurrency bound on hashing still holds).
    ///
    /// # Errors
    /// [`Error::RateLimited`] when the address has used its allowance.
    pub fn address(&self, address: Option<IpAddr>) -> Result<(), Error> {
        match (&self.per_address, address) {
            (Some(limiter), Some(address)) => self.charge(limiter, &address, "requests from this address"),
            _ => Ok(()),
        }
    }

    /// Charges one login attempt to `username`.
    ///
    /// # Errors
    /// [`Error::RateLimited`] when the username has used its allowance.
    pub fn username(&self, username: &Username) -> Result<(), Error> {
        match &self.per_username {
            Some(limiter) => self.charge(
                limiter,
                &username.as_str().to_owned(),
                "login attempts for this username",
            ),
            None => Ok(()),
        }
    }

    fn charge<K>(&self, limiter: &DefaultKeyedRateLimiter<K>, key: &K, what: &'static str) -> Result<(), Error>
    where
        K: std::hash::Hash + Eq + Clone,
    {
        limiter.check_key(key).map_err(|not_until| Error::RateLimited {
            what,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    fn forget_idle(&self) {
        if let Some(limiter) = &self.per_address {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.per_username {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Forgets idle keys every [`FORGET_INTERVAL`] until the handle drops.
    #[must_use]
    pub fn spawn_forgetting(self: &Arc<Self>) -> Forgetting {
        let limits = self.clone();
        Forgetting(tokio::spawn(async move {
            loop {
                tokio::time::sleep(FORGET_INTERVAL).await;
                limits.forget_idle();
            }
        }))
    }
}

fn keyed<K: std::hash::Hash + Eq + Clone>(per_minute: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

/// The task that forgets idle keys; stops when dropped.
pub struct Forgetting(JoinHandle<()>);

impl Drop for Forgetting {
    fn drop(&mut self) {
        self.0.abort();
    }
}
