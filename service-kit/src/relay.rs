//! The outbox relay: delivers the events a service stored beside its changes
//! to one destination, in order, in batches, until they are acknowledged.
//!
//! A producer implements [`Outbox`] over its own store (one view per
//! destination) and a [`Destination`] over a peer's API; [`Relays::spawn`]
//! runs the loop. Delivery is at least once: a relay that dies after
//! delivering and before marking delivered sends the batch again, and
//! consumers apply each event id once. While a destination fails, the relay
//! backs off (equal jitter, capped) and the events wait in the store, where
//! they are safe.
//!
//! A poison event never blocks the events behind it. The consumer answers
//! every event (applied, skipped, or rejected with a reason); a rejected
//! event, and a stored event this version cannot even read, are moved to
//! the outbox's dead letters in the producer's own store with the reason,
//! and the relay goes on. An operator inspects and re-sends them through
//! [`operator_routes`] (`chirp outbox list|retry <service>`).
//!
//! Metrics, labelled by destination: `outbox_depth`, `outbox_oldest_age_seconds`,
//! `outbox_dead_letters`, `outbox_delivered_total`,
//! `outbox_delivery_failures_total`.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rand::Rng as _;
use serde::Serialize;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::Instrument as _;

use crate::{
    events::{Event, Outcome},
    store::StoreStatus,
};

/// An event waiting in an outbox, with whatever the store needs to mark it
/// delivered (a row id, a stream id).
#[derive(Clone, Debug)]
pub struct Pending {
    pub position: String,
    /// The event, or why its stored text cannot be read (written by a newer
    /// version, or damaged): such an entry goes straight to the dead letters.
    pub event: Result<Event, String>,
}

/// An outbox entry to set aside, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub position: String,
    pub reason: String,
}

/// An event set aside: the consumer rejected it or it could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub position: String,
    /// The event id, when the stored event could be read.
    pub event_id: Option<String>,
    pub reason: String,
    pub failed_at: DateTime<Utc>,
}

/// How much waits for one destination, and how much was set aside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub depth: u64,
    pub oldest: Option<DateTime<Utc>>,
    pub dead_letters: u64,
}

/// One destination's view of a producer's outbox.
pub trait Outbox: Send + Sync + 'static {
    /// The oldest undelivered events, in the order they were written.
    fn pending(&self, limit: usize) -> impl Future<Output = anyhow::Result<Vec<Pending>>> + Send;
    /// Marks events delivered, so they are not sent again.
    fn mark_delivered(&self, delivered: &[Pending]) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Moves entries from the outbox to its dead letters, as stored, with
    /// the reason; at once, so an entry is never in both or in neither.
    fn dead_letter(&self, rejected: &[Rejected]) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// The oldest dead letters.
    fn dead_letters(&self, limit: usize) -> impl Future<Output = anyhow::Result<Vec<DeadLetter>>> + Send;
    /// Moves up to `limit` dead letters back into the outbox, oldest first;
    /// returns how many moved.
    fn retry_dead_letters(&self, limit: usize) -> impl Future<Output = anyhow::Result<u64>> + Send;
    fn backlog(&self) -> impl Future<Output = anyhow::Result<Backlog>> + Send;
}

/// Where events go: a peer that applies each event id once and answers for
/// each event, in the order sent. An answer with fewer outcomes than events
/// (a consumer that predates outcomes) counts the rest as delivered.
pub trait Destination: Send + Sync + 'static {
    fn deliver(&self, events: &[Event]) -> impl Future<Output = Result<Vec<Outcome>, tonic::Status>> + Send;
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Label of the destination in logs and metrics, e.g. `analytics`.
    pub destination: &'static str,
    pub batch_size: usize,
    /// How often an idle relay looks for new events (a retry of dead letters
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

/// The check every operator route of the metrics port makes: the request
/// presents the ingest token, or gets 401 with what to present.
pub(crate) fn operator_authorized(
    headers: &axum::http::HeaderMap,
    token: &str,
) -> Result<(), (http::StatusCode, String)> {
    match headers.get(INGEST_TOKEN_HEADER) {
        Some(presented) if ingest_token_matches(presented.as_bytes(), token) => Ok(()),
        _ => Err((
            http::StatusCode::UNAUTHORIZED,
            format!("{{\"error\":\"present the ingest token in {INGEST_TOKEN_HEADER}\"}}"),
        )),
    }
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
    async fn deliver(&self, events: &[Event]) -> Result<Vec<Outcome>, tonic::Status> {
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
            .map(|reply| reply.outcomes.iter().map(Outcome::from_pb).collect())
    }
}

