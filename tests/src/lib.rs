//! A whole Chirp mesh in one test process: each service on port 0 against
//! its own store, finding its peers through their URLs and its token keys
//! through user-service, as in a deployment. Services can be stopped and
//! started again on the same address, to play an outage.

use std::net::SocketAddr;

use chirp_proto::{
    analytics::v1::analytics_service_client::AnalyticsServiceClient,
    comment::v1::comment_service_client::CommentServiceClient,
    message::{
        v1::message_service_client::MessageServiceClient as MessageV1,
        v2::message_service_client::MessageServiceClient as MessageV2,
    },
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use clap::Parser as _;
use test_support::{
    grpc::{authed, Server},
    mongo::TestMongo,
    postgres::TestDatabase,
    process::StoreProcess,
    redis::KeyPrefix,
    sqlite::SqliteFile,
};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

pub const PASSWORD: &str = "correct horse battery";
pub const ADMIN: &str = "mesh_admin";
const INGEST_TOKEN: &str = "mesh-ingest-token";

/// A service of the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    User,
    Message,
    Comment,
    Analytics,
}

impl Service {
    pub const ALL: [Self; 4] = [Self::User, Self::Message, Self::Comment, Self::Analytics];

    #[must_use]
    pub fn grpc_name(self) -> &'static str {
        match self {
            Self::User => "chirp.user.v1.UserService",
            Self::Message => "chirp.message.v1.MessageService",
            Self::Comment => "chirp.comment.v1.CommentService",
            Self::Analytics => "chirp.analytics.v1.AnalyticsService",
        }
    }
}

pub struct Mesh {
    pub addrs: [SocketAddr; 4],
    /// comment-service's Redis, private so a test can stop it.
    pub comment_redis: StoreProcess,
    running: [Option<Server>; 4],
    database: TestDatabase,
    mongo: TestMongo,
    prefix: KeyPrefix,
    analytics_file: SqliteFile,
}

