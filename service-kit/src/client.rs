//! The client stack for calling a peer service.
//!
//! One [`Peer`] per peer, built once and shared: it holds a single lazily
//! connected, multiplexed channel (HTTP/2 carries concurrent calls on one
//! connection, so a pool would only add sockets). A peer with replicas (a
//! host name that resolves to several addresses, as a Kubernetes headless
//! Service does, or several URLs separated by commas) gets one connection
//! per replica behind tower's power-of-two-choices balancer; a replica that
//! stops answering SERVING to a health check (it is starting, shutting down
//! or gone) is taken out and put back when it answers again
//! ([`discover`]). Around each call it adds:
//!
//! - a deadline: the per-call timeout, cut to what is left of the incoming
//!   request's deadline ([`crate::context`]), sent as `grpc-timeout` and
//!   enforced locally too, so a peer that hangs costs at most the deadline;
//! - the request id, so the peer's logs name the same request;
//! - retries of idempotent calls only, on UNAVAILABLE, with full-jitter
//!   exponential backoff, limited by a retry budget (tower's `TpsBudget`) so
//!   a struggling peer is not hit with a retry storm;
//! - a circuit breaker: after consecutive failures, calls fail fast for a
//!   cool-down, then one probe call decides whether to close it again;
//! - a concurrency limit: past it, calls fail fast rather than queue.
//!
//! The retry and breaker sit here, around typed calls, rather than as tower
//! layers on the channel: retrying needs the request again, and a typed
//! request is cheap to clone where a streamed HTTP body is not.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus::{IntGaugeVec, Opts, Registry};
use rand::Rng as _;
use tonic::{transport::Channel, Code, Status};
use tower::retry::budget::{Budget as _, TpsBudget};

use crate::context::{self, REQUEST_ID_HEADER};

/// `peer_circuit_state{peer}`: 0 closed, 1 half-open, 2 open, as of the
/// last call. One gauge for the process, shared by every [`Peer`].
fn circuit_gauge() -> &'static IntGaugeVec {
    static GAUGE: std::sync::OnceLock<IntGaugeVec> = std::sync::OnceLock::new();
    GAUGE.get_or_init(|| {
        IntGaugeVec::new(
            Opts::new(
                "peer_circuit_state",
                "Circuit breaker per peer: 0 closed, 1 half-open, 2 open",
            ),
            &["peer"],
        )
        .unwrap_or_else(|_| unreachable!("the metric's name and labels are valid"))
    })
}

/// `peer_call_seconds{peer}`: how long each attempt of a call to a peer
/// took as this service saw it (the peer's own `grpc_server_handling_seconds`
/// subtracted from it is what the hop costs).
fn attempt_histogram() -> &'static prometheus::HistogramVec {
    static HISTOGRAM: std::sync::OnceLock<prometheus::HistogramVec> = std::sync::OnceLock::new();
    HISTOGRAM.get_or_init(|| {
        prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("peer_call_seconds", "Time of one attempt of a call to a peer, by peer")
                .buckets(crate::server::LATENCY_BUCKETS.to_vec()),
            &["peer"],
        )
        .unwrap_or_else(|_| unreachable!("the metric's name, labels and buckets are valid"))
    })
}

/// Client-side RED metrics of calls sent to peers, by peer, method and
/// code (one count per attempt that went on the wire; calls the stack
/// refused itself are in `peer_calls_refused_total`).
struct ClientMetrics {
    handled: prometheus::IntCounterVec,
    seconds: prometheus::HistogramVec,
    refused: prometheus::IntCounterVec,
}

fn client_metrics() -> &'static ClientMetrics {
    static METRICS: std::sync::OnceLock<ClientMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| ClientMetrics {
        handled: prometheus::IntCounterVec::new(
            Opts::new(
                "grpc_client_handled_total",
                "Calls sent to peers (each attempt), by peer, method and gRPC code",
            ),
            &["peer", "grpc_method", "grpc_code"],
        )
        .unwrap_or_else(|_| unreachable!("the metric's name and labels are valid")),
        seconds: prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "grpc_client_handling_seconds",
                "Time of a call sent to a peer (each attempt), by peer and method",
            )
            .buckets(crate::server::LATENCY_BUCKETS.to_vec()),
            &["peer", "grpc_method"],
        )
        .unwrap_or_else(|_| unreachable!("the metric's name, labels and buckets are valid")),
        refused: prometheus::IntCounterVec::new(
            Opts::new(
                "peer_calls_refused_total",
                "Calls the client stack failed without sending, by peer and reason",
            ),
            &["peer", "reason"],
        )
        .unwrap_or_else(|_| unreachable!("the metric's name and labels are valid")),
    })
}

