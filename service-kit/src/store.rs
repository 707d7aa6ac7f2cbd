//! Watches a service's store and makes its health follow it (ARCHITECTURE.md
//! invariant 4): while the store does not answer, the service's API reports
//! NOT_SERVING and its handlers fail fast with UNAVAILABLE instead of waiting
//! on a connection that will not come; when the store answers again, both
//! recover with no restart.
//!
//! Maintenance (`chirp restore`, an operator's data replacement) uses the
//! same path: while a service is in maintenance its store counts as down
//! whatever it answers, so the service is NOT_SERVING, fails fast and
//! leaves the store alone; when maintenance ends the store is prepared again
//! (its migrations run over whatever was put in place) before it serves.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus::{IntGauge, Registry};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::server::Health;

/// Whether the store answered the last probe, and whether the service is in
/// maintenance. Cheap to clone and to read on every request.
#[derive(Clone, Debug, Default)]
pub struct StoreStatus(Arc<StatusInner>);

#[derive(Debug, Default)]
struct StatusInner {
    up: AtomicBool,
    maintenance: AtomicBool,
    /// How many maintenance periods have ended: the store is prepared again
    /// after each.
    resumed: AtomicU64,
}

impl StoreStatus {
    /// Starts down: nothing is known until the first probe.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Up, and never probed: for a store used without a monitor (tools,
    /// tests that call a store directly).
    #[must_use]
    pub fn always_up() -> Self {
        let status = Self::default();
        status.0.up.store(true, Ordering::Release);
        status
    }

