//! A peer with replicas: message-service given two comment-service
//! addresses spreads its calls over both, takes a replica that dies out of
//! the balancer without its callers seeing more than the calls that were in
//! flight, puts it back when it returns, and sends nothing to a replica that
//! says NOT_SERVING (as one does while it starts or drains).

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use chirp_proto::{comment::v1::comment_service_server::CommentServiceServer, message::v1};
use common::{FakeComments, Options, TestApp};
use service_kit::auth::Role;

const OK: i32 = v1::PartStatus::Ok as i32;
/// GetMessage calls in flight at any time.
const CONCURRENCY: usize = 16;

/// A fake comment-service replica in a runtime of its own, so that killing
/// it drops its listener and every connection at once, like a crash.
struct Replica {
    fake: FakeComments,
    /// Its `grpc.health.v1`, which the caller's discovery asks.
    health: tonic_health::server::HealthReporter,
    addr: SocketAddr,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    fn start(addr: SocketAddr, fake: FakeComments) -> Self {
        let listener = std::net::TcpListener::bind(addr).expect("the replica's port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (kill, killed) = tokio::sync::oneshot::channel();
        let service = CommentServiceServer::new(fake.clone());
        let (health, health_service) = tonic_health::server::health_reporter();
        // Ready at once: a fake has no store to wait for.
        let ready = health.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                ready.set_serving::<CommentServiceServer<FakeComments>>().await;
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = tonic::transport::Server::builder()
                    .add_service(service)
                    .add_service(health_service)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
                tokio::select! {
                    _ = serve => {}
                    _ = killed => {}
                }
            });
            // Every connection task dies with the runtime.
            runtime.shutdown_background();
        });
        Self {
            fake,
            health,
            addr,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    fn calls(&self) -> u64 {
        u64::from(self.fake.behaviour.calls("CountComments") + self.fake.behaviour.calls("ListComments"))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GetMessage from `CONCURRENCY` callers until `stop`; counts the replies
/// whose comments part was not OK, and the errors.
fn load(
    app: &TestApp,
    messages: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let degraded = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let tasks = (0..CONCURRENCY)
        .map(|worker| {
            let (client, messages, stop) = (app.v1(), messages.clone(), stop.clone());
            let (degraded, ok) = (degraded.clone(), ok.clone());
            tokio::spawn(async move {
                let mut client = client;
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    let reply = client
                        .get_message(v1::GetMessageRequest {
                            message_id: messages[i % messages.len()].clone(),
                        })
                        .await;
                    let fine = reply.is_ok_and(|r| {
                        r.into_inner()
                            .message
                            .and_then(|m| m.comments)
                            .is_some_and(|c| c.status == OK)
                    });
                    if fine { &ok } else { &degraded }.fetch_add(1, Ordering::Relaxed);
                    i += CONCURRENCY;
                }
            })
        })
        .collect();
    (ok, degraded, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_two_replicas_and_a_dead_one_is_taken_out_and_put_back() {
    let mut a = Replica::start("127.0.0.1:0".parse().unwrap(), FakeComments::default());
    let b = Replica::start("127.0.0.1:0".parse().unwrap(), FakeComments::default());
    let app = TestApp::spawn_with(Options {
        comment_service_url: Some(format!("http://{},http://{}", a.addr, b.addr)),
        ..Options::default()
    })
    .await;
    let (_, token) = app.user("alice", Role::User);
    let mut messages = Vec::new();
    for i in 0..20 {
        messages.push(app.post(&token, &format!("message {i}")).await.id);
    }

    // Both replicas share the load.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, degraded, tasks) = load(&app, messages.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (at_a, at_b) = (a.calls(), b.calls());
    let share = at_a as f64 / (at_a + at_b).max(1) as f64;
    println!(
        "two replicas: {at_a} calls at A, {at_b} at B ({:.0} % at A)",
        share * 100.0
    );
    assert!((0.4..=0.6).contains(&share), "{at_a} at A, {at_b} at B");
    assert_eq!(degraded.load(Ordering::Relaxed), 0);

    // A dies under load: only what was in flight to it may degrade.
    let before = (ok.load(Ordering::Relaxed), degraded.load(Ordering::Relaxed));
    let killed_at = Instant::now();
    a.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_kill = (
        ok.load(Ordering::Relaxed) - before.0,
        degraded.load(Ordering::Relaxed) - before.1,
    );
    println!(
        "A killed under load: {} replies in the next 3 s, {} with comments unavailable ({CONCURRENCY} calls in flight)",
        after_kill.0 + after_kill.1,
        after_kill.1
    );
    assert!(after_kill.1 <= CONCURRENCY as u64, "{after_kill:?}");
    assert!(after_kill.0 > 100, "B served the load: {after_kill:?}");

    // A returns on its address and gets calls again.
    let a = Replica::start(a.addr, FakeComments::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.calls() == 0 {
        assert!(Instant::now() < deadline, "A was not put back within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("A back: its first call {:?} after the kill", killed_at.elapsed());

    // B says NOT_SERVING, as a replica does from the start of its shutdown
    // until it stops: within a discovery round it gets no more calls, and
    // none of the callers sees a failure.
    let before = degraded.load(Ordering::Relaxed);
    b.health.set_not_serving::<CommentServiceServer<FakeComments>>().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (b_then, a_then) = (b.calls(), a.calls());
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "B NOT_SERVING: {} calls to B and {} to A in the next 2 s",
        b.calls() - b_then,
        a.calls() - a_then
    );
    assert_eq!(b.calls(), b_then, "calls went to a replica that is NOT_SERVING");
    assert!(a.calls() - a_then > 100, "A served the load");
    assert_eq!(degraded.load(Ordering::Relaxed), before, "a caller saw the change");
    b.health.set_serving::<CommentServiceServer<FakeComments>>().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.calls() == b_then {
        assert!(Instant::now() < deadline, "B was not put back within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
}