/// Adds the client stack's metrics to a service's registry.
///
/// # Errors
/// When they are registered already.
pub fn register_metrics(registry: &Registry) -> anyhow::Result<()> {
    registry.register(Box::new(circuit_gauge().clone()))?;
    registry.register(Box::new(attempt_histogram().clone()))?;
    let client = client_metrics();
    registry.register(Box::new(client.handled.clone()))?;
    registry.register(Box::new(client.seconds.clone()))?;
    registry.register(Box::new(client.refused.clone()))?;
    Ok(())
}

/// Whether a call may be sent twice with the same effect as once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotency {
    Idempotent,
    NotIdempotent,
}

/// Settings of one peer.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Name in logs and errors, e.g. `user-service`.
    pub name: &'static str,
    /// `http://host:port`, or several separated by commas (replicas).
    pub url: String,
    /// The `grpc.health.v1` service a replica must answer SERVING for to
    /// get calls: the peer's API (what a Kubernetes readiness probe asks),
    /// which a service reports NOT_SERVING until its store answers and from
    /// the start of its shutdown; `""` (the whole server) for a peer this kit
    /// does not know.
    pub health_service: &'static str,
    pub connect_timeout: Duration,
    /// Deadline of one call (all its attempts), unless the incoming request's
    /// deadline is sooner.
    pub call_timeout: Duration,
    /// Retries after the first attempt, for idempotent calls.
    pub max_retries: u32,
    /// First backoff; each retry doubles it, with full jitter.
    pub backoff_base: Duration,
    pub max_concurrency: usize,
    pub breaker: BreakerConfig,
}

impl PeerConfig {
    /// Defaults suited to calls between services on one network.
    #[must_use]
    pub fn new(name: &'static str, url: impl Into<String>) -> Self {
        Self {
            name,
            url: url.into(),
            health_service: api_service(name),
            connect_timeout: Duration::from_millis(500),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            max_retries: 2,
            backoff_base: Duration::from_millis(10),
            max_concurrency: 256,
            breaker: BreakerConfig::default(),
        }
    }
}

/// The API service of a Chirp service, by its name.
fn api_service(peer: &str) -> &'static str {
    use chirp_proto::{analytics, comment, message, user};
    match peer {
        "user-service" => user::v1::user_service_server::SERVICE_NAME,
        "message-service" => message::v1::message_service_server::SERVICE_NAME,
        "comment-service" => comment::v1::comment_service_server::SERVICE_NAME,
        "analytics-service" => analytics::v1::analytics_service_server::SERVICE_NAME,
        _ => "",
    }
}

/// Deadline of one call to a peer unless configured otherwise: a few hundred
/// milliseconds, far above a healthy peer's answer, far below a user's
/// patience.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(300);

/// A shared [`Peer`] at `url` with the default stack and `call_timeout`.
///
/// # Errors
/// When the URL is not a valid endpoint (the error names the peer).
pub fn peer(name: &'static str, url: &str, call_timeout: Duration) -> anyhow::Result<Arc<Peer>> {
    let mut config = PeerConfig::new(name, url);
    config.call_timeout = call_timeout;
    Peer::connect_lazy(config)
        .map(Arc::new)
        .map_err(|e| anyhow::anyhow!("{name} URL {url:?}: {e}"))
}

/// A peer service and the state of calls to it.
pub struct Peer {
    config: PeerConfig,
    channel: Channel,
    breaker: Mutex<Breaker>,
    budget: TpsBudget,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Wakes the replica discovery after a call found a replica gone, and
    /// tells when its round is done; `None` for a peer at one fixed address.
    rediscover: Option<Rediscover>,
    /// This peer's series of the process-wide metrics, looked up once rather
    /// than by label on every call.
    circuit: prometheus::IntGauge,
    attempt_seconds: prometheus::Histogram,
}

