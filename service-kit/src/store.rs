//! Watches a service's store and makes its health follow it (ARCHITECTURE.md
//! invariant 4): while the store does not answer, the service's API reports
//! NOT_SERVING and its handlers fail fast with UNAVAILABLE instead of waiting
//! on a connection that will not come; when the store answers again, both
//! recover with no restart.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus::{IntGauge, Registry};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::server::Health;

/// Whether the store answered the last probe. Cheap to clone and to read on
/// every request.
#[derive(Clone, Debug, Default)]
pub struct StoreStatus(Arc<AtomicBool>);

impl StoreStatus {
    /// Starts down: nothing is known until the first probe.
    #[must_use]
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    /// Up, and never probed: for a store used without a monitor (tools,
    /// tests that call a store directly).
    #[must_use]
    pub fn always_up() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    #[must_use]
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What a store monitor asks of a service's store.
pub trait Probe: Send + Sync + 'static {
    /// Makes the store usable (migrations, indexes, schema version); runs
    /// until it succeeds once in the life of the process.
    fn prepare(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Whether the store answers now.
    fn ping(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A running store monitor; aborted when dropped.
pub struct StoreMonitor {
    task: JoinHandle<()>,
}

impl Drop for StoreMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StoreMonitor {
    /// [`StoreMonitor::spawn`] for a [`Probe`]: prepares the store on the
    /// first probe that reaches it, then pings.
    ///
    /// # Errors
    /// When the `store_up` gauge cannot be registered.
    pub fn watch<P: Probe>(
        store: &'static str,
        health: Health,
        registry: &Registry,
        api_services: Vec<&'static str>,
        interval: Duration,
        status: StoreStatus,
        probe: Arc<P>,
    ) -> anyhow::Result<Self> {
        let prepared = Arc::new(tokio::sync::OnceCell::new());
        Self::spawn(store, health, registry, api_services, interval, status, move || {
            let probe = probe.clone();
            let prepared = prepared.clone();
            async move {
                prepared
                    .get_or_try_init(|| probe.prepare())
                    .await
                    .map_err(|e| e.context(format!("preparing {store}")))?;
                probe.ping().await
            }
        })
    }

    /// Probes the store every `interval`, records the result in `status` (each probe bounded by the same
    /// interval, at least a second) and sets the health of `api_services`.
    ///
    /// `probe` should do whatever makes the store usable, not only ping it:
    /// migrations that could not run at start-up run on the first success.
    ///
    /// # Errors
    /// When the `store_up` gauge cannot be registered.
    pub fn spawn<P, F>(
        store: &'static str,
        health: Health,
        registry: &Registry,
        api_services: Vec<&'static str>,
        interval: Duration,
        status: StoreStatus,
        mut probe: P,
    ) -> anyhow::Result<Self>
    where
        P: FnMut() -> F + Send + 'static,
        F: Future<Output = anyhow::Result<()>> + Send,
    {
        let gauge = IntGauge::new("store_up", "1 while the service's own store answers its probe")?;
        registry.register(Box::new(gauge.clone()))?;
        let up = status.0;
        let probe_timeout = interval.max(Duration::from_secs(1));
        let task = tokio::spawn(async move {
            let mut was_up = None;
            loop {
                let now_up = match tokio::time::timeout(probe_timeout, probe()).await {
                    Ok(Ok(())) => true,
                    Ok(Err(err)) => {
                        if was_up != Some(false) {
                            warn!(store, error = format!("{err:#}"), "store probe failed");
                        }
                        false
                    }
                    Err(_) => {
                        if was_up != Some(false) {
                            warn!(store, ?probe_timeout, "store probe timed out");
                        }
                        false
                    }
                };
                up.store(now_up, Ordering::Release);
                gauge.set(i64::from(now_up));
                if was_up != Some(now_up) {
                    if now_up {
                        info!(store, "store is up: serving");
                    } else {
                        warn!(store, "store is down: NOT_SERVING");
                    }
                    for service in &api_services {
                        health.set(service, now_up).await;
                    }
                    was_up = Some(now_up);
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Self { task })
    }
}

/// `store_operation_seconds{store, operation, outcome}`: how long each call
/// into a service's store took, by operation, as the service saw it. One
/// histogram for the process, registered by [`register_metrics`].
fn operation_histogram() -> &'static prometheus::HistogramVec {
    static HISTOGRAM: std::sync::OnceLock<prometheus::HistogramVec> = std::sync::OnceLock::new();
    HISTOGRAM.get_or_init(|| {
        prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "store_operation_seconds",
                "Time of one store operation, by store, operation and outcome (ok or error)",
            )
            .buckets(crate::server::LATENCY_BUCKETS.to_vec()),
            &["store", "operation", "outcome"],
        )
        .unwrap_or_else(|_| unreachable!("the metric's name, labels and buckets are valid"))
    })
}

/// Adds the store operation histogram to a service's registry.
///
/// # Errors
/// When it is registered already.
pub fn register_metrics(registry: &Registry) -> anyhow::Result<()> {
    registry.register(Box::new(operation_histogram().clone()))?;
    Ok(())
}

/// Runs one store operation: times it into `store_operation_seconds` and,
/// while traces are exported and the operation is part of a traced piece of
/// work (a request, a delivery, a job step), gives it a client span named
/// `<store> <operation>`. Probes and other untraced work get no span, so a
/// store monitor does not start a trace every interval.
///
/// # Errors
/// The operation's own.
pub async fn timed<T, E: std::fmt::Display>(
    store: &'static str,
    operation: &'static str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    use tracing::Instrument as _;

    let span = if crate::telemetry::tracing_here() && !tracing::Span::current().is_none() {
        tracing::info_span!(
            target: "chirp::store",
            "store",
            otel.name = format!("{store} {operation}"),
            otel.kind = "client",
            otel.status_description = tracing::field::Empty,
            db.system = store,
            db.operation = operation,
        )
    } else {
        tracing::Span::none()
    };
    let start = std::time::Instant::now();
    let result = work.instrument(span.clone()).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    operation_histogram()
        .with_label_values(&[store, operation, outcome])
        .observe(start.elapsed().as_secs_f64());
    if let Err(err) = &result {
        if !span.is_none() {
            span.record("otel.status_description", err.to_string());
        }
    }
    result
}
