//! Background work a service keeps in its own store: erasures (a deleted
//! user's messages or comments) and bans (hiding every message of a user),
//! which can be far too large for one call.
//!
//! The RPC that accepts such work only records it (one small idempotent
//! write) and answers; a worker then does it in bounded chunks, each one
//! atomic with the events it produces. Because the job lives in the store, a
//! crash or restart resumes it where it stopped, and because each chunk
//! deletes what remains, repeating a chunk changes nothing.
//!
//! Each worker's gauge counts its jobs not finished yet (`erasures_pending`
//! is shown per service by `chirp status`).

use std::{future::Future, sync::Arc, time::Duration};

use prometheus::{IntGauge, Registry};
use tokio::{sync::Notify, task::JoinHandle};

use crate::store::StoreStatus;

/// A service's queue of jobs, over its own store.
pub trait Jobs: Send + Sync + 'static {
    /// How many jobs are not finished.
    fn pending(&self) -> impl Future<Output = anyhow::Result<u64>> + Send;
    /// Does one bounded chunk of the oldest job; `true` when work remains.
    fn step(&self) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// The running worker; stops when dropped.
pub struct Worker {
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Worker {
    /// Makes the worker look at once (call it after recording a job).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    #[must_use]
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often an idle worker looks for jobs recorded by another replica.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often a worker whose store is down looks again.
const STORE_WAIT: Duration = Duration::from_millis(100);

/// Runs `jobs` until the worker is dropped; gauge `metric` counts its
/// pending jobs. The worker touches the store only while `store` says it is
/// up (answering and prepared, not in maintenance): before the first
/// migration a step could only fail, and say so in the log.
///
/// # Errors
/// When the metric is already registered.
pub fn spawn<J: Jobs>(
    metric: &str,
    help: &str,
    jobs: J,
    registry: &Registry,
    store: StoreStatus,
) -> anyhow::Result<Worker> {
    let gauge = IntGauge::new(metric, help)?;
    registry.register(Box::new(gauge.clone()))?;
    let wake = Arc::new(Notify::new());
    let notified = wake.clone();
    let task = tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            // One step at a time counts as a store operation under way, so
            // maintenance waits for it to end.
            let stepped = {
                let _step = store.working(STORE_WAIT).await;
                if let Ok(pending) = jobs.pending().await {
                    gauge.set(i64::try_from(pending).unwrap_or(i64::MAX));
                }
                jobs.step().await
            };
            match stepped {
                Ok(true) => {
                    failures = 0;
                    // Let other work on this runtime in between chunks.
                    tokio::task::yield_now().await;
                }
                Ok(false) => {
                    failures = 0;
                    tokio::select! {
                        () = notified.notified() => {}
                        () = tokio::time::sleep(POLL_INTERVAL) => {}
                    }
                }
                Err(err) => {
                    // Usually the service's own store is down; the job waits
                    // there, safe, and resumes when it is back.
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = format!("{err:#}"), "a background job step failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100) * failures.min(10)).await;
                }
            }
        }
    });
    Ok(Worker { wake, task })
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };

    use super::*;

    /// `left` items, removed `chunk` at a time; the first step fails.
    struct Countdown {
        left: Arc<AtomicU64>,
        chunk: u64,
        fail_once: std::sync::atomic::AtomicBool,
    }

    impl Jobs for Countdown {
        async fn pending(&self) -> anyhow::Result<u64> {
            Ok(u64::from(self.left.load(Ordering::SeqCst) > 0))
        }

        async fn step(&self) -> anyhow::Result<bool> {
            if self.fail_once.swap(false, Ordering::SeqCst) {
                anyhow::bail!("store down");
            }
            let left = self.left.load(Ordering::SeqCst);
            let next = left.saturating_sub(self.chunk);
            self.left.store(next, Ordering::SeqCst);
            Ok(next > 0)
        }
    }

    #[tokio::test]
    async fn a_worker_finishes_a_job_in_chunks_through_a_failure() {
        let left = Arc::new(AtomicU64::new(1_000));
        let registry = Registry::new();
        let worker = spawn(
            "jobs_pending",
            "test jobs",
            Countdown {
                left: left.clone(),
                chunk: 100,
                fail_once: true.into(),
            },
            &registry,
            StoreStatus::always_up(),
        )
        .unwrap();
        worker.wake();
        test_support::eventually("the job finishing", Duration::from_secs(2), || {
            left.load(Ordering::SeqCst) == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_worker_leaves_its_store_alone_until_the_store_is_up() {
        let left = Arc::new(AtomicU64::new(100));
        let store = StoreStatus::always_up();
        store.set_maintenance(true);
        let worker = spawn(
            "jobs_pending",
            "test jobs",
            Countdown {
                left: left.clone(),
                chunk: 10,
                fail_once: false.into(),
            },
            &Registry::new(),
            store.clone(),
        )
        .unwrap();
        worker.wake();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(left.load(Ordering::SeqCst), 100, "no step while the store is down");
        store.set_maintenance(false);
        test_support::eventually("the job finishing once the store is up", Duration::from_secs(2), || {
            left.load(Ordering::SeqCst) == 0
        })
        .await;
    }
}
