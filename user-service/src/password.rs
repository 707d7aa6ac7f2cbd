//! argon2id password hashing. Hashing is deliberately slow and memory-hungry
//! (`PASSWORD_HASH_MEMORY_KIB` per hash, 19 MiB by default), so it runs on
//! the blocking pool, never on an async worker, and only a few hashes run at
//! once: without that bound, 64 concurrent wrong logins would hold 64 hashes'
//! memory at once (over a GiB), and an unauthenticated client could push the
//! service past its memory limit. A call that cannot start hashing within a
//! short wait is refused at once (RESOURCE_EXHAUSTED, with a retry delay)
//! rather than queued without bound.

use std::{sync::Arc, time::Duration};

use argon2::{
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString},
    Algorithm, Argon2, Params, Version,
};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{domain::Password, error::Error};

#[derive(Clone)]
pub struct Hasher {
    params: Params,
    permits: Arc<Semaphore>,
    queue_wait: Duration,
    running: IntGauge,
    refused: IntCounter,
    done: IntCounter,
}

impl Hasher {
    /// At most `concurrency` hashes at once; a call waits at most
    /// `queue_wait` for its turn.
    ///
    /// # Errors
    /// When the memory cost is outside argon2's limits, or the metrics are
    /// registered already.
    pub fn new(memory_kib: u32, concurrency: usize, queue_wait: Duration, registry: &Registry) -> anyhow::Result<Self> {
        let params = Params::new(memory_kib, 2, 1, None).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        anyhow::ensure!(concurrency > 0, "PASSWORD_HASH_CONCURRENCY must be at least 1");
        let running = IntGauge::new("password_hashes_running", "argon2 hashes running now")?;
        let refused = IntCounter::new(
            "password_hash_refusals_total",
            "Calls refused because every password-hashing slot stayed busy",
        )?;
        let done = IntCounter::new("password_hashes_total", "argon2 hashes started")?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(done.clone()))?;
        Ok(Self {
            params,
            permits: Arc::new(Semaphore::new(concurrency)),
            queue_wait,
            running,
            refused,
            done,
        })
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// A hashing slot, or [`Common::Overloaded`](crate::error::Common::Overloaded) after `queue_wait`.
    async fn slot(&self) -> Result<Slot, Error> {
        match tokio::time::timeout(self.queue_wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                self.running.inc();
                self.done.inc();
                Ok(Slot {
                    _permit: permit,
                    running: self.running.clone(),
                })
            }
            // Timed out (or closed, which this code never does).
            _ => {
                self.refused.inc();
                Err(Error::overloaded("password checks", self.queue_wait))
            }
        }
    }

    /// A PHC string (algorithm, parameters, salt and hash together).
    pub async fn hash(&self, password: Password) -> Result<String, Error> {
        let slot = self.slot().await?;
        let argon2 = self.argon2();
        // The slot moves into the blocking task: a caller that gives up
        // (deadline, disconnect) does not free it while the hash still runs.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
            argon2
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|hash| hash.to_string())
                .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("password hashing task: {e}"))?
        .map_err(Error::from)
    }

    /// Whether `password` matches `stored`. The parameters come from the
    /// stored hash, so hashes made under older settings keep verifying.
    pub async fn verify(&self, password: Password, stored: String) -> Result<bool, Error> {
        let slot = self.slot().await?;
        let argon2 = self.argon2();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let hash = PasswordHash::new(&stored).map_err(|e| anyhow::anyhow!("stored hash is malformed: {e}"))?;
            Ok(argon2.verify_password(password.expose().as_bytes(), &hash).is_ok())
        })
        .await
        .map_err(|e| anyhow::anyhow!("password verification task: {e}"))?
    }
}

/// A running hash's hold on its slot; gives it back when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    running: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.running.dec();
    }
}