/// The caller's end of a peer's replica discovery.
struct Rediscover {
    wake: Arc<tokio::sync::Notify>,
    /// Counts finished discovery rounds.
    rounds: tokio::sync::watch::Receiver<u64>,
}

impl Rediscover {
    /// Asks for a discovery round now and waits (briefly) for it, so that a
    /// retry does not go to the replica that just failed.
    async fn now(&self) {
        let mut rounds = self.rounds.clone();
        rounds.mark_unchanged();
        self.wake.notify_one();
        let _ = tokio::time::timeout(Duration::from_millis(100), rounds.changed()).await;
    }
}

impl Peer {
    /// Builds the peer without connecting: the first call connects, so a
    /// service starts even while its peers are down. A peer with replicas
    /// needs a Tokio runtime (its discovery runs as a task).
    ///
    /// # Errors
    /// When a URL is not a valid endpoint.
    pub fn connect_lazy(config: PeerConfig) -> Result<Self, tonic::transport::Error> {
        let endpoint = |url: &str| -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
            Ok(configure(
                tonic::transport::Endpoint::from_shared(url.to_owned())?,
                config.connect_timeout,
            ))
        };
        let urls: Vec<&str> = config.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let mut targets = Vec::new();
        for url in &urls {
            let endpoint = endpoint(url)?;
            let uri = endpoint.uri();
            let scheme = uri.scheme_str().unwrap_or("http").to_owned();
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
            let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
            targets.push(Target { scheme, host, port });
        }
        let fixed = match targets.as_slice() {
            [one] => one.host.parse::<std::net::IpAddr>().is_ok(),
            _ => false,
        };
        let (channel, rediscover) = if fixed || tokio::runtime::Handle::try_current().is_err() {
            (
                endpoint(urls.first().copied().unwrap_or_default())?.connect_lazy(),
                None,
            )
        } else {
            let (channel, changes) = Channel::balance_channel(64);
            let wake = Arc::new(tokio::sync::Notify::new());
            let (done, rounds) = tokio::sync::watch::channel(0);
            tokio::spawn(discover(
                config.name,
                config.health_service,
                targets,
                config.connect_timeout,
                changes,
                wake.clone(),
                done,
            ));
            (channel, Some(Rediscover { wake, rounds }))
        };
        Ok(Self {
            breaker: Mutex::new(Breaker::new(config.breaker.clone())),
            // Retries may add at most 20% to the calls of the last 10 s, with
            // a floor of 5 retries a second so a quiet peer still gets some.
            budget: TpsBudget::new(Duration::from_secs(10), 5, 0.2),
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_concurrency)),
            circuit: circuit_gauge().with_label_values(&[config.name]),
            attempt_seconds: attempt_histogram().with_label_values(&[config.name]),
            config,
            channel,
            rediscover,
        })
    }

    #[must_use]
    pub fn name(&self) -> &'static str {
        self.config.name
    }

    /// The breaker's state, for status reports.
    #[must_use]
    pub fn breaker_state(&self) -> BreakerState {
        self.lock_breaker().state(Instant::now())
    }

    /// Counts a call the stack failed without sending, and says so in the
    /// caller's span (a trace shows the circuit open).
    fn refused(&self, reason: &'static str) {
        client_metrics()
            .refused
            .with_label_values(&[self.config.name, reason])
            .inc();
        tracing::debug!(target: "chirp::peer", peer = self.config.name, reason, "call refused by the client stack");
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes one call through the stack. `call` sends the request on the
    /// channel it is given, e.g.
    /// `|ch, req| async move { FooClient::new(ch).get_foo(req).await }`.
    ///
    /// # Errors
    /// The peer's status, or UNAVAILABLE / DEADLINE_EXCEEDED from the stack
    /// itself (breaker open, too many calls in flight, deadline spent).
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        idempotency: Idempotency,
        request: Req,
        mut call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: FnMut(PeerChannel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let start = Instant::now();
        let incoming = context::current();
        let Some(timeout) = context::outgoing_timeout(
            self.config.call_timeout,
            incoming.as_ref().and_then(|c| c.deadline),
            start,
        ) else {
            self.refused("no_time_left");
            return Err(Status::deadline_exceeded(format!(
                "no time left to call {}",
                self.config.name
            )));
        };
        let deadline = start + timeout;
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.refused("too_many_in_flight");
            return Err(Status::unavailable(format!(
                "too many calls in flight to {}",
                self.config.name
            )));
        };
        self.budget.deposit();

        let mut attempt = 0u32;
        loop {
            if !self.lock_breaker().try_acquire(Instant::now()) {
                self.refused("circuit_open");
                return Err(Status::unavailable(format!(
                    "{} is failing; circuit open",
                    self.config.name
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut outgoing = tonic::Request::new(request.clone());
            outgoing.set_timeout(left);
            if let Some(id) = incoming.as_ref().and_then(|c| c.request_id.parse().ok()) {
                outgoing.metadata_mut().insert(REQUEST_ID_HEADER, id);
            }
            let sent = Instant::now();
            let channel = PeerChannel {
                inner: self.channel.clone(),
                peer: self.config.name,
            };
            let result = match tokio::time::timeout(left, call(channel, outgoing)).await {
                Ok(result) => result.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "{} did not answer within {left:?}",
                    self.config.name
                ))),
            };
            self.attempt_seconds.observe(sent.elapsed().as_secs_f64());
            let failed = matches!(&result, Err(s) if counts_as_failure(s.code()));
            let state = {
                let mut breaker = self.lock_breaker();
                breaker.record(!failed, Instant::now());
                breaker.state(Instant::now())
            };
            self.circuit.set(match state {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            });
            let status = match result {
                Ok(response) => return Ok(response),
                Err(status) => status,
            };

            let retriable = idempotency == Idempotency::Idempotent && status.code() == Code::Unavailable;
            if !retriable || attempt >= self.config.max_retries {
                return Err(status);
            }
            let backoff = jittered_backoff(self.config.backoff_base, attempt);
            if Instant::now() + backoff >= deadline || !self.budget.withdraw() {
                return Err(status);
            }
            if let Some(rediscover) = &self.rediscover {
                // Perhaps a replica went away: look now, not at the next
                // round, so the retry finds it gone.
                rediscover.now().await;
            }
            // An event in the caller's span, so a trace shows the retry.
            tracing::debug!(
                target: "chirp::peer",
                peer = self.config.name,
                attempt = attempt + 1,
                backoff_ms = backoff.as_millis(),
                reason = status.message(),
                "retrying after UNAVAILABLE"
            );
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }
}

/// The channel a call to a peer goes out on: the peer's shared channel, plus
/// what each attempt needs on the wire and in telemetry. For each request it
/// records `grpc_client_handled_total` and `grpc_client_handling_seconds`
/// by method and code, and, while traces are exported, opens a client span
/// named after the method and writes its context as `traceparent`, so the
/// peer's server span continues this trace.
#[derive(Clone)]
pub struct PeerChannel {
    inner: Channel,
    peer: &'static str,
}

impl PeerChannel {
    /// `channel` to the service named `peer`, with this stack's telemetry
    /// but none of [`Peer`]'s deadline, retry or breaker: for tools (the
    /// chirp CLI) that call a service once and report what happened.
    #[must_use]
    pub fn new(channel: Channel, peer: &'static str) -> Self {
        Self { inner: channel, peer }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for PeerChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        use tracing::Instrument as _;

        let path = request.uri().path();
        let method = path.strip_prefix('/').unwrap_or(path).to_owned();
        let span = if crate::telemetry::tracing_here() {
            let (service, rpc) = method.split_once('/').unwrap_or((method.as_str(), ""));
            let span = tracing::info_span!(
                target: "chirp::peer",
                "grpc call",
                otel.name = %method,
                otel.kind = "client",
                otel.status_description = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = rpc,
                peer.service = self.peer,
                rpc.grpc.status_code = tracing::field::Empty,
            );
            crate::telemetry::inject(&span, request.headers_mut());
            span
        } else {
            tracing::Span::none()
        };
        let mut outcome = CallOutcome {
            peer: self.peer,
            method,
            start: Instant::now(),
            code: None,
            message: None,
            span: span.clone(),
        };
        let response = self.inner.call(request);
        Box::pin(
            async move {
                let result = response.await;
                match &result {
                    // Unary errors come trailers-only, so their code is in
                    // the headers; a code in the trailers is OK here.
                    Ok(response) => {
                        let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok());
                        let code = header("grpc-status")
                            .and_then(|v| v.parse::<i32>().ok())
                            .map_or(Code::Ok, Code::from_i32);
                        outcome.finish(code, header("grpc-message").map(|m| m.replace("%20", " ")));
                    }
                    Err(_) => outcome.finish(Code::Unavailable, None),
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Records one attempt when it ends: answered, failed, or dropped by the
/// caller's deadline (counted DEADLINE_EXCEEDED).
struct CallOutcome {
    peer: &'static str,
    method: String,
    start: Instant,
    code: Option<Code>,
    message: Option<String>,
    span: tracing::Span,
}

impl CallOutcome {
    fn finish(&mut self, code: Code, message: Option<String>) {
        self.code = Some(code);
        self.message = message;
    }
}

impl Drop for CallOutcome {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::DeadlineExceeded);
        let metrics = client_metrics();
        metrics
            .handled
            .with_label_values(&[self.peer, &self.method, &format!("{code:?}")])
            .inc();
        metrics
            .seconds
            .with_label_values(&[self.peer, &self.method])
            .observe(self.start.elapsed().as_secs_f64());
        if !self.span.is_none() {
            self.span.record("rpc.grpc.status_code", code as i32);
            if code != Code::Ok {
                let message = self.message.take().unwrap_or_else(|| format!("{code:?}"));
                self.span.record("otel.status_description", message);
            }
        }
    }
}

/// The settings every connection to a peer gets.
fn configure(endpoint: tonic::transport::Endpoint, connect_timeout: Duration) -> tonic::transport::Endpoint {
    endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
}

/// One configured peer address: its host may stand for several replicas.
struct Target {
    scheme: String,
    host: String,
    port: u16,
}

/// How often the replicas of a peer are looked up and probed.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps a balanced channel's replicas current: every
/// [`DISCOVERY_INTERVAL`] (or at once when a call failed) it resolves each
/// target's host, asks every address's `grpc.health.v1` for the peer's API
/// ([`PeerConfig::health_service`]), and puts in the balancer exactly those
/// that answer SERVING. A TCP connection alone would not do: a replica
/// accepts connections before it can serve (its listener is bound while it
/// connects to its store) and after it stops serving (while it drains), and
/// calls sent to it then fail. [`choose`] says what stays in when a check
/// is slow or none answers. Stops when the channel is dropped.
async fn discover(
    name: &'static str,
    health_service: &'static str,
    targets: Vec<Target>,
    connect_timeout: Duration,
    changes: tokio::sync::mpsc::Sender<
        tonic::transport::channel::Change<std::net::SocketAddr, tonic::transport::Endpoint>,
    >,
    wake: Arc<tokio::sync::Notify>,
    done: tokio::sync::watch::Sender<u64>,
) {
    use std::net::SocketAddr;

    use tonic::transport::channel::Change;

    let mut current: HashSet<SocketAddr> = HashSet::new();
    // One lazily connected channel per address, reused round after round,
    // so a probe costs one small call rather than a connection.
    let mut probes: HashMap<SocketAddr, Channel> = HashMap::new();
    let mut silent: HashMap<SocketAddr, u32> = HashMap::new();
    loop {
        // Each address with the scheme of the URL it came from.
        let mut all: HashMap<SocketAddr, &str> = HashMap::new();
        for target in &targets {
            if let Ok(addrs) = tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                all.extend(addrs.map(|addr| (addr, target.scheme.as_str())));
            }
        }
        probes.retain(|addr, _| all.contains_key(addr));
        for (addr, scheme) in &all {
            if !probes.contains_key(addr) {
                if let Ok(uri) = format!("{scheme}://{addr}").parse::<http::Uri>() {
                    let endpoint = configure(tonic::transport::Endpoint::from(uri), PROBE_TIMEOUT);
                    probes.insert(*addr, endpoint.connect_lazy());
                }
            }
        }
        let checks = probes
            .iter()
            .map(|(addr, channel)| async move { (*addr, probe(channel.clone(), health_service).await) });
        let found: HashMap<SocketAddr, Probe> = futures::future::join_all(checks)
            .await
            .into_iter()
            .map(|(addr, answer)| {
                let rounds = silent.entry(addr).or_default();
                *rounds = if answer.is_none() { *rounds + 1 } else { 0 };
                let probe = match answer {
                    Some(true) => Probe::Serving,
                    Some(false) => Probe::NotServing,
                    None => Probe::Silent(*rounds),
                };
                (addr, probe)
            })
            .collect();
        silent.retain(|addr, _| found.contains_key(addr));
        let wanted = choose(&current, &found);
        for gone in current.difference(&wanted) {
            tracing::info!(peer = name, replica = %gone, "replica out of the balancer");
            if changes.send(Change::Remove(*gone)).await.is_err() {
                return;
            }
        }
        for new in wanted.difference(&current) {
            let scheme = all.get(new).copied().unwrap_or("http");
            let Ok(endpoint) = format!("{scheme}://{new}").parse::<http::Uri>() else {
                continue;
            };
            tracing::info!(peer = name, replica = %new, "replica in the balancer");
            let endpoint = configure(tonic::transport::Endpoint::from(endpoint), connect_timeout);
            if changes.send(Change::Insert(*new, endpoint)).await.is_err() {
                return;
            }
        }
        current = wanted;
        done.send_modify(|rounds| *rounds += 1);
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(DISCOVERY_INTERVAL) => {}
            () = changes.closed() => return,
        }
    }
}

/// Longest a replica may take to answer a health check before it counts as
/// not serving.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Rounds a replica in the balancer may leave a health check unanswered
/// (busy, say) before it is taken out.
const SILENT_ROUNDS: u32 = 2;

/// What one health check of a replica found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Serving,
    /// An answer other than SERVING, or a connection refused: a replica
    /// starting, without its store, draining, or gone.
    NotServing,
    /// No answer within [`PROBE_TIMEOUT`], for this many rounds in a row.
    Silent(u32),
}

