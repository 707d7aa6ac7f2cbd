//! A whole Chirp mesh in one test process: each service on port 0 against
//! its own store, finding its peers through their URLs and its token keys
//! through user-service, as in a deployment.

use std::{net::SocketAddr, time::Duration};

use chirp_proto::{
    comment::v1::comment_service_client::CommentServiceClient,
    message::{
        v1::message_service_client::MessageServiceClient as MessageV1,
        v2::message_service_client::MessageServiceClient as MessageV2,
    },
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use clap::Parser as _;
use test_support::{grpc::authed, mongo::TestMongo, postgres::TestDatabase, process::StoreProcess, redis::KeyPrefix};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

pub const PASSWORD: &str = "correct horse battery";

/// A running service and the way to stop it.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn spawn<F>(run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    Running {
        stop: Some(tx),
        task: tokio::spawn(run(rx)),
    }
}

pub struct Mesh {
    pub user_addr: SocketAddr,
    pub message_addr: SocketAddr,
    pub comment_addr: SocketAddr,
    /// comment-service's Redis, private so a test can stop it.
    pub comment_redis: StoreProcess,
    _services: Vec<Running>,
    _database: TestDatabase,
    _mongo: TestMongo,
    _prefix: KeyPrefix,
}

impl Mesh {
    /// user-, message- and comment-service, each on its own store; returns
    /// once all three report SERVING.
    ///
    /// # Panics
    /// When a store or a service cannot start.
    pub async fn start() -> Self {
        let database = TestDatabase::create().await.expect("a PostgreSQL database");
        let mongo = TestMongo::create().expect("a MongoDB database");
        let comment_redis = StoreProcess::redis(true).expect("a private redis-server");
        let prefix = KeyPrefix::on(&comment_redis.url());

        let user_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let message_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let comment_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let user_addr = user_listener.local_addr().unwrap();
        let message_addr = message_listener.local_addr().unwrap();
        let comment_addr = comment_listener.local_addr().unwrap();
        let user_url = format!("http://{user_addr}");

        let user_config = user_service::config::Config::try_parse_from([
            "user-service".to_owned(),
            format!("--database-url={}", database.url()),
            "--password-hash-memory-kib=256".to_owned(),
            "--store-probe-interval=100ms".to_owned(),
            "--admin-username=mesh_admin".to_owned(),
            format!("--admin-password={PASSWORD}"),
        ])
        .unwrap();
        let message_config = message_service::config::Config::try_parse_from([
            "message-service".to_owned(),
            format!("--mongodb-uri={}", mongo.uri()),
            format!("--mongodb-database={}", mongo.database()),
            format!("--user-service-url={user_url}"),
            format!("--comment-service-url=http://{comment_addr}"),
            "--store-probe-interval=100ms".to_owned(),
        ])
        .unwrap();
        let comment_config = comment_service::config::Config::try_parse_from([
            "comment-service".to_owned(),
            format!("--redis-url={}", prefix.url()),
            format!("--redis-key-prefix={}", prefix.prefix()),
            format!("--user-service-url={user_url}"),
            format!("--message-service-url=http://{message_addr}"),
            "--store-probe-interval=100ms".to_owned(),
        ])
        .unwrap();

        let services = vec![
            spawn(|stop| user_service::run(user_config, user_listener, None, async { drop(stop.await) })),
            spawn(|stop| message_service::run(message_config, message_listener, None, async { drop(stop.await) })),
            spawn(|stop| comment_service::run(comment_config, comment_listener, None, async { drop(stop.await) })),
        ];
        let mesh = Self {
            user_addr,
            message_addr,
            comment_addr,
            comment_redis,
            _services: services,
            _database: database,
            _mongo: mongo,
            _prefix: prefix,
        };
        for (addr, service) in [
            (user_addr, "chirp.user.v1.UserService"),
            (message_addr, "chirp.message.v1.MessageService"),
            (comment_addr, "chirp.comment.v1.CommentService"),
        ] {
            wait_for(addr, service, ServingStatus::Serving).await;
        }
        mesh
    }

    #[must_use]
    pub fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(channel(self.user_addr))
    }

    #[must_use]
    pub fn messages_v1(&self) -> MessageV1<Channel> {
        MessageV1::new(channel(self.message_addr))
    }

    #[must_use]
    pub fn messages_v2(&self) -> MessageV2<Channel> {
        MessageV2::new(channel(self.message_addr))
    }

    #[must_use]
    pub fn comments(&self) -> CommentServiceClient<Channel> {
        CommentServiceClient::new(channel(self.comment_addr))
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
        let token = self
            .users()
            .login(upb::LoginRequest {
                username: username.into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("login")
            .into_inner()
            .access_token;
        (user.id, token)
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

/// Health of `service` at `addr`, `None` if it cannot be asked.
pub async fn health(addr: SocketAddr, service: &str) -> Option<ServingStatus> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.into(),
    });
    request.set_timeout(Duration::from_secs(1));
    let reply = HealthClient::new(channel(addr)).check(request).await.ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

/// Waits up to 30 s for `service` at `addr` to report `status`.
///
/// # Panics
/// When it does not.
pub async fn wait_for(addr: SocketAddr, service: &str, status: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while health(addr, service).await != Some(status) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} at {addr} is not {status:?} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