/// The relay metrics of one service, shared by its relays.
#[derive(Clone)]
struct RelayMetrics {
    depth: IntGaugeVec,
    oldest_age: IntGaugeVec,
    dead_letters: IntGaugeVec,
    delivered: IntCounterVec,
    failures: IntCounterVec,
}

impl RelayMetrics {
    fn register(registry: &Registry) -> anyhow::Result<Self> {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["destination"]);
        let counter = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["destination"]);
        let metrics = Self {
            depth: gauge("outbox_depth", "Events waiting for delivery")?,
            oldest_age: gauge(
                "outbox_oldest_age_seconds",
                "Age of the oldest event waiting for delivery",
            )?,
            dead_letters: gauge(
                "outbox_dead_letters",
                "Events set aside: rejected by the destination or unreadable",
            )?,
            delivered: counter("outbox_delivered_total", "Events delivered and acknowledged")?,
            failures: counter("outbox_delivery_failures_total", "Failed delivery attempts")?,
        };
        registry.register(Box::new(metrics.depth.clone()))?;
        registry.register(Box::new(metrics.oldest_age.clone()))?;
        registry.register(Box::new(metrics.dead_letters.clone()))?;
        registry.register(Box::new(metrics.delivered.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        Ok(metrics)
    }
}

/// What an operator may do with one outbox, whatever its store.
trait DeadLetterOps: Send + Sync {
    fn list(&self, limit: usize) -> BoxFuture<'_, anyhow::Result<Vec<DeadLetter>>>;
    fn retry(&self, limit: usize) -> BoxFuture<'_, anyhow::Result<u64>>;
}

impl<O: Outbox> DeadLetterOps for O {
    fn list(&self, limit: usize) -> BoxFuture<'_, anyhow::Result<Vec<DeadLetter>>> {
        Box::pin(self.dead_letters(limit))
    }

    fn retry(&self, limit: usize) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(self.retry_dead_letters(limit))
    }
}

struct Running {
    destination: &'static str,
    outbox: Arc<dyn DeadLetterOps>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

/// The relays of one service, one per destination, so a destination that is
/// down holds back only its own deliveries. They stop when this is dropped.
pub struct Relays {
    metrics: RelayMetrics,
    running: Vec<Running>,
    store: Option<StoreStatus>,
}

/// Most dead letters moved back by one retry request; a retry that moved
/// this many says so, and the operator runs it again.
pub const MAX_RETRY: usize = 10_000;

impl Relays {
    /// # Errors
    /// When the relay metrics are already registered.
    pub fn new(registry: &Registry) -> anyhow::Result<Self> {
        Ok(Self {
            metrics: RelayMetrics::register(registry)?,
            running: Vec::new(),
            store: None,
        })
    }

    /// Relays started after this read their outbox only while the store
    /// monitor says the store is up, which it says only once the store is
    /// prepared: at a first start the outbox table does not exist until
    /// the migrations have run, and querying it before would fill the
    /// store's log with errors; during an outage there is nothing to read.
    #[must_use]
    pub fn gated_by(mut self, store: StoreStatus) -> Self {
        self.store = Some(store);
        self
    }

    /// Starts relaying `outbox` to `destination`.
    pub fn spawn<O: Outbox, D: Destination>(&mut self, config: RelayConfig, outbox: O, destination: D) {
        let wake = Arc::new(Notify::new());
        let outbox = Arc::new(outbox);
        let task = tokio::spawn(run(
            config.clone(),
            outbox.clone(),
            destination,
            self.metrics.clone(),
            wake.clone(),
            self.store.clone(),
        ));
        self.running.push(Running {
            destination: config.destination,
            outbox,
            wake,
            task,
        });
    }

    /// The oldest `limit` dead letters of each destination.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn dead_letters(&self, limit: usize) -> anyhow::Result<Vec<(&'static str, Vec<DeadLetter>)>> {
        let mut all = Vec::new();
        for relay in &self.running {
            all.push((relay.destination, relay.outbox.list(limit).await?));
        }
        Ok(all)
    }