/// The replicas to balance over after a round: those that answer SERVING,
/// and those already in that have been silent for less than
/// [`SILENT_ROUNDS`]. When that leaves none, the balancer keeps what it has
/// less those that refused (or all it has, or at first every address), so
/// calls fail fast rather than wait for a replica to appear, and rounds in
/// which every check was slow (a busy machine) do not put back a replica
/// known to be gone.
fn choose<A: Copy + Eq + std::hash::Hash>(current: &HashSet<A>, found: &HashMap<A, Probe>) -> HashSet<A> {
    let wanted: HashSet<A> = found
        .iter()
        .filter(|(addr, probe)| match probe {
            Probe::Serving => true,
            Probe::Silent(rounds) => current.contains(*addr) && *rounds < SILENT_ROUNDS,
            Probe::NotServing => false,
        })
        .map(|(addr, _)| *addr)
        .collect();
    if !wanted.is_empty() {
        return wanted;
    }
    if current.is_empty() {
        return found.keys().copied().collect();
    }
    let not_refused: HashSet<A> = current
        .iter()
        .filter(|addr| found.get(*addr) != Some(&Probe::NotServing))
        .copied()
        .collect();
    if not_refused.is_empty() {
        current.clone()
    } else {
        not_refused
    }
}

/// Asks the server behind `channel` whether it is SERVING `service`;
/// `None` when it does not answer within [`PROBE_TIMEOUT`].
async fn probe(channel: Channel, service: &str) -> Option<bool> {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    request.set_timeout(PROBE_TIMEOUT);
    let mut client = HealthClient::new(channel);
    match tokio::time::timeout(PROBE_TIMEOUT, client.check(request)).await {
        Ok(Ok(reply)) => Some(reply.get_ref().status == ServingStatus::Serving as i32),
        Ok(Err(status)) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => None,
        Err(_) => None,
        Ok(Err(_)) => Some(false),
    }
}

