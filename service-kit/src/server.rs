//! Everything around a service's own routes: grpc.health.v1, reflection (v1 and
//! v1alpha), the per-RPC layer (span, request id, deadline, metrics), load
//! shedding, a timeout, Prometheus `/metrics`, and graceful shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tonic::{service::Routes, transport::server::TcpIncoming};
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
    ServingStatus,
};
use tower::{Layer, Service};
use tracing::{info, warn, Instrument};

use crate::context::{RequestContext, REQUEST_ID_HEADER};

/// The health statuses a service reports: overall (`""`) and one per API
/// service.
///
/// Once shutdown begins every status stays NOT_SERVING, whatever a store
/// monitor finds afterwards.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    shutting_down: Arc<AtomicBool>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    #[must_use]
    pub fn new() -> Self {
        Self {
            reporter: HealthReporter::new(),
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets one service's status (`""` is the whole server).
    pub async fn set(&self, service: &str, serving: bool) {
        let status = if serving && !self.shutting_down.load(Ordering::Acquire) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }

    async fn begin_shutdown(&self, services: &[&str]) {
        self.shutting_down.store(true, Ordering::Release);
        self.set("", false).await;
        for service in services {
            self.set(service, false).await;
        }
    }

    fn server(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
            .max_decoding_message_size(SMALL_REQUEST_BYTES)
    }
}

/// Largest request health and reflection accept: a service or symbol name.
const SMALL_REQUEST_BYTES: usize = 4 * 1024;

/// The start of tonic's OUT_OF_RANGE for a request over a server's
/// `max_decoding_message_size` (it reads only the length prefix, so such a
/// request costs no more than refusing it).
const TOO_LARGE_PREFIX: &str = "Error, decoded message length too large";

/// Settings of [`serve`].
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Name in logs and metrics, e.g. `user-service`.
    pub service_name: &'static str,
    /// Fully qualified names of the API services in the routes, e.g.
    /// `chirp.user.v1.UserService`; their health starts NOT_SERVING until the
    /// service's store monitor says otherwise.
    pub api_services: Vec<&'static str>,
    pub request_timeout: Duration,
    pub concurrency_limit: usize,
    pub shutdown_delay: Duration,
    pub drain_timeout: Duration,
    /// Operator endpoints served beside `/metrics` (e.g.
    /// [`crate::relay::operator_routes`]).
    pub operator_routes: Option<axum::Router>,
}

impl ServeOptions {
    #[must_use]
    pub fn new(
        service_name: &'static str,
        api_services: Vec<&'static str>,
        common: &crate::config::CommonArgs,
    ) -> Self {
        Self {
            service_name,
            api_services,
            request_timeout: common.request_timeout,
            concurrency_limit: common.concurrency_limit,
            shutdown_delay: common.shutdown_delay,
            drain_timeout: common.drain_timeout,
            operator_routes: None,
        }
    }

    /// Serves `routes` on the metrics port too.
    #[must_use]
    pub fn with_operator_routes(mut self, routes: axum::Router) -> Self {
        self.operator_routes = Some(routes);
        self
    }
}