    /// Moves every destination's dead letters (up to [`MAX_RETRY`] each)
    /// back into its outbox and wakes its relay: each is delivered again,
    /// and set aside again if the destination still rejects it.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub async fn retry(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
        let mut moved = Vec::new();
        for relay in &self.running {
            let n = relay.outbox.retry(MAX_RETRY).await?;
            tracing::info!(
                destination = relay.destination,
                events = n,
                "dead letters sent back to the outbox"
            );
            relay.wake.notify_one();
            moved.push((relay.destination, n));
        }
        Ok(moved)
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for relay in &self.running {
            relay.task.abort();
        }
    }
}

/// The operator's endpoints for a service's outboxes, served beside
/// `/metrics` and opened only by the producers' ingest token (header
/// `x-chirp-ingest-token`): `GET /outbox/dead-letters` lists the oldest 100
/// per destination, `POST /outbox/retry` sends them all back.
pub fn operator_routes(relays: Arc<Relays>, ingest_token: &str) -> axum::Router {
    use axum::{extract::State, http::HeaderMap, routing};

    #[derive(Clone)]
    struct Operator {
        relays: Arc<Relays>,
        token: Arc<str>,
    }

    type Reply = (http::StatusCode, String);

    fn answer(result: anyhow::Result<serde_json::Value>) -> Reply {
        match result {
            Ok(body) => (http::StatusCode::OK, body.to_string()),
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "operator request on the outbox");
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    r#"{"error":"the store cannot be reached"}"#.to_owned(),
                )
            }
        }
    }

    async fn list(State(operator): State<Operator>, headers: HeaderMap) -> Reply {
        if let Err(reply) = operator_authorized(&headers, &operator.token) {
            return reply;
        }
        answer(operator.relays.dead_letters(100).await.map(|all| {
            serde_json::Value::Object(
                all.into_iter()
                    .map(|(destination, letters)| (destination.to_owned(), serde_json::json!(letters)))
                    .collect(),
            )
        }))
    }

    async fn retry(State(operator): State<Operator>, headers: HeaderMap) -> Reply {
        if let Err(reply) = operator_authorized(&headers, &operator.token) {
            return reply;
        }
        answer(operator.relays.retry().await.map(|moved| {
            serde_json::Value::Object(
                moved
                    .into_iter()
                    .map(|(destination, n)| (destination.to_owned(), serde_json::json!(n)))
                    .collect(),
            )
        }))
    }

    axum::Router::new()
        .route("/outbox/dead-letters", routing::get(list))
        .route("/outbox/retry", routing::post(retry))
        .with_state(Operator {
            relays,
            token: Arc::from(ingest_token),
        })
}

async fn run<O: Outbox, D: Destination>(
    config: RelayConfig,
    outbox: Arc<O>,
    destination: D,
    metrics: RelayMetrics,
    wake: Arc<Notify>,
    store: Option<StoreStatus>,
) {
    let label = [config.destination];
    // Counters exist from the start at 0, so that a rate over them is
    // right from the first failure and a scraper sees every destination.
    metrics.delivered.with_label_values(&label);
    metrics.failures.with_label_values(&label);
    let mut failures: u32 = 0;
    let mut last_backlog = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        // One pass (read, deliver, mark) counts as a store operation under
        // way, so maintenance waits for it to end; the pauses do not.
        let step = if let Some(store) = &store {
            Some(store.working(config.poll_interval).await)
        } else {
            None
        };
        // The gauges cost a query; once a second is plenty for a scraper.
        if last_backlog.elapsed() >= Duration::from_secs(1) {
            if let Ok(backlog) = outbox.backlog().await {
                let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                metrics.depth.with_label_values(&label).set(gauge(backlog.depth));
                metrics
                    .dead_letters
                    .with_label_values(&label)
                    .set(gauge(backlog.dead_letters));
                let age = backlog.oldest.map_or(0, |at| (Utc::now() - at).num_seconds().max(0));
                metrics.oldest_age.with_label_values(&label).set(age);
            }
            last_backlog = tokio::time::Instant::now();
        }

        let batch = match outbox.pending(config.batch_size).await {
            Ok(batch) => batch,
            Err(err) => {
                drop(step);
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
            drop(step);
            failures = 0;
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(config.poll_interval) => {}
            }
            continue;
        }

        let delivered = deliver_batch(&config, &*outbox, &destination, &metrics, batch).await;
        drop(step);
        match delivered {
            Ok(()) => failures = 0,
            Err(()) => {
                failures = failures.saturating_add(1);
                tokio::time::sleep(backoff(&config, failures)).await;
            }
        }
    }
}

