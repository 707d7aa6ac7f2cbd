//! The outbox relay: delivers the events a service stored beside its changes
//! to one destination, in order, in batches, until they are acknowledged.
//!
//! A producer implements [`Outbox`] over its own store (one view per
//! destination) and a [`Destination`] over a peer's API; [`spawn`] runs the
//! loop. Delivery is at least once: a relay that dies after delivering and
//! before marking delivered sends the batch again, and consumers apply each
//! event id once. While a destination fails, the relay backs off (full
//! jitter, capped) and the events wait in the store, where they are safe.
//!
//! Metrics, labelled by destination: `outbox_depth`, `outbox_oldest_age_seconds`,
//! `outbox_delivered_total`, `outbox_delivery_failures_total`.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rand::Rng as _;
use tokio::{sync::Notify, task::JoinHandle};

use crate::events::Event;

/// An event waiting in an outbox, with whatever the store needs to mark it
/// delivered (a row id, a stream id).
#[derive(Clone, Debug)]
pub struct Pending {
    pub position: String,
    pub event: Event,
}

/// How much waits for one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub depth: u64,
    pub oldest: Option<DateTime<Utc>>,
}

/// One destination's view of a producer's outbox.
pub trait Outbox: Send + Sync + 'static {
    /// The oldest undelivered events, in the order they were written.
    fn pending(&self, limit: usize) -> impl Future<Output = anyhow::Result<Vec<Pending>>> + Send;
    /// Marks events delivered, so they are not sent again.
    fn mark_delivered(&self, delivered: &[Pending]) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn backlog(&self) -> impl Future<Output = anyhow::Result<Backlog>> + Send;
}

/// Where events go: a peer that applies each event id once.
pub trait Destination: Send + Sync + 'static {
    fn deliver(&self, events: &[Event]) -> impl Future<Output = Result<(), tonic::Status>> + Send;
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Label of the destination in logs and metrics, e.g. `analytics`.
    pub destination: &'static str,
    pub batch_size: usize,
    /// How often an idle relay looks for new events (a [`RelayHandle::wake`]
    /// makes it look at once).
    pub poll_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RelayConfig {
    #[must_use]
    pub fn new(destination: &'static str) -> Self {
        Self {
            destination,
            batch_size: 200,
            poll_interval: Duration::from_millis(500),
            backoff_base: Duration::from_millis(100),
            // Short enough that a destination coming back is served within a
            // second or two; the peer's circuit breaker already spares it
            // while it is down.
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// Metadata key of the producers' shared secret, presented when they deliver
/// events (to analytics-service, and message-service to comment-service).
pub const INGEST_TOKEN_HEADER: &str = "x-chirp-ingest-token";

/// Whether `presented` is the ingest token `expected`, compared in constant
/// time whatever the lengths (both are hashed first, so neither the length
/// nor a common prefix shows in the timing).
#[must_use]
pub fn ingest_token_matches(presented: &[u8], expected: &str) -> bool {
    use sha2::{Digest as _, Sha256};
    use subtle::ConstantTimeEq as _;
    let presented = Sha256::digest(presented);
    let expected = Sha256::digest(expected.as_bytes());
    presented.ct_eq(&expected).into()
}

/// Whether `metadata` carries the ingest token `expected` (see
/// [`ingest_token_matches`]); a missing token does not.
#[must_use]
pub fn presents_ingest_token(metadata: &tonic::metadata::MetadataMap, expected: &str) -> bool {
    metadata
        .get(INGEST_TOKEN_HEADER)
        .is_some_and(|presented| ingest_token_matches(presented.as_bytes(), expected))
}

/// The producers' shared secret as a caller sends it, checked once when the
/// service starts.
#[derive(Clone)]
pub struct IngestToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl IngestToken {
    /// # Errors
    /// When the token is not a valid metadata value.
    pub fn new(token: &str) -> anyhow::Result<Self> {
        token
            .parse()
            .map(Self)
            .map_err(|_| anyhow::anyhow!("INGEST_TOKEN must be printable ASCII"))
    }

    /// Puts the token on an outgoing request.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        request.metadata_mut().insert(INGEST_TOKEN_HEADER, self.0.clone());
    }
}

/// analytics-service, the destination every producer has.
pub struct Analytics {
    peer: Arc<crate::client::Peer>,
    ingest_token: IngestToken,
}

impl Analytics {
    /// # Errors
    /// When the token is not a valid metadata value.
    pub fn new(peer: Arc<crate::client::Peer>, ingest_token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            peer,
            ingest_token: IngestToken::new(ingest_token)?,
        })
    }
}

