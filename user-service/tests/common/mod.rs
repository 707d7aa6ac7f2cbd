//! spawn_app for user-service: the real service on port 0, against a database
//! of the test's own.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use chirp_proto::user::v1::{self as pb, user_service_client::UserServiceClient};
use clap::Parser as _;
use service_kit::auth::TokenSigner;
use test_support::grpc::Server;
use test_support::postgres::TestDatabase;
use tokio::net::TcpListener;
use tonic::{transport::Channel, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::config::Config;

pub use test_support::grpc::{authed, violated_fields};

pub const SERVICE: &str = "chirp.user.v1.UserService";
pub const ADMIN: &str = "chirp_admin";
pub const ADMIN_PASSWORD: &str = "admin-password-1";
pub const PASSWORD: &str = "correct horse battery";

pub struct TestApp {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub channel: Channel,
    pub database_url: String,
    /// Signs tokens with the service's own key, for tokens Login would never
    /// issue (expired ones).
    pub signer: TokenSigner,
    server: Server,
    _key_dir: tempfile::TempDir,
    _database: Option<TestDatabase>,
}

impl TestApp {
    /// On the shared PostgreSQL, in a fresh database; waits until SERVING.
    pub async fn spawn() -> Self {
        Self::spawn_on_fresh(&[]).await
    }

    /// On a fresh database, with extra flags; returns once SERVING.
    pub async fn spawn_on_fresh(extra_args: &[&str]) -> Self {
        let database = TestDatabase::create().await.expect("creating a test database");
        let url = database.url().to_owned();
        let app = Self::spawn_on(&url, Some(database), extra_args).await;
        app.wait_for(ServingStatus::Serving).await;
        app
    }

    /// On any database URL; does not wait for the store.
    pub async fn spawn_on(database_url: &str, database: Option<TestDatabase>, extra_args: &[&str]) -> Self {
        let key_dir = tempfile::tempdir().expect("a temporary directory");
        let key_file: PathBuf = key_dir.path().join("signing.pem");
        std::fs::write(&key_file, TokenSigner::generate_pem().expect("a key")).expect("writing the key");
        let signer = TokenSigner::from_pem_file(&key_file, Duration::from_secs(3600)).expect("reading the key");

        let mut args = vec![
            "user-service".to_owned(),
            format!("--database-url={database_url}"),
            format!("--jwt-signing-key-file={}", key_file.display()),
            format!("--admin-username={ADMIN}"),
            format!("--admin-password={ADMIN_PASSWORD}"),
            "--store-probe-interval=100ms".to_owned(),
            // No peers in these tests: deliveries stay in the outbox (port 1
            // refuses at once), where tests can read them.
            "--analytics-service-url=http://127.0.0.1:1".to_owned(),
            "--comment-service-url=http://127.0.0.1:1".to_owned(),
            "--message-service-url=http://127.0.0.1:1".to_owned(),
        ];
        // Cheap hashes (tests hash hundreds of passwords), and no login
        // limits (tests log in far more often than a person), unless a test
        // sets what it exercises.
        for (flag, value) in [
            ("--password-hash-memory-kib", "256"),
            ("--auth-requests-per-address-per-minute", "0"),
            ("--login-attempts-per-username-per-minute", "0"),
        ] {
            if !extra_args.iter().any(|a| a.starts_with(flag)) {
                args.push(format!("{flag}={value}"));
            }
        }
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let config = Config::try_parse_from(args).expect("valid test configuration");

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a port");
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("binding a port");
        let addr = listener.local_addr().expect("an address");
        let metrics_addr = metrics.local_addr().expect("an address");
        let server = Server::spawn(|stop| user_service::run(config, listener, Some(metrics), stop));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a valid URL")
            .connect_lazy();
        Self {
            addr,
            metrics_addr,
            channel,
            database_url: database_url.to_owned(),
            signer,
            server,
            _key_dir: key_dir,
            _database: database,
        }
    }

    pub fn client(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.channel.clone())
    }

    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        test_support::grpc::health(&self.channel, service).await
    }

    /// Waits (up to 30 s) until the API's health is `status`.
    pub async fn wait_for(&self, status: ServingStatus) {
        test_support::grpc::wait_for(&self.channel, &[SERVICE], status).await;
    }

    /// Stops the service gracefully and returns what `run` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await
    }

    pub async fn register(&self, username: &str) -> pb::User {
        self.client()
            .register(pb::RegisterRequest {
                username: username.to_owned(),
                password: PASSWORD.to_owned(),
                display_name: String::new(),
            })
            .await
            .expect("registration succeeds")
            .into_inner()
            .user
            .expect("a user in the reply")
    }

    pub async fn login_as(&self, username: &str, password: &str) -> String {
        self.client()
            .login(pb::LoginRequest {
                username: username.to_owned(),
                password: password.to_owned(),
            })
            .await
            .expect("login succeeds")
            .into_inner()
            .access_token
    }

    /// Registers `username` and logs in: the user and a token.
    pub async fn user(&self, username: &str) -> (pb::User, String) {
        let user = self.register(username).await;
        let token = self.login_as(username, PASSWORD).await;
        (user, token)
    }

    pub async fn admin_token(&self) -> String {
        self.login_as(ADMIN, ADMIN_PASSWORD).await
    }

    /// A moderator made by the admin: the user and a fresh token with the role.
    pub async fn moderator(&self, username: &str) -> (pb::User, String) {
        let user = self.register(username).await;
        let admin = self.admin_token().await;
        self.client()
            .set_role(authed(
                pb::SetRoleRequest {
                    user_id: user.id.clone(),
                    role: pb::Role::Moderator.into(),
                },
                &admin,
            ))
            .await
            .expect("the admin can make a moderator");
        let token = self.login_as(username, PASSWORD).await;
        (user, token)
    }

    pub async fn user_count(&self) -> i64 {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.database_url)
            .await
            .expect("connecting to the test database");
        sqlx::query_scalar("SELECT count(*) FROM users")
            .fetch_one(&mut conn)
            .await
            .expect("counting users")
    }

    /// Outbox rows per destination, and the event types waiting there.
    pub async fn outbox(&self) -> Vec<(String, String)> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.database_url)
            .await
            .expect("connecting");
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT destination, event FROM outbox ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .expect("reading the outbox");
        rows.into_iter()
            .map(|(destination, event)| {
                let event = service_kit::events::Event::from_json(&event).expect("an event");
                let kind = serde_json::to_value(&event.payload).expect("json")["type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                (destination, kind)
            })
            .collect()
    }

    pub async fn metrics(&self) -> String {
        metrics_at(self.metrics_addr).await
    }
}

/// What `/metrics` at `addr` says.
pub async fn metrics_at(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("sending a request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("reading the reply");
    body
}