/// The span of one delivery while traces are exported: a root of its own
/// (the relay runs outside any request) linked to the request that wrote
/// each event, so a trace viewer leads from a request to the delivery of
/// its events, and from there (the call's `traceparent`) to the consumer's
/// apply.
fn delivery_span(config: &RelayConfig, events: &[Event]) -> tracing::Span {
    if !crate::telemetry::exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: "chirp::relay",
        parent: None,
        "deliver",
        otel.name = format!("deliver to {}", config.destination),
        otel.kind = "producer",
        messaging.destination.name = config.destination,
        messaging.batch.message_count = events.len(),
    );
    for trace in events.iter().filter_map(|e| e.trace.as_deref()) {
        crate::telemetry::link(&span, trace);
    }
    span
}

/// Delivers one batch: unreadable entries and the events the destination
/// rejects are set aside, the rest marked delivered. `Err` means try again
/// after a pause (nothing was lost: the batch is still in the outbox).
async fn deliver_batch<O: Outbox, D: Destination>(
    config: &RelayConfig,
    outbox: &O,
    destination: &D,
    metrics: &RelayMetrics,
    batch: Vec<Pending>,
) -> Result<(), ()> {
    let label = [config.destination];
    let mut rejected = Vec::new();
    let mut readable = Vec::new();
    for pending in batch {
        match &pending.event {
            Ok(_) => readable.push(pending),
            Err(reason) => rejected.push(Rejected {
                position: pending.position.clone(),
                reason: format!("unreadable in the outbox: {reason}"),
            }),
        }
    }
    let events: Vec<Event> = readable.iter().filter_map(|p| p.event.as_ref().ok().cloned()).collect();
    let mut delivered = Vec::new();
    if !events.is_empty() {
        let outcomes = match destination
            .deliver(&events)
            .instrument(delivery_span(config, &events))
            .await
        {
            Ok(outcomes) => outcomes,
            Err(status) => {
                metrics.failures.with_label_values(&label).inc();
                tracing::warn!(
                    destination = config.destination,
                    code = ?status.code(),
                    reason = status.message(),
                    waiting = events.len(),
                    "delivery failed; events stay in the outbox"
                );
                return Err(());
            }
        };
        let mut outcomes = outcomes.into_iter();
        for pending in readable {
            match outcomes.next() {
                Some(Outcome::Rejected(reason)) => rejected.push(Rejected {
                    position: pending.position,
                    reason,
                }),
                _ => delivered.push(pending),
            }
        }
    }

    // Set aside first: if that fails, the whole batch goes again and the
    // destination dedupes what it applied.
    if !rejected.is_empty() {
        if let Err(err) = outbox.dead_letter(&rejected).await {
            tracing::warn!(
                destination = config.destination,
                error = format!("{err:#}"),
                "moving events to the dead letters"
            );
            return Err(());
        }
        for r in &rejected {
            tracing::error!(
                destination = config.destination,
                position = r.position,
                reason = r.reason,
                "event set aside in the outbox's dead letters"
            );
        }
        metrics
            .dead_letters
            .with_label_values(&label)
            .add(i64::try_from(rejected.len()).unwrap_or(i64::MAX));
    }
    if !delivered.is_empty() {
        metrics
            .delivered
            .with_label_values(&label)
            .inc_by(u64::try_from(delivered.len()).unwrap_or(0));
        if let Err(err) = outbox.mark_delivered(&delivered).await {
            // The batch will be sent again; the destination dedupes.
            tracing::warn!(
                destination = config.destination,
                error = format!("{err:#}"),
                "marking events delivered"
            );
        }
    }
    Ok(())
}

