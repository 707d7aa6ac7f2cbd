//! Helpers for tests that talk gRPC: requests with a token or a deadline,
//! the fields of an INVALID_ARGUMENT, and the behaviour of fake peers.
//!
//! A fake peer is a test's own implementation of a generated server trait;
//! each faked method starts with `behaviour.enter("Method").await?`, which
//! counts the call and then answers, fails or hangs as the test set it.

use std::{collections::HashMap, future::Future, net::SocketAddr, pin::Pin, sync::Mutex, time::Duration};

use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{transport::Channel, Request, Status};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// How a fake peer answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ok,
    /// UNAVAILABLE at once, like a peer whose store is down.
    Fail,
    /// No answer for 30 s, like a peer stuck on something.
    Hang,
}

/// Call counts and the current mode of a fake peer.
#[derive(Debug, Default)]
pub struct Behaviour {
    mode: Mutex<Option<Mode>>,
    calls: Mutex<HashMap<&'static str, u32>>,
}

impl Behaviour {
    /// # Panics
    /// When a test thread panicked while holding the lock.
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().expect("behaviour lock") = Some(mode);
    }

    /// # Panics
    /// When a test thread panicked while holding the lock.
    #[must_use]
    pub fn calls(&self, method: &str) -> u32 {
        self.calls
            .lock()
            .expect("behaviour lock")
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// # Panics
    /// When a test thread panicked while holding the lock.
    pub fn reset_calls(&self) {
        self.calls.lock().expect("behaviour lock").clear();
    }

    /// Counts a call of `method`, then behaves as set.
    ///
    /// # Errors
    /// UNAVAILABLE in [`Mode::Fail`] (and, after 30 s, in [`Mode::Hang`]).
    ///
    /// # Panics
    /// When a test thread panicked while holding the lock.
    pub async fn enter(&self, method: &'static str) -> Result<(), Status> {
        *self.calls.lock().expect("behaviour lock").entry(method).or_default() += 1;
        let mode = self.mode.lock().expect("behaviour lock").unwrap_or(Mode::Ok);
        match mode {
            Mode::Ok => Ok(()),
            Mode::Fail => Err(Status::unavailable("fake peer is down")),
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Err(Status::unavailable("fake peer woke up"))
            }
        }
    }
}

/// What a fake answers for methods the test does not fake.
#[must_use]
pub fn not_faked() -> Status {
    Status::failed_precondition("not part of this fake")
}

/// Serves one fake service on a free port of 127.0.0.1 for the rest of the
/// test; its address.
///
/// # Panics
/// When no port can be bound.
pub async fn serve_fake<S>(service: S) -> SocketAddr
where
    S: tonic::server::NamedService
        + tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a port");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

/// `message` with `authorization: Bearer <token>`.
///
/// # Panics
/// When the token is not a valid header value.
pub fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a valid header value"),
    );
    request
}

/// `message` as the holder of `token`, or with no token at all.
pub fn as_caller<T>(message: T, token: Option<&str>) -> Request<T> {
    match token {
        Some(token) => authed(message, token),
        None => Request::new(message),
    }
}

/// `message` with a `grpc-timeout`.
pub fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

/// The fields named in a status's `google.rpc.BadRequest` detail.
#[must_use]
pub fn violated_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The shutdown signal a spawned service's `run` is given.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A service's `run` future on a task of its own, with the way to stop it:
/// gracefully with [`Server::stop`], or at once when dropped.
pub struct Server {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Spawns `run(shutdown)`, e.g.
    /// `Server::spawn(|stop| user_service::run(config, listener, None, stop))`.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = rx.await;
        })));
        Self {
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Signals shutdown and returns what `run` returned.
    ///
    /// # Errors
    /// What `run` returned.
    ///
    /// # Panics
    /// When the service's task panicked.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("the service's task does not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `service`'s health on `channel`; `None` when it cannot be asked.
pub async fn health(channel: &Channel, service: &str) -> Option<ServingStatus> {
    let mut request = Request::new(HealthCheckRequest {
        service: service.into(),
    });
    request.set_timeout(Duration::from_secs(1));
    let reply = HealthClient::new(channel.clone()).check(request).await.ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

/// Waits up to 30 s until every one of `services` reports `status`.
///
/// # Panics
/// When they do not.
pub async fn wait_for(channel: &Channel, services: &[&str], status: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for service in services {
        while health(channel, service).await != Some(status) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{service} is not {status:?} after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
