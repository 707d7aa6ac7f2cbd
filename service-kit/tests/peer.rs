//! The client stack against a fake peer that misbehaves on purpose: it fails,
//! hangs, and records what each call carried.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use service_kit::{
    client::{BreakerConfig, BreakerState, Idempotency, Peer, PeerConfig},
    context::{parse_grpc_timeout, RequestContext},
};
use tokio::net::TcpListener;
use tonic::{transport::Server, Code, Request, Response, Status};
use tonic_health::pb::{
    health_client::HealthClient,
    health_server::{Health, HealthServer},
    HealthCheckRequest, HealthCheckResponse,
};

#[derive(Default)]
struct Fake {
    calls: AtomicU32,
    /// Calls answered UNAVAILABLE before the peer recovers.
    failures: AtomicU32,
    hang: Mutex<Option<Duration>>,
    timeouts: Mutex<Vec<Option<Duration>>>,
    request_ids: Mutex<Vec<String>>,
}

#[derive(Clone)]
struct FakePeer(Arc<Fake>);

#[tonic::async_trait]
impl Health for FakePeer {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let fake = &self.0;
        fake.calls.fetch_add(1, Ordering::SeqCst);
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        fake.timeouts.lock().unwrap().push(timeout);
        if let Some(id) = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()) {
            fake.request_ids.lock().unwrap().push(id.to_owned());
        }
        let hang = *fake.hang.lock().unwrap();
        if let Some(hang) = hang {
            tokio::time::sleep(hang).await;
        }
        if fake
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Status::unavailable("fake outage"));
        }
        Ok(Response::new(HealthCheckResponse { status: 1 }))
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::failed_precondition("not part of this fake"))
    }
}

async fn spawn_fake() -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = HealthServer::new(FakePeer(fake.clone()));
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (fake, url)
}

fn config(url: &str) -> PeerConfig {
    let mut config = PeerConfig::new("fake", url);
    config.call_timeout = Duration::from_millis(300);
    config.breaker = BreakerConfig {
        failure_threshold: 3,
        open_for: Duration::from_millis(300),
    };
    config
}

async fn check(peer: &Peer, idempotency: Idempotency) -> Result<HealthCheckResponse, Status> {
    peer.call(
        idempotency,
        HealthCheckRequest::default(),
        |channel, request| async move { HealthClient::new(channel).check(request).await },
    )
    .await
}

#[tokio::test]
async fn the_incoming_deadline_and_request_id_travel_to_the_peer() {
    let (fake, url) = spawn_fake().await;
    let peer = Peer::connect_lazy(config(&url)).unwrap();

    check(&peer, Idempotency::Idempotent).await.unwrap();
    let context = RequestContext {
        request_id: "req-42".into(),
        deadline: Some(Instant::now() + Duration::from_millis(100)),
        sampled: false,
    };
    context.scope(check(&peer, Idempotency::Idempotent)).await.unwrap();

    let timeouts = fake.timeouts.lock().unwrap().clone();
    assert!(
        timeouts[0].is_some_and(|t| t <= Duration::from_millis(300) && t > Duration::from_millis(200)),
        "{timeouts:?}"
    );
    assert!(
        timeouts[1].is_some_and(|t| t <= Duration::from_millis(100)),
        "cut to the caller's deadline: {timeouts:?}"
    );
    assert_eq!(*fake.request_ids.lock().unwrap(), ["req-42"]);
}

#[tokio::test]
async fn a_call_whose_caller_has_given_up_is_not_sent() {
    let (fake, url) = spawn_fake().await;
    let peer = Peer::connect_lazy(config(&url)).unwrap();
    let context = RequestContext {
        request_id: "late".into(),
        deadline: Some(Instant::now()),
        sampled: false,
    };
    let status = context.scope(check(&peer, Idempotency::Idempotent)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_hanging_peer_costs_the_deadline_and_no_more() {
    let (fake, url) = spawn_fake().await;
    *fake.hang.lock().unwrap() = Some(Duration::from_secs(10));
    let peer = Peer::connect_lazy(config(&url)).unwrap();
    let started = Instant::now();
    let status = check(&peer, Idempotency::Idempotent).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // Generous margin: the point is "bounded by the deadline", not speed.
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn idempotent_calls_are_retried_through_a_brief_outage() {
    let (fake, url) = spawn_fake().await;
    fake.failures.store(2, Ordering::SeqCst);
    let peer = Peer::connect_lazy(config(&url)).unwrap();
    check(&peer, Idempotency::Idempotent)
        .await
        .expect("the third attempt succeeds");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn calls_that_are_not_idempotent_are_never_retried() {
    let (fake, url) = spawn_fake().await;
    fake.failures.store(1, Ordering::SeqCst);
    let peer = Peer::connect_lazy(config(&url)).unwrap();
    let status = check(&peer, Idempotency::NotIdempotent).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_open_breaker_fails_fast_without_calling_then_recovers_through_a_probe() {
    let (fake, url) = spawn_fake().await;
    fake.failures.store(1_000, Ordering::SeqCst);
    let mut config = config(&url);
    config.max_retries = 0;
    let peer = Peer::connect_lazy(config).unwrap();
    for _ in 0..3 {
        assert_eq!(
            check(&peer, Idempotency::Idempotent).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert_eq!(peer.breaker_state(), BreakerState::Open);
    let calls = fake.calls.load(Ordering::SeqCst);
    let status = check(&peer, Idempotency::Idempotent).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("circuit open"), "{status:?}");
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        calls,
        "an open breaker sends nothing"
    );

    fake.failures.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(peer.breaker_state(), BreakerState::HalfOpen);
    check(&peer, Idempotency::Idempotent).await.expect("the probe succeeds");
    assert_eq!(peer.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn a_peer_that_is_not_running_gives_unavailable_within_the_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let peer = Peer::connect_lazy(config(&url)).unwrap();
    let started = Instant::now();
    let status = check(&peer, Idempotency::Idempotent).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