impl Destination for Analytics {
    async fn deliver(&self, events: &[Event]) -> Result<(), tonic::Status> {
        use chirp_proto::analytics::v1::{analytics_service_client::AnalyticsServiceClient, RecordEventsRequest};
        let request = RecordEventsRequest {
            events: events.iter().map(Event::to_pb).collect(),
        };
        // Idempotent by event id, so retrying inside the call is safe too.
        self.peer
            .call(
                crate::client::Idempotency::Idempotent,
                request,
                |channel, mut request| {
                    self.ingest_token.attach(&mut request);
                    async move { AnalyticsServiceClient::new(channel).record_events(request).await }
                },
            )
            .await
            .map(drop)
    }
}

/// The relay metrics of one service, shared by its relays.
#[derive(Clone)]
pub struct RelayMetrics {
    depth: IntGaugeVec,
    oldest_age: IntGaugeVec,
    delivered: IntCounterVec,
    failures: IntCounterVec,
}

impl RelayMetrics {
    /// # Errors
    /// When the metrics are already registered.
    pub fn register(registry: &Registry) -> anyhow::Result<Self> {
        let metrics = Self {
            depth: IntGaugeVec::new(
                Opts::new("outbox_depth", "Events waiting for delivery"),
                &["destination"],
            )?,
            oldest_age: IntGaugeVec::new(
                Opts::new(
                    "outbox_oldest_age_seconds",
                    "Age of the oldest event waiting for delivery",
                ),
                &["destination"],
            )?,
            delivered: IntCounterVec::new(
                Opts::new("outbox_delivered_total", "Events delivered and acknowledged"),
                &["destination"],
            )?,
            failures: IntCounterVec::new(
                Opts::new("outbox_delivery_failures_total", "Failed delivery attempts"),
                &["destination"],
            )?,
        };
        registry.register(Box::new(metrics.depth.clone()))?;
        registry.register(Box::new(metrics.oldest_age.clone()))?;
        registry.register(Box::new(metrics.delivered.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        Ok(metrics)
    }
}

/// A running relay; stops when dropped.
pub struct RelayHandle {
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Tells the relay new events are waiting.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A waker to hand to the code that writes events.
    #[must_use]
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs a relay from `outbox` to `destination` until the handle is dropped.
pub fn spawn<O: Outbox, D: Destination>(
    config: RelayConfig,
    outbox: O,
    destination: D,
    metrics: RelayMetrics,
) -> RelayHandle {
    let wake = Arc::new(Notify::new());
    let task = tokio::spawn(run(config, outbox, destination, metrics, wake.clone()));
    RelayHandle { wake, task }
}

async fn run<O: Outbox, D: Destination>(
    config: RelayConfig,
    outbox: O,
    destination: D,
    metrics: RelayMetrics,
    wake: Arc<Notify>,
) {
    let label = [config.destination];
    let mut failures: u32 = 0;
    let mut last_backlog = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        // The gauges cost a query; once a second is plenty for a scraper.
        if last_backlog.elapsed() >= Duration::from_secs(1) {
            if let Ok(backlog) = outbox.backlog().await {
                metrics
                    .depth
                    .with_label_values(&label)
                    .set(i64::try_from(backlog.depth).unwrap_or(i64::MAX));
                let age = backlog.oldest.map_or(0, |at| (Utc::now() - at).num_seconds().max(0));
                metrics.oldest_age.with_label_values(&label).set(age);
            }
            last_backlog = tokio::time::Instant::now();
        }

        let batch = match outbox.pending(config.batch_size).await {
            Ok(batch) => batch,
            Err(err) => {
                // The producer's own store is down; its health says so already.
                tracing::debug!(
                    destination = config.destination,
                    error = format!("{err:#}"),
                    "reading the outbox"
                );
                failures = failures.saturating_add(1);
                tokio::time::sleep(backoff(&config, failures)).await;
                continue;
            }
        };
        if batch.is_empty() {
            failures = 0;
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(config.poll_interval) => {}
            }
            continue;
        }

        let events: Vec<Event> = batch.iter().map(|p| p.event.clone()).collect();
        match destination.deliver(&events).await {
            Ok(()) => {
                failures = 0;
                metrics
                    .delivered
                    .with_label_values(&label)
                    .inc_by(u64::try_from(events.len()).unwrap_or(0));
                if let Err(err) = outbox.mark_delivered(&batch).await {
                    // The batch will be sent again; the destination dedupes.
                    tracing::warn!(
                        destination = config.destination,
                        error = format!("{err:#}"),
                        "marking events delivered"
                    );
                }
            }
            Err(status) => {
                failures = failures.saturating_add(1);
                metrics.failures.with_label_values(&label).inc();
                let wait = backoff(&config, failures);
                tracing::warn!(
                    destination = config.destination,
                    code = ?status.code(),
                    reason = status.message(),
                    waiting = events.len(),
                    retry_in = ?wait,
                    "delivery failed; events stay in the outbox"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Full jitter up to `base * 2^failures`, capped.
fn backoff(config: &RelayConfig, failures: u32) -> Duration {
    let ceiling = config
        .backoff_base
        .saturating_mul(1 << failures.min(16))
        .min(config.backoff_max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::thread_rng().gen_range(nanos / 2..=nanos.max(1)))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        sync::{
            atomic::{AtomicU32, Ordering},
            Mutex,
        },
    };

    use super::*;
    use crate::events::Payload;

    #[derive(Clone, Default)]
    struct MemoryOutbox {
        events: Arc<Mutex<Vec<(String, Event, bool)>>>,
        /// Marking fails this many times: the relay "dies" between delivering
        /// and marking.
        mark_failures: Arc<AtomicU32>,
    }

    impl Outbox for MemoryOutbox {
        async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
            Ok(self
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, _, done)| !done)
                .take(limit)
                .map(|(position, event, _)| Pending {
                    position: position.clone(),
                    event: event.clone(),
                })
                .collect())
        }

        async fn mark_delivered(&self, delivered: &[Pending]) -> anyhow::Result<()> {
            if self
                .mark_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                anyhow::bail!("the relay died before marking");
            }
            let positions: HashSet<&str> = delivered.iter().map(|p| p.position.as_str()).collect();
            for (position, _, done) in self.events.lock().unwrap().iter_mut() {
                if positions.contains(position.as_str()) {
                    *done = true;
                }
            }
            Ok(())
        }

        async fn backlog(&self) -> anyhow::Result<Backlog> {
            let events = self.events.lock().unwrap();
            Ok(Backlog {
                depth: events.iter().filter(|(_, _, done)| !done).count() as u64,
                oldest: None,
            })
        }
    }

    /// Applies each event id once, like analytics-service, and counts
    /// deliveries.
    #[derive(Clone, Default)]
    struct DedupingConsumer {
        seen: Arc<Mutex<HashSet<Uuid>>>,
        applied: Arc<AtomicU32>,
        deliveries: Arc<AtomicU32>,
        failures_left: Arc<AtomicU32>,
    }

    use uuid::Uuid;

    impl Destination for DedupingConsumer {
        async fn deliver(&self, events: &[Event]) -> Result<(), tonic::Status> {
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            if self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(tonic::Status::unavailable("down"));
            }
            let mut seen = self.seen.lock().unwrap();
            for event in events {
                if seen.insert(event.id) {
                    self.applied.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(())
        }
    }

    fn config() -> RelayConfig {
        RelayConfig {
            destination: "test",
            batch_size: 10,
            poll_interval: Duration::from_millis(10),
            backoff_base: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
        }
    }

    fn fill(outbox: &MemoryOutbox, n: usize) {
        let mut events = outbox.events.lock().unwrap();
        for i in 0..n {
            events.push((
                i.to_string(),
                Event::new(
                    "test",
                    Payload::UserRegistered {
                        user_id: Uuid::new_v4(),
                    },
                ),
                false,
            ));
        }
    }

    async fn until(condition: impl Fn() -> bool) {
        for _ in 0..500 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not met within 5 s");
    }

    #[tokio::test]
    async fn a_relay_delivers_everything_through_a_failing_destination() {
        let outbox = MemoryOutbox::default();
        fill(&outbox, 35);
        let consumer = DedupingConsumer::default();
        consumer.failures_left.store(3, Ordering::SeqCst);
        let metrics = RelayMetrics::register(&Registry::new()).unwrap();
        let _relay = spawn(config(), outbox.clone(), consumer.clone(), metrics.clone());
        until(|| consumer.applied.load(Ordering::SeqCst) == 35).await;
        until(|| outbox.events.lock().unwrap().iter().all(|(_, _, done)| *done)).await;
        assert_eq!(metrics.delivered.with_label_values(&["test"]).get(), 35);
        assert_eq!(metrics.failures.with_label_values(&["test"]).get(), 3);
    }

    #[tokio::test]
    async fn a_relay_that_dies_before_marking_redelivers_and_the_consumer_applies_once() {
        let outbox = MemoryOutbox::default();
        fill(&outbox, 10);
        outbox.mark_failures.store(1, Ordering::SeqCst);
        let consumer = DedupingConsumer::default();
        let metrics = RelayMetrics::register(&Registry::new()).unwrap();
        let _relay = spawn(config(), outbox.clone(), consumer.clone(), metrics);
        until(|| outbox.events.lock().unwrap().iter().all(|(_, _, done)| *done)).await;
        assert_eq!(consumer.deliveries.load(Ordering::SeqCst), 2, "the batch went twice");
        assert_eq!(consumer.applied.load(Ordering::SeqCst), 10, "and counted once");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let config = config();
        for failures in 0..30 {
            let wait = backoff(&config, failures);
            assert!(wait <= config.backoff_max, "{wait:?}");
        }
        assert!(backoff(&config, 1) <= Duration::from_millis(10));
    }
}