/// Equal jitter: half of `base * 2^failures` (capped) plus a random part of
/// the other half, so retries spread out but never come back at once.
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

    use uuid::Uuid;

    use super::*;
    use crate::events::Payload;

    /// An outbox entry in memory: position, event, state.
    type Entry = (String, Result<Event, String>, State);

    #[derive(Clone, Default)]
    struct MemoryOutbox {
        entries: Arc<Mutex<Vec<Entry>>>,
        /// Marking fails this many times: the relay "dies" between delivering
        /// and marking.
        mark_failures: Arc<AtomicU32>,
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum State {
        Waiting,
        Delivered,
        Dead(String),
    }

    impl MemoryOutbox {
        fn all_delivered_or_dead(&self) -> bool {
            self.entries
                .lock()
                .unwrap()
                .iter()
                .all(|(_, _, s)| *s != State::Waiting)
        }

        fn dead(&self) -> Vec<(String, String)> {
            self.entries
                .lock()
                .unwrap()
                .iter()
                .filter_map(|(p, _, s)| match s {
                    State::Dead(reason) => Some((p.clone(), reason.clone())),
                    _ => None,
                })
                .collect()
        }

        fn set(&self, positions: impl Iterator<Item = (String, State)>) {
            let mut entries = self.entries.lock().unwrap();
            for (position, state) in positions {
                for (p, _, s) in entries.iter_mut() {
                    if *p == position {
                        *s = state.clone();
                    }
                }
            }
        }
    }

    impl Outbox for MemoryOutbox {
        async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
            Ok(self
                .entries
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, _, s)| *s == State::Waiting)
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
            self.set(delivered.iter().map(|p| (p.position.clone(), State::Delivered)));
            Ok(())
        }

        async fn dead_letter(&self, rejected: &[Rejected]) -> anyhow::Result<()> {
            self.set(
                rejected
                    .iter()
                    .map(|r| (r.position.clone(), State::Dead(r.reason.clone()))),
            );
            Ok(())
        }

        async fn dead_letters(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
            Ok(self
                .dead()
                .into_iter()
                .take(limit)
                .map(|(position, reason)| DeadLetter {
                    position,
                    event_id: None,
                    reason,
                    failed_at: Utc::now(),
                })
                .collect())
        }

        async fn retry_dead_letters(&self, limit: usize) -> anyhow::Result<u64> {
            let dead: Vec<_> = self.dead().into_iter().take(limit).collect();
            self.set(dead.iter().map(|(p, _)| (p.clone(), State::Waiting)));
            Ok(dead.len() as u64)
        }

        async fn backlog(&self) -> anyhow::Result<Backlog> {
            let entries = self.entries.lock().unwrap();
            let count = |f: fn(&State) -> bool| entries.iter().filter(|(_, _, s)| f(s)).count() as u64;
            Ok(Backlog {
                depth: count(|s| *s == State::Waiting),
                oldest: None,
                dead_letters: count(|s| matches!(s, State::Dead(_))),
            })
        }
    }

    /// Applies each event id once, like analytics-service, and counts
    /// deliveries; rejects the producers named in `refused`.
    #[derive(Clone, Default)]
    struct DedupingConsumer {
        seen: Arc<Mutex<HashSet<Uuid>>>,
        applied: Arc<AtomicU32>,
        deliveries: Arc<AtomicU32>,
        failures_left: Arc<AtomicU32>,
        refused: Arc<Mutex<HashSet<String>>>,
    }

    impl Destination for DedupingConsumer {
        async fn deliver(&self, events: &[Event]) -> Result<Vec<Outcome>, tonic::Status> {
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            if self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(tonic::Status::unavailable("down"));
            }
            let refused = self.refused.lock().unwrap();
            let mut seen = self.seen.lock().unwrap();
            Ok(events
                .iter()
                .map(|event| {
                    if refused.contains(&event.producer) {
                        Outcome::Rejected(format!("{} may not send here", event.producer))
                    } else if seen.insert(event.id) {
                        self.applied.fetch_add(1, Ordering::SeqCst);
                        Outcome::Applied
                    } else {
                        Outcome::Skipped
                    }
                })
                .collect())
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

    fn event(producer: &str) -> Event {
        Event::new(
            producer,
            Payload::UserRegistered {
                user_id: Uuid::new_v4(),
            },
        )
    }

    fn push(outbox: &MemoryOutbox, event: Result<Event, String>) {
        let mut entries = outbox.entries.lock().unwrap();
        let position = entries.len().to_string();
        entries.push((position, event, State::Waiting));
    }

    fn fill(outbox: &MemoryOutbox, n: usize) {
        for _ in 0..n {
            push(outbox, Ok(event("test")));
        }
    }

    fn relays(outbox: &MemoryOutbox, consumer: &DedupingConsumer) -> Relays {
        let mut relays = Relays::new(&Registry::new()).unwrap();
        relays.spawn(config(), outbox.clone(), consumer.clone());
        relays
    }

    async fn until(condition: impl Fn() -> bool) {
        test_support::eventually("the condition", Duration::from_secs(5), condition).await;
    }

    #[tokio::test]
    async fn a_relay_delivers_everything_through_a_failing_destination() {
        let outbox = MemoryOutbox::default();
        fill(&outbox, 35);
        let consumer = DedupingConsumer::default();
        consumer.failures_left.store(3, Ordering::SeqCst);
        let relays = relays(&outbox, &consumer);
        until(|| consumer.applied.load(Ordering::SeqCst) == 35).await;
        until(|| outbox.all_delivered_or_dead()).await;
        assert_eq!(relays.metrics.delivered.with_label_values(&["test"]).get(), 35);
        assert_eq!(relays.metrics.failures.with_label_values(&["test"]).get(), 3);
        assert!(outbox.dead().is_empty());
    }

    #[tokio::test]
    async fn a_relay_that_dies_before_marking_redelivers_and_the_consumer_applies_once() {
        let outbox = MemoryOutbox::default();
        fill(&outbox, 10);
        outbox.mark_failures.store(1, Ordering::SeqCst);
        let consumer = DedupingConsumer::default();
        let _relays = relays(&outbox, &consumer);
        until(|| outbox.all_delivered_or_dead()).await;
        assert_eq!(consumer.deliveries.load(Ordering::SeqCst), 2, "the batch went twice");
        assert_eq!(consumer.applied.load(Ordering::SeqCst), 10, "and counted once");
    }

    #[tokio::test]
    async fn rejected_and_unreadable_events_are_set_aside_and_the_events_behind_them_delivered() {
        let outbox = MemoryOutbox::default();
        fill(&outbox, 3);
        push(&outbox, Ok(event("poison")));
        push(&outbox, Err("expected value at line 1 column 1".into()));
        fill(&outbox, 30);
        let consumer = DedupingConsumer::default();
        consumer.refused.lock().unwrap().insert("poison".into());
        let relays = relays(&outbox, &consumer);

        until(|| consumer.applied.load(Ordering::SeqCst) == 33).await;
        until(|| outbox.all_delivered_or_dead()).await;
        let dead = outbox.dead();
        assert_eq!(
            dead,
            [
                ("3".to_owned(), "poison may not send here".to_owned()),
                (
                    "4".to_owned(),
                    "unreadable in the outbox: expected value at line 1 column 1".to_owned()
                ),
            ]
        );
        assert_eq!(relays.metrics.dead_letters.with_label_values(&["test"]).get(), 2);
        let listed = relays.dead_letters(10).await.unwrap();
        assert_eq!(listed[0].0, "test");
        assert_eq!(listed[0].1.len(), 2);

        // Retried: the consumer now takes the formerly refused producer; the
        // unreadable entry is still unreadable and goes back.
        consumer.refused.lock().unwrap().clear();
        assert_eq!(relays.retry().await.unwrap(), [("test", 2)]);
        until(|| consumer.applied.load(Ordering::SeqCst) == 34).await;
        until(|| outbox.dead().len() == 1 && outbox.all_delivered_or_dead()).await;
        assert_eq!(outbox.dead()[0].0, "4");
    }

    #[tokio::test]
    async fn the_operator_routes_open_only_with_the_ingest_token() {
        use tower::ServiceExt as _;
        let outbox = MemoryOutbox::default();
        push(&outbox, Err("unreadable".into()));
        let consumer = DedupingConsumer::default();
        let relays = Arc::new(relays(&outbox, &consumer));
        until(|| outbox.dead().len() == 1).await;
        let routes = operator_routes(relays, "secret");
        let call = |method: &str, path: &str, token: Option<&str>| {
            let mut request = http::Request::builder().method(method).uri(path);
            if let Some(token) = token {
                request = request.header(INGEST_TOKEN_HEADER, token);
            }
            routes.clone().oneshot(request.body(axum::body::Body::empty()).unwrap())
        };
        for token in [None, Some("wrong")] {
            let reply = call("POST", "/outbox/retry", token).await.unwrap();
            assert_eq!(reply.status(), http::StatusCode::UNAUTHORIZED);
        }
        let reply = call("GET", "/outbox/dead-letters", Some("secret")).await.unwrap();
        assert_eq!(reply.status(), http::StatusCode::OK);
        let body = axum::body::to_bytes(reply.into_body(), 1 << 20).await.unwrap();
        let listed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(listed["test"][0]["reason"], "unreadable in the outbox: unreadable");
        let reply = call("POST", "/outbox/retry", Some("secret")).await.unwrap();
        let body = axum::body::to_bytes(reply.into_body(), 1 << 20).await.unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["test"], 1);
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