/// Codes that say the peer, not the request, is at fault.
fn counts_as_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::ResourceExhausted
    )
}

/// Full jitter: uniformly random in `[0, base * 2^attempt]`, so clients that
/// failed together do not retry together.
fn jittered_backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(10));
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
}

/// When a breaker opens and how long it stays open.
#[derive(Clone, Debug)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker fails calls before letting a probe through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(2),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// A consecutive-failure circuit breaker. Time is passed in, so tests drive it
/// without sleeping.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    consecutive_failures: u32,
    /// Set while open: when a probe may go through.
    open_until: Option<Instant>,
    /// Set while a half-open probe is out: when it was sent.
    probe_sent: Option<Instant>,
}

impl Breaker {
    #[must_use]
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            consecutive_failures: 0,
            open_until: None,
            probe_sent: None,
        }
    }

    #[must_use]
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a call may go out now. In half-open, one probe at a time; a
    /// probe that never reports back (its caller gave up) is replaced after
    /// another `open_for`.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                let stale = self
                    .probe_sent
                    .is_none_or(|sent| now.saturating_duration_since(sent) >= self.config.open_for);
                if stale {
                    self.probe_sent = Some(now);
                }
                stale
            }
        }
    }

    /// Records a call's outcome.
    pub fn record(&mut self, success: bool, now: Instant) {
        if success {
            self.consecutive_failures = 0;
            self.open_until = None;
            self.probe_sent = None;
            return;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let half_open_probe_failed = self.open_until.is_some();
        if half_open_probe_failed || self.consecutive_failures >= self.config.failure_threshold {
            self.open_until = Some(now + self.config.open_for);
            self.probe_sent = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_keeps_the_serving_replicas_and_a_briefly_silent_one_it_has() {
        let current: HashSet<u8> = [1, 2, 3].into();
        let found: HashMap<u8, Probe> = [
            (1, Probe::Serving),
            (2, Probe::Silent(1)),
            (3, Probe::NotServing),
            (4, Probe::Silent(1)),
        ]
        .into();
        assert_eq!(choose(&current, &found), [1, 2].into());
        let found: HashMap<u8, Probe> = [(1, Probe::Serving), (2, Probe::Silent(SILENT_ROUNDS))].into();
        assert_eq!(choose(&current, &found), [1].into());
    }

    #[test]
    fn discovery_with_no_replica_serving_keeps_what_it_has_or_takes_every_address_at_first() {
        let found: HashMap<u8, Probe> = [(1, Probe::NotServing), (2, Probe::Silent(5))].into();
        assert_eq!(choose(&[1, 2].into(), &found), [2].into());
        assert_eq!(choose(&[1].into(), &found), [1].into());
        assert_eq!(choose(&HashSet::new(), &found), [1, 2].into());
    }

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
        })
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_only() {
        let now = Instant::now();
        let mut b = breaker();
        b.record(false, now);
        b.record(false, now);
        b.record(true, now);
        b.record(false, now);
        b.record(false, now);
        assert_eq!(b.state(now), BreakerState::Closed, "a success resets the count");
        b.record(false, now);
        assert_eq!(b.state(now), BreakerState::Open);
        assert!(!b.try_acquire(now + Duration::from_millis(999)));
    }

    #[test]
    fn a_half_open_breaker_lets_one_probe_through_and_closes_on_its_success() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(false, now);
        }
        let later = now + Duration::from_secs(1);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.try_acquire(later), "the probe");
        assert!(!b.try_acquire(later), "only one probe at a time");
        b.record(true, later);
        assert_eq!(b.state(later), BreakerState::Closed);
        assert!(b.try_acquire(later));
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_again() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(false, now);
        }
        let later = now + Duration::from_secs(1);
        assert!(b.try_acquire(later));
        b.record(false, later);
        assert_eq!(b.state(later), BreakerState::Open);
        assert_eq!(b.state(later + Duration::from_secs(1)), BreakerState::HalfOpen);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_cool_down() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(false, now);
        }
        let later = now + Duration::from_secs(1);
        assert!(b.try_acquire(later));
        assert!(!b.try_acquire(later + Duration::from_millis(500)));
        assert!(b.try_acquire(later + Duration::from_secs(1)));
    }

    #[test]
    fn backoff_stays_within_its_jittered_ceiling() {
        let base = Duration::from_millis(10);
        for attempt in 0..5 {
            let ceiling = base * (1 << attempt);
            for _ in 0..50 {
                assert!(jittered_backoff(base, attempt) <= ceiling);
            }
        }
    }

    #[test]
    fn the_retry_budget_runs_out_without_fresh_requests() {
        // The same budget Peer uses: min 5 retries/s, 20% of requests.
        let budget = TpsBudget::new(Duration::from_secs(10), 5, 0.2);
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
            assert!(granted < 1000, "the budget never ran out");
        }
        assert!(granted >= 5, "the floor grants some retries: {granted}");
        for _ in 0..100 {
            budget.deposit();
        }
        assert!(budget.withdraw(), "requests refill it");
    }
}
