//! spawn_app for analytics-service: the real service on port 0 against a
//! SQLite file of the test's own.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

use std::{path::Path, sync::Arc, time::Duration};

use chirp_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use clap::Parser as _;
use service_kit::{
    auth::{Caller, Role, TokenSigner},
    events::{Event, Payload},
};
pub use test_support::grpc::{authed, violated_fields};
use test_support::sqlite::SqliteFile;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{transport::Channel, Request};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

pub const SERVICE: &str = "chirp.analytics.v1.AnalyticsService";
pub const INGEST_TOKEN: &str = "test-ingest-token";

/// The file and keys, kept across restarts of the service.
pub struct Backing {
    pub file: SqliteFile,
    pub signer: Arc<TokenSigner>,
    key_dir: tempfile::TempDir,
}

impl Backing {
    pub fn new() -> Self {
        let signer = Arc::new(TokenSigner::generate(Duration::from_secs(3600)).unwrap());
        let key_dir = tempfile::tempdir().unwrap();
        std::fs::write(key_dir.path().join("public.pem"), signer.public_key_pem().unwrap()).unwrap();
        Self {
            file: SqliteFile::new(),
            signer,
            key_dir,
        }
    }

    pub fn token(&self, role: Role) -> String {
        let caller = Caller {
            user_id: uuid::Uuid::new_v4(),
            role,
        };
        self.signer.issue(caller, chrono::Utc::now().timestamp()).unwrap().0
    }
}

pub struct TestApp {
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(backing: &Backing) -> Self {
        let config = analytics_service::config::Config::try_parse_from([
            "analytics-service".to_owned(),
            format!("--database-url={}", backing.file.url()),
            format!("--ingest-token={INGEST_TOKEN}"),
            format!(
                "--jwt-public-key-file={}",
                backing.key_dir.path().join("public.pem").display()
            ),
            "--store-probe-interval=100ms".to_owned(),
        ])
        .expect("a valid configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(analytics_service::run(config, listener, None, async {
            let _ = rx.await;
        }));
        let app = Self {
            channel: Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
            shutdown: Some(tx),
            server: Some(server),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while app.health().await != Some(ServingStatus::Serving) {
            assert!(tokio::time::Instant::now() < deadline, "not SERVING within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app
    }

    pub fn client(&self) -> AnalyticsServiceClient<Channel> {
        AnalyticsServiceClient::new(self.channel.clone())
    }

    pub async fn health(&self) -> Option<ServingStatus> {
        let mut request = Request::new(HealthCheckRequest {
            service: SERVICE.into(),
        });
        request.set_timeout(Duration::from_secs(1));
        let reply = HealthClient::new(self.channel.clone()).check(request).await.ok()?;
        ServingStatus::try_from(reply.into_inner().status).ok()
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.server.take() {
            Some(server) => server.await.expect("no panic"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A RecordEvents request with the ingest token.
pub fn ingest(events: &[Event]) -> Request<chirp_proto::analytics::v1::RecordEventsRequest> {
    let mut request = Request::new(chirp_proto::analytics::v1::RecordEventsRequest {
        events: events.iter().map(Event::to_pb).collect(),
    });
    request
        .metadata_mut()
        .insert("x-chirp-ingest-token", INGEST_TOKEN.parse().unwrap());
    request
}

pub fn event(payload: Payload) -> Event {
    Event::new("test", payload)
}