impl Mesh {
    /// The four services, each on its own store; returns once all four
    /// report SERVING.
    ///
    /// # Panics
    /// When a store or a service cannot start.
    pub async fn start() -> Self {
        let database = TestDatabase::create().await.expect("a PostgreSQL database");
        let mongo = TestMongo::create().expect("a MongoDB database");
        let comment_redis = StoreProcess::redis(true).expect("a private redis-server");
        let prefix = KeyPrefix::on(&comment_redis.url());
        let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); 4];
        let mut listeners = Vec::new();
        for addr in &mut addrs {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
            *addr = listener.local_addr().expect("an address");
            listeners.push(listener);
        }
        let mut mesh = Self {
            addrs,
            comment_redis,
            running: [None, None, None, None],
            database,
            mongo,
            prefix,
            analytics_file: SqliteFile::new(),
        };
        for (service, listener) in Service::ALL.into_iter().zip(listeners) {
            mesh.run(service, listener);
        }
        for service in Service::ALL {
            mesh.wait_for(service, ServingStatus::Serving).await;
        }
        mesh
    }

    #[must_use]
    pub fn addr(&self, service: Service) -> SocketAddr {
        self.addrs[service as usize]
    }

    fn url(&self, service: Service) -> String {
        format!("http://{}", self.addr(service))
    }

    fn run(&mut self, service: Service, listener: TcpListener) {
        let peers = [
            format!("--user-service-url={}", self.url(Service::User)),
            format!("--analytics-service-url={}", self.url(Service::Analytics)),
            format!("--ingest-token={INGEST_TOKEN}"),
            "--store-probe-interval=100ms".to_owned(),
        ];
        let server = match service {
            Service::User => {
                let mut args = vec![
                    "user-service".to_owned(),
                    format!("--database-url={}", self.database.url()),
                    "--password-hash-memory-kib=256".to_owned(),
                    // Scenarios log in far more often than a person.
                    "--auth-requests-per-address-per-minute=0".to_owned(),
                    "--login-attempts-per-username-per-minute=0".to_owned(),
                    format!("--admin-username={ADMIN}"),
                    format!("--admin-password={PASSWORD}"),
                    format!("--comment-service-url={}", self.url(Service::Comment)),
                    format!("--message-service-url={}", self.url(Service::Message)),
                ];
                args.extend(peers.into_iter().skip(1));
                let config = user_service::config::Config::try_parse_from(args).expect("user-service config");
                Server::spawn(|stop| user_service::run(config, listener, None, stop))
            }
            Service::Message => {
                let mut args = vec![
                    "message-service".to_owned(),
                    format!("--mongodb-uri={}", self.mongo.uri()),
                    format!("--mongodb-database={}", self.mongo.database()),
                    format!("--comment-service-url={}", self.url(Service::Comment)),
                ];
                args.extend(peers);
                let config = message_service::config::Config::try_parse_from(args).expect("message-service config");
                Server::spawn(|stop| message_service::run(config, listener, None, stop))
            }
            Service::Comment => {
                let mut args = vec![
                    "comment-service".to_owned(),
                    format!("--redis-url={}", self.prefix.url()),
                    format!("--redis-key-prefix={}", self.prefix.prefix()),
                    format!("--message-service-url={}", self.url(Service::Message)),
                ];
                args.extend(peers);
                let config = comment_service::config::Config::try_parse_from(args).expect("comment-service config");
                Server::spawn(|stop| comment_service::run(config, listener, None, stop))
            }
            Service::Analytics => {
                let args = vec![
                    "analytics-service".to_owned(),
                    format!("--database-url={}", self.analytics_file.url()),
                    peers[0].clone(),
                    peers[2].clone(),
                    peers[3].clone(),
                ];
                let config = analytics_service::config::Config::try_parse_from(args).expect("analytics-service config");
                Server::spawn(|stop| analytics_service::run(config, listener, None, stop))
            }
        };
        self.running[service as usize] = Some(server);
    }

    /// Stops a service gracefully; its store and address stay.
    ///
    /// # Panics
    /// When the service fails while stopping.
    pub async fn stop(&mut self, service: Service) {
        if let Some(server) = self.running[service as usize].take() {
            server.stop().await.expect("a clean stop");
        }
    }

    /// Starts a stopped service again on its address and waits until SERVING.
    ///
    /// # Panics
    /// When the address cannot be bound again.
    pub async fn restart(&mut self, service: Service) {
        let listener = TcpListener::bind(self.addr(service))
            .await
            .expect("the same address again");
        self.run(service, listener);
        self.wait_for(service, ServingStatus::Serving).await;
    }

    /// Waits up to 30 s for `service` to report `status`.
    ///
    /// # Panics
    /// When it does not.
    pub async fn wait_for(&self, service: Service, status: ServingStatus) {
        test_support::grpc::wait_for(&channel(self.addr(service)), &[service.grpc_name()], status).await;
    }

    /// The analytics SQLite file, to read what was recorded.
    #[must_use]
    pub fn analytics_url(&self) -> String {
        self.analytics_file.url()
    }

    /// user-service's PostgreSQL URL, to read what it holds.
    #[must_use]
    pub fn user_store(&self) -> &str {
        self.database.url()
    }

    /// message-service's MongoDB URI and database, to read what it holds.
    #[must_use]
    pub fn message_store(&self) -> (&str, &str) {
        (self.mongo.uri(), self.mongo.database())
    }

    /// comment-service's Redis URL and key prefix, to read what it holds.
    #[must_use]
    pub fn comment_store(&self) -> (&str, &str) {
        (self.prefix.url(), self.prefix.prefix())
    }

    #[must_use]
    pub fn ingest_token(&self) -> &'static str {
        INGEST_TOKEN
    }

    #[must_use]
    pub fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(channel(self.addr(Service::User)))
    }

    #[must_use]
    pub fn messages_v1(&self) -> MessageV1<Channel> {
        MessageV1::new(channel(self.addr(Service::Message)))
    }

    #[must_use]
    pub fn messages_v2(&self) -> MessageV2<Channel> {
        MessageV2::new(channel(self.addr(Service::Message)))
    }

    #[must_use]
    pub fn comments(&self) -> CommentServiceClient<Channel> {
        CommentServiceClient::new(channel(self.addr(Service::Comment)))
    }

    #[must_use]
    pub fn analytics(&self) -> AnalyticsServiceClient<Channel> {
        AnalyticsServiceClient::new(channel(self.addr(Service::Analytics)))
    }

    /// Registers `username` and logs in: their id and token.
    ///
    /// # Panics
    /// When user-service refuses.
    pub async fn user(&self, username: &str) -> (String, String) {
        let user = self
            .users()
            .register(upb::RegisterRequest {
                username: username.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
            })
            .await
            .expect("registration")
            .into_inner()
            .user
            .expect("a user");
        (user.id, self.login(username).await)
    }

    /// A fresh token for `username`.
    ///
    /// # Panics
    /// When user-service refuses.
    pub async fn login(&self, username: &str) -> String {
        self.users()
            .login(upb::LoginRequest {
                username: username.into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("login")
            .into_inner()
            .access_token
    }

    /// A moderator made by the configured admin: their id and token.
    ///
    /// # Panics
    /// When user-service refuses.
    pub async fn moderator(&self, username: &str) -> (String, String) {
        let (id, _) = self.user(username).await;
        let admin = self.login(ADMIN).await;
        self.users()
            .set_role(authed(
                upb::SetRoleRequest {
                    user_id: id.clone(),
                    role: upb::Role::Moderator.into(),
                },
                &admin,
            ))
            .await
            .expect("the admin makes a moderator");
        (id, self.login(username).await)
    }

    /// Follows `whom` as the holder of `token`.
    ///
    /// # Panics
    /// When user-service refuses.
    pub async fn follow(&self, token: &str, whom: &str) {
        self.users()
            .follow(authed(upb::FollowRequest { user_id: whom.into() }, token))
            .await
            .expect("follow");
    }
}

fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URL")
        .connect_lazy()
}