/// Serves `routes` on `listener` (and `/metrics` on `metrics_listener`) until
/// `shutdown` resolves; then health turns NOT_SERVING, the server keeps
/// answering for `shutdown_delay`, and in-flight RPCs get `drain_timeout` to
/// finish before connections are dropped.
///
/// # Errors
/// When the reflection service cannot be built or the server fails.
pub async fn serve(
    options: ServeOptions,
    health: Health,
    registry: Registry,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    routes: Routes,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    for service in &options.api_services {
        // Starts NOT_SERVING: the store monitor turns it on once the store answers.
        health.set(service, false).await;
    }
    health.set("", true).await;

    let metrics = RpcMetrics::register(&registry)?;
    let reflection_v1 = reflection(&options.api_services)
        .build_v1()
        .context("building reflection v1")?;
    let reflection_v1alpha = reflection(&options.api_services)
        .build_v1alpha()
        .context("building reflection v1alpha")?;
    let routes = routes
        .add_service(health.server())
        .add_service(reflection_v1.max_decoding_message_size(SMALL_REQUEST_BYTES))
        .add_service(reflection_v1alpha.max_decoding_message_size(SMALL_REQUEST_BYTES));

    let local_addr = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .timeout(options.request_timeout)
        .layer(
            tower::ServiceBuilder::new()
                .layer(RpcLayer { metrics })
                // Shed instead of queueing: a full server answers
                // RESOURCE_EXHAUSTED at once and callers can go elsewhere.
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    options.concurrency_limit,
                )),
        )
        .add_routes(routes);

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    // Nagle's algorithm would hold small replies back ~40 ms waiting for the
    // client's delayed ACK; gRPC replies are small and latency-bound.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = server.serve_with_incoming_shutdown(incoming, async {
        drop(drain_rx.await);
    });
    tokio::pin!(server);

    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::watch::channel(false);
    let operator_routes = options.operator_routes.clone().unwrap_or_default();
    let metrics_task =
        metrics_listener.map(|l| tokio::spawn(serve_metrics(l, registry, operator_routes, metrics_stop_rx)));
    info!(service = options.service_name, addr = %local_addr, "serving gRPC");

    tokio::pin!(shutdown);
    let early = tokio::select! {
        result = &mut server => Some(result),
        () = &mut shutdown => None,
    };
    if let Some(result) = early {
        let _ = metrics_stop_tx.send(true);
        return result.context("gRPC server stopped");
    }

    info!(service = options.service_name, "shutting down: health is NOT_SERVING");
    health.begin_shutdown(&options.api_services).await;
    let keep_serving = tokio::time::sleep(options.shutdown_delay);
    tokio::select! {
        result = &mut server => return result.context("gRPC server stopped"),
        () = keep_serving => {}
    }
    let _ = drain_tx.send(());
    match tokio::time::timeout(options.drain_timeout, &mut server).await {
        Ok(result) => result.context("gRPC server stopped")?,
        Err(_) => warn!(
            service = options.service_name,
            timeout = ?options.drain_timeout,
            "drain timed out; dropping the connections still open"
        ),
    }
    let _ = metrics_stop_tx.send(true);
    if let Some(task) = metrics_task {
        drop(task.await);
    }
    info!(service = options.service_name, "stopped");
    Ok(())
}

/// Reflection that lists exactly what this server serves. The descriptor set
/// holds every Chirp API, but advertising them all would tell grpcurl users
/// that user-service serves MessageService.
fn reflection(api_services: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(chirp_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false);
    for name in api_services.iter().copied().chain([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        builder = builder.with_service_name(name);
    }
    builder
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            warn!(%err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = term => info!("SIGTERM received"),
    }
}

/// `<binary> healthcheck`: asks the service listening on `LISTEN_ADDR` (or
/// `default_port` on localhost) whether `service` is SERVING; exit code 0 if
/// so. For container healthchecks where no other gRPC client is at hand.
pub async fn healthcheck(service: &str, default_port: u16) -> std::process::ExitCode {
    let port = std::env::var("LISTEN_ADDR")
        .ok()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map_or(default_port, |a| a.port());
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        });
        request.set_timeout(Duration::from_secs(2));
        let reply = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(request)
            .await
            .ok()?;
        Some(reply.into_inner().status == ServingStatus::Serving as i32)
    };
    if check.await == Some(true) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Binds a listener, naming the address in the error.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}

async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    operator_routes: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render_metrics))
        .with_state(registry)
        .merge(operator_routes);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            drop(stop.wait_for(|stopped| *stopped).await);
        })
        .await;
    if let Err(err) = result {
        warn!(%err, "metrics server stopped");
    }
}

async fn render_metrics(axum::extract::State(registry): axum::extract::State<Registry>) -> (http::StatusCode, String) {
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        Ok(()) => (http::StatusCode::OK, String::from_utf8_lossy(&buffer).into_owned()),
        Err(err) => {
            warn!(%err, "encoding metrics");
            (http::StatusCode::INTERNAL_SERVER_ERROR, String::new())
        }
    }
}

