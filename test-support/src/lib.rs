//! What Chirp's tests need from stores, and nothing they could leave behind.
//!
//! - A namespace per test on each kind of store: a fresh PostgreSQL database
//!   ([`postgres`]), a fresh MongoDB database ([`mongo`]), a Redis key prefix
//!   ([`redis`]), a SQLite file in a temporary directory ([`sqlite`]).
//! - Fake gRPC peers ([`grpc`]) that count calls and fail or hang on demand,
//!   and small helpers for requests and statuses.
//! - Private store processes ([`process`]) that a test stops and starts again
//!   to play an outage, on the same port and data directory.
//!
//! - The operator routes of a service's metrics port ([`operator`]), and
//!   a way to reseal a backup a test has tampered with.
//! - An in-process OTLP trace receiver ([`otlp`]) that services export to.
//!
//! Everything is removed on drop. Processes are also tied to this test
//! process with `PR_SET_PDEATHSIG`, so a test that panics or is killed does
//! not leave servers running.
//!
//! Shared servers come from the environment: `TEST_POSTGRES_URL`,
//! `TEST_REDIS_URL`; unset, the servers on their standard ports of this
//! machine (as on the team's machines and in CI), and when nothing listens
//! there, a private server started once per test process (so `make test`
//! needs nothing set up beforehand). `MONGODB_URI` likewise; when unset,
//! each test gets a private `secantusd-rs`.

use std::net::TcpListener;

pub mod authz;
pub mod grpc;
pub mod operator;
pub mod process;
pub mod sqlite;

#[cfg(feature = "mongodb")]
pub mod mongo;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod redis_cluster;

/// A TCP port that was free a moment ago, for servers that cannot be told to
/// pick their own and report it.
///
/// # Panics
/// When no port can be bound at all.
#[must_use]
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a port on 127.0.0.1");
    listener.local_addr().expect("a bound listener has an address").port()
}

/// Runs `future` to completion on a runtime of its own, on a thread of its own:
/// for clean-up in `Drop`, which may run inside or outside a runtime.
#[cfg(any(feature = "postgres", feature = "mongodb", feature = "redis"))]
pub(crate) fn block_on_fresh_runtime<F>(future: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            runtime.block_on(future);
        }
    });
    let _ = handle.join();
}

/// Waits until `condition` holds, looking every 5 ms, so a test waits for a
/// state rather than for a time a loaded machine may not honour.
///
/// # Panics
/// When it does not hold within `within`, naming `what`.
pub async fn eventually(what: &str, within: std::time::Duration, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// What a background writer in a test has seen so far, so the test can wait
/// for a state ("writes are flowing", "writes fail") instead of sleeping a
/// fixed time that a loaded machine may not honour.
#[derive(Clone, Debug, Default)]
pub struct WriteCounts {
    acknowledged: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl WriteCounts {
    /// Counts one write's outcome.
    pub fn record(&self, acknowledged: bool) {
        let counter = if acknowledged { &self.acknowledged } else { &self.failed };
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until `n` writes were acknowledged.
    ///
    /// # Panics
    /// After 30 s.
    pub async fn until_acknowledged(&self, n: usize) {
        Self::until(&self.acknowledged, n, "acknowledged").await;
    }

    /// Waits until `n` writes failed.
    ///
    /// # Panics
    /// After 30 s.
    pub async fn until_failed(&self, n: usize) {
        Self::until(&self.failed, n, "failed").await;
    }

    async fn until(counter: &std::sync::atomic::AtomicUsize, n: usize, what: &str) {
        eventually(
            &format!("{n} writes {what}"),
            std::time::Duration::from_secs(30),
            || counter.load(std::sync::atomic::Ordering::SeqCst) >= n,
        )
        .await;
    }
}
