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
use test_support::grpc::Server;
pub use test_support::grpc::{authed, violated_fields};
use test_support::sqlite::SqliteFile;
use tokio::net::TcpListener;
use tonic::{transport::Channel, Request};
use tonic_health::pb::health_check_response::ServingStatus;

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

    /// The PEM file holding the signer's public key.
    pub fn public_key_file(&self) -> std::path::PathBuf {
        self.key_dir.path().join("public.pem")
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
    /// The metrics port, with the operator routes.
    pub metrics_addr: std::net::SocketAddr,
    server: Server,
}

impl TestApp {
    pub async fn spawn(backing: &Backing) -> Self {
        Self::spawn_with(backing, &[]).await
    }

    pub async fn spawn_with(backing: &Backing, extra: &[&str]) -> Self {
        let mut args = vec![
            "analytics-service".to_owned(),
            format!("--database-url={}", backing.file.url()),
            format!("--ingest-token={INGEST_TOKEN}"),
            format!(
                "--jwt-public-key-file={}",
                backing.key_dir.path().join("public.pem").display()
            ),
            "--store-probe-interval=100ms".to_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let config = analytics_service::config::Config::try_parse_from(args).expect("a valid configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let server = Server::spawn(|stop| analytics_service::run(config, listener, Some(metrics), stop));
        let app = Self {
            channel: Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
            metrics_addr,
            server,
        };
        test_support::grpc::wait_for(&app.channel, &[SERVICE], ServingStatus::Serving).await;
        app
    }

    pub fn client(&self) -> AnalyticsServiceClient<Channel> {
        AnalyticsServiceClient::new(self.channel.clone())
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await
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