    /// Whether the store may be used: it answered the last probe and the
    /// service is not in maintenance.
    #[must_use]
    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Acquire) && !self.in_maintenance()
    }

    /// Returns once the store may be used, looking every `every`: what
    /// background work (relays, job workers) waits on, so it never touches a
    /// store that is down, not yet prepared, or in maintenance.
    pub async fn until_up(&self, every: Duration) {
        while !self.is_up() {
            tokio::time::sleep(every).await;
        }
    }

    /// Returns once the store may be used, counted as a store operation
    /// under way until the returned guard is dropped: what a relay or job
    /// holds across one step, so that maintenance waits for the step (see
    /// [`drained`]) instead of having it land after a restore.
    pub async fn working(&self, every: Duration) -> InFlight {
        loop {
            // Counted before the check, as in `timed`.
            let counted = InFlight::enter();
            if self.is_up() {
                return counted;
            }
            drop(counted);
            tokio::time::sleep(every).await;
        }
    }

    #[must_use]
    pub fn in_maintenance(&self) -> bool {
        // SeqCst, paired with the in-flight count (see `drained`).
        self.0.maintenance.load(Ordering::SeqCst)
    }

    /// Enters or leaves maintenance. Entering takes effect at once for
    /// every request and relay; the health turns NOT_SERVING at the
    /// monitor's next probe. Leaving has the store prepared again.
    pub fn set_maintenance(&self, on: bool) {
        let was = self.0.maintenance.swap(on, Ordering::SeqCst);
        if was && !on {
            self.0.resumed.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn resumed(&self) -> u64 {
        self.0.resumed.load(Ordering::Acquire)
    }

    fn set_up(&self, up: bool) {
        self.0.up.store(up, Ordering::Release);
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
        // The maintenance period the store was last prepared after (none
        // yet): prepared once at start, and again after each maintenance.
        let prepared: Arc<tokio::sync::Mutex<Option<u64>>> = Arc::default();
        let resumed = status.clone();
        Self::spawn(store, health, registry, api_services, interval, status, move || {
            let (probe, prepared, resumed) = (probe.clone(), prepared.clone(), resumed.clone());
            async move {
                let mut prepared = prepared.lock().await;
                let period = resumed.resumed();
                if *prepared != Some(period) {
                    probe
                        .prepare()
                        .await
                        .map_err(|e| e.context(format!("preparing {store}")))?;
                    *prepared = Some(period);
                }
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
        let probe_timeout = interval.max(Duration::from_secs(1));
        let task = tokio::spawn(async move {
            let mut was_up = None;
            loop {
                let now_up = if status.in_maintenance() {
                    // Hands off: whoever maintains the store may have it
                    // half replaced.
                    if was_up != Some(false) {
                        warn!(store, "in maintenance: NOT_SERVING");
                    }
                    false
                } else {
                    match tokio::time::timeout(probe_timeout, probe()).await {
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
                    }
                };
                status.set_up(now_up);
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

/// Store operations of this process under way (see [`timed`]).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts one store operation for as long as it lives.
#[must_use = "the operation counts only while the guard lives"]
pub struct InFlight;

impl InFlight {
    fn enter() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits (up to `limit`) until no store operation is under way; whether
/// that happened. Called once maintenance is on, it is what makes the
/// switch safe: an operation counts itself before it checks the store is
/// up (its store module's first step), and maintenance is set before the
/// count is read, both sequentially consistent, so an operation either
/// sees maintenance and fails fast or is seen here and waited for. No
/// write that passed the check lands after a restore replaced the data.
pub async fn drained(limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while IN_FLIGHT.load(Ordering::SeqCst) > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Longest `POST /maintenance/on` waits for the operations under way.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The maintenance routes of the metrics port, for callers presenting the
/// ingest token: `GET /maintenance` (whether in maintenance, whether the
/// store is up), `POST /maintenance/on` (which answers once the store
/// operations under way have finished, `drained` false if some were still
/// running after ten seconds) and `POST /maintenance/off`.
pub fn maintenance_routes(status: StoreStatus, ingest_token: &str) -> axum::Router {
    use axum::{extract::State, http::HeaderMap, routing};

    #[derive(Clone)]
    struct Maintenance {
        status: StoreStatus,
        token: Arc<str>,
    }

    type Reply = (http::StatusCode, String);

    async fn answer(m: Maintenance, headers: HeaderMap, change: Option<bool>) -> Reply {
        if let Err(refused) = crate::relay::operator_authorized(&headers, &m.token) {
            return refused;
        }
        let mut drained_now = None;
        if let Some(on) = change {
            m.status.set_maintenance(on);
            info!(maintenance = on, "maintenance {}", if on { "started" } else { "ended" });
            if on {
                let all = drained(DRAIN_LIMIT).await;
                if !all {
                    warn!("store operations still under way {DRAIN_LIMIT:?} into maintenance");
                }
                drained_now = Some(all);
            }
        }
        let body = serde_json::json!({
            "maintenance": m.status.in_maintenance(),
            "store_up": m.status.0.up.load(Ordering::Acquire),
            "drained": drained_now,
        });
        (http::StatusCode::OK, body.to_string())
    }

    axum::Router::new()
        .route(
            "/maintenance",
            routing::get(|State(m): State<Maintenance>, h: HeaderMap| answer(m, h, None)),
        )
        .route(
            "/maintenance/on",
            routing::post(|State(m): State<Maintenance>, h: HeaderMap| answer(m, h, Some(true))),
        )
        .route(
            "/maintenance/off",
            routing::post(|State(m): State<Maintenance>, h: HeaderMap| answer(m, h, Some(false))),
        )
        .with_state(Maintenance {
            status,
            token: Arc::from(ingest_token),
        })
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
    let _in_flight = InFlight::enter();
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Default)]
    struct Counting {
        prepared: AtomicUsize,
        pinged: AtomicUsize,
    }

    impl Probe for Counting {
        async fn prepare(&self) -> anyhow::Result<()> {
            self.prepared.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        async fn ping(&self) -> anyhow::Result<()> {
            self.pinged.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    async fn until(what: impl Fn() -> bool) {
        test_support::eventually("the store's status", Duration::from_secs(5), what).await;
    }

    #[tokio::test]
    async fn maintenance_holds_the_store_down_untouched_and_prepares_it_again_when_it_ends() {
        let status = StoreStatus::new();
        let probe = Arc::new(Counting::default());
        let _monitor = StoreMonitor::watch(
            "test",
            Health::new(),
            &Registry::new(),
            vec![],
            Duration::from_millis(20),
            status.clone(),
            probe.clone(),
        )
        .unwrap();
        until(|| status.is_up()).await;
        assert_eq!(probe.prepared.load(Ordering::SeqCst), 1);

        status.set_maintenance(true);
        assert!(!status.is_up(), "maintenance takes effect at once");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let pinged = probe.pinged.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(probe.pinged.load(Ordering::SeqCst), pinged, "the store is left alone");
        assert!(!status.is_up());

        status.set_maintenance(false);
        until(|| status.is_up()).await;
        assert_eq!(
            probe.prepared.load(Ordering::SeqCst),
            2,
            "prepared again over the new data"
        );
    }

    #[tokio::test]
    async fn maintenance_is_switched_only_with_the_ingest_token() {
        use tower::ServiceExt as _;
        let status = StoreStatus::always_up();
        let routes = maintenance_routes(status.clone(), "secret");
        let call = |path: &str, token: Option<&str>| {
            let mut request = http::Request::builder().method("POST").uri(path);
            if let Some(token) = token {
                request = request.header(crate::relay::INGEST_TOKEN_HEADER, token);
            }
            routes.clone().oneshot(request.body(axum::body::Body::empty()).unwrap())
        };
        for token in [None, Some("wrong")] {
            let reply = call("/maintenance/on", token).await.unwrap();
            assert_eq!(reply.status(), http::StatusCode::UNAUTHORIZED);
            assert!(status.is_up(), "a refused call changes nothing");
        }
        let reply = call("/maintenance/on", Some("secret")).await.unwrap();
        let body = axum::body::to_bytes(reply.into_body(), 1 << 16).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"maintenance": true, "store_up": true, "drained": true})
        );
        assert!(!status.is_up());
        call("/maintenance/off", Some("secret")).await.unwrap();
        assert!(status.is_up());
    }

    #[tokio::test]
    async fn maintenance_begins_only_once_the_store_operations_under_way_have_ended() {
        use tower::ServiceExt as _;
        let status = StoreStatus::always_up();
        let routes = maintenance_routes(status.clone(), "secret");
        let started = Arc::new(tokio::sync::Notify::new());
        let ended = Arc::new(AtomicBool::new(false));
        let operation = {
            let (started, ended, status) = (started.clone(), ended.clone(), status.clone());
            tokio::spawn(async move {
                timed("test", "slow write", async {
                    assert!(status.is_up(), "the write passed the check before maintenance");
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    ended.store(true, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(())
                })
                .await
            })
        };
        started.notified().await;
        let request = http::Request::builder()
            .method("POST")
            .uri("/maintenance/on")
            .header(crate::relay::INGEST_TOKEN_HEADER, "secret")
            .body(axum::body::Body::empty())
            .unwrap();
        let reply = routes.oneshot(request).await.unwrap();
        assert!(ended.load(Ordering::SeqCst), "the reply waited for the write under way");
        let body = axum::body::to_bytes(reply.into_body(), 1 << 16).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["drained"],
            true
        );
        operation.await.unwrap().unwrap();
        let worker = status.clone();
        let stepping = tokio::spawn(async move {
            let _step = worker.working(Duration::from_millis(5)).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !stepping.is_finished(),
            "a relay or job step waits while in maintenance"
        );
        status.set_maintenance(false);
        status.set_up(true);
        stepping.await.unwrap();
    }
}