/// Latency histogram buckets (seconds) shared by the server's and the peer
/// client's histograms: fine below a few milliseconds, so that the time one
/// hop adds (the caller's view minus the callee's) can be read from them.
pub const LATENCY_BUCKETS: [f64; 23] = [
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// RPC counts and latencies by method and gRPC status code.
#[derive(Clone)]
struct RpcMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl RpcMetrics {
    fn register(registry: &Registry) -> anyhow::Result<Arc<Self>> {
        let requests = IntCounterVec::new(
            Opts::new("grpc_server_handled_total", "RPCs completed, by method and gRPC code"),
            &["grpc_method", "grpc_code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("grpc_server_handling_seconds", "Time to answer an RPC, by method")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["grpc_method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Arc::new(Self { requests, latency }))
    }
}

/// Wraps each RPC in a span with its method and request id, scopes its
/// [`RequestContext`], echoes the request id, and records metrics.
/// gRPC's own implementations answer a request over the size limit with
/// RESOURCE_EXHAUSTED, the code clients treat as "too much, do not retry
/// as is"; tonic says OUT_OF_RANGE. Chirp's handlers never use OUT_OF_RANGE,
/// so the one that carries tonic's message is rewritten.
fn too_large_is_resource_exhausted(headers: &mut http::HeaderMap) {
    // grpc-message is percent-encoded (tonic encodes its spaces).
    let too_large = headers.get("grpc-status").is_some_and(|v| v.as_bytes() == b"11")
        && headers.get("grpc-message").is_some_and(|m| {
            m.to_str()
                .is_ok_and(|m| m.replace("%20", " ").starts_with(TOO_LARGE_PREFIX))
        });
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("the request is larger than this RPC accepts"),
        );
    }
}

/// The codes that mark a server span as failed, as OpenTelemetry's gRPC
/// conventions say: a caller's mistake (INVALID_ARGUMENT, NOT_FOUND…) is not
/// the server's failure.
fn server_fault(code: tonic::Code) -> bool {
    use tonic::Code as C;
    matches!(
        code,
        C::Unknown | C::DeadlineExceeded | C::Unimplemented | C::Internal | C::Unavailable | C::DataLoss
    )
}

#[derive(Clone)]
struct RpcLayer {
    metrics: Arc<RpcMetrics>,
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
struct RpcService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<http::Request<B>> for RpcService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let method = request.uri().path().to_owned();
        let context = RequestContext::from_headers(request.headers(), start);
        let request_id = context.request_id.clone();
        // The span every log line of the RPC carries; with traces on it is
        // also the server span, continuing the caller's trace. Health checks
        // and reflection (probes every second) are not traced.
        let span = if method.starts_with("/grpc.") || !crate::telemetry::exporting() {
            tracing::info_span!("rpc", method = %method, request_id = %request_id)
        } else {
            tracing::info_span!(
                target: "chirp::rpc",
                "rpc",
                method = %method,
                request_id = %request_id,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
                otel.name = method.strip_prefix('/').unwrap_or(&method),
                otel.kind = "server",
                otel.status_description = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.grpc.status_code = tracing::field::Empty,
            )
        };
        let mut context = context;
        context.sampled = crate::telemetry::continue_from_headers(&span, request.headers());
        let metrics = self.metrics.clone();
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            context
                .scope(async move {
                    let mut result = response.await;
                    let code = match &mut result {
                        Ok(response) => {
                            if let Ok(value) = http::HeaderValue::from_str(&request_id) {
                                response.headers_mut().insert(REQUEST_ID_HEADER, value);
                            }
                            too_large_is_resource_exhausted(response.headers_mut());
                            // Unary errors are sent trailers-only, so their code is
                            // in the headers; a code in the trailers is OK here.
                            response
                                .headers()
                                .get("grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<i32>().ok())
                                .unwrap_or(0)
                        }
                        Err(_) => tonic::Code::Unknown as i32,
                    };
                    let code = tonic::Code::from_i32(code);
                    // Unknown paths would make the label set unbounded.
                    let label = if code == tonic::Code::Unimplemented {
                        "unknown"
                    } else {
                        method.as_str()
                    };
                    let elapsed = start.elapsed();
                    metrics.requests.with_label_values(&[label, &format!("{code:?}")]).inc();
                    metrics
                        .latency
                        .with_label_values(&[label])
                        .observe(elapsed.as_secs_f64());
                    tracing::debug!(code = ?code, elapsed_us = elapsed.as_micros(), "rpc done");
                    if crate::context::sampled() == Some(true) {
                        let span = tracing::Span::current();
                        span.record("rpc.grpc.status_code", code as i32);
                        if server_fault(code) {
                            span.record("otel.status_description", format!("{code:?}"));
                        }
                    }
                    result
                })
                .instrument(span),
        )
    }
}
