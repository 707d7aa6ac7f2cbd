//! spawn_app for comment-service: the real service on port 0 against Redis
//! (a key prefix of the test's own on the shared server, or a private
//! server; on a Redis Cluster instead with `CHIRP_TEST_REDIS=cluster`), with
//! a fake message-service that counts its calls and can be told to fail or
//! hang.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use chirp_proto::{
    comment::v1::{self as pb, comment_service_client::CommentServiceClient},
    message::v1::{self as mpb, message_service_server::MessageServiceServer},
    user::v1::{self as upb, user_service_server::UserServiceServer},
};
use clap::Parser as _;
use comment_service::config::Config;
use service_kit::auth::{Caller, Role, TokenSigner};
use test_support::grpc::Server;
pub use test_support::grpc::{authed, violated_fields, with_deadline, Mode};
use test_support::{
    grpc::{not_faked, serve_fake, Behaviour},
    process::StoreProcess,
    redis::{KeyPrefix, Target},
    redis_cluster::RedisCluster,
};
use tokio::net::TcpListener;
use tonic::{transport::Channel, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

pub const SERVICE: &str = "chirp.comment.v1.CommentService";
pub const PEER_TIMEOUT: Duration = Duration::from_millis(250);

/// message-service as comment-service sees it: which messages exist.
#[derive(Clone, Default)]
pub struct FakeMessages {
    pub behaviour: Arc<Behaviour>,
    /// message id -> author id
    pub messages: Arc<Mutex<HashMap<String, String>>>,
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl mpb::message_service_server::MessageService for FakeMessages {
    async fn check_message(&self, request: Request<mpb::CheckMessageRequest>) -> R<mpb::CheckMessageResponse> {
        self.behaviour.enter("CheckMessage").await?;
        let author = self
            .messages
            .lock()
            .unwrap()
            .get(&request.get_ref().message_id)
            .cloned();
        Ok(Response::new(mpb::CheckMessageResponse {
            exists: author.is_some(),
            author_id: author.unwrap_or_default(),
        }))
    }
    async fn post_message(&self, _: Request<mpb::PostMessageRequest>) -> R<mpb::PostMessageResponse> {
        Err(not_faked())
    }
    async fn get_message(&self, _: Request<mpb::GetMessageRequest>) -> R<mpb::GetMessageResponse> {
        Err(not_faked())
    }
    async fn list_user_messages(&self, _: Request<mpb::ListUserMessagesRequest>) -> R<mpb::ListUserMessagesResponse> {
        Err(not_faked())
    }
    async fn home_timeline(&self, _: Request<mpb::HomeTimelineRequest>) -> R<mpb::HomeTimelineResponse> {
        Err(not_faked())
    }
    async fn delete_message(&self, _: Request<mpb::DeleteMessageRequest>) -> R<mpb::DeleteMessageResponse> {
        Err(not_faked())
    }
    async fn set_user_messages_hidden(
        &self,
        _: Request<mpb::SetUserMessagesHiddenRequest>,
    ) -> R<mpb::SetUserMessagesHiddenResponse> {
        Err(not_faked())
    }
    async fn apply_user_events(&self, _: Request<mpb::ApplyUserEventsRequest>) -> R<mpb::ApplyUserEventsResponse> {
        Err(not_faked())
    }
}

/// user-service as comment-service sees it: users' roles, for the rank rule.
#[derive(Clone, Default)]
pub struct FakeUsers {
    pub behaviour: Arc<Behaviour>,
    /// user id -> role
    pub roles: Arc<Mutex<HashMap<String, Role>>>,
}

#[tonic::async_trait]
impl upb::user_service_server::UserService for FakeUsers {
    async fn get_user(&self, request: Request<upb::GetUserRequest>) -> R<upb::GetUserResponse> {
        self.behaviour.enter("GetUser").await?;
        let id = request.into_inner().user_id;
        let role = *self
            .roles
            .lock()
            .unwrap()
            .get(&id)
            .ok_or_else(|| Status::not_found("no user has that id"))?;
        Ok(Response::new(upb::GetUserResponse {
            user: Some(upb::User {
                id,
                role: match role {
                    Role::User => upb::Role::User,
                    Role::Moderator => upb::Role::Moderator,
                    Role::Admin => upb::Role::Admin,
                }
                .into(),
                ..Default::default()
            }),
        }))
    }
    async fn register(&self, _: Request<upb::RegisterRequest>) -> R<upb::RegisterResponse> {
        Err(not_faked())
    }
    async fn login(&self, _: Request<upb::LoginRequest>) -> R<upb::LoginResponse> {
        Err(not_faked())
    }
    async fn batch_get_users(&self, _: Request<upb::BatchGetUsersRequest>) -> R<upb::BatchGetUsersResponse> {
        Err(not_faked())
    }
    async fn follow(&self, _: Request<upb::FollowRequest>) -> R<upb::FollowResponse> {
        Err(not_faked())
    }
    async fn unfollow(&self, _: Request<upb::UnfollowRequest>) -> R<upb::UnfollowResponse> {
        Err(not_faked())
    }
    async fn list_following(&self, _: Request<upb::ListFollowingRequest>) -> R<upb::ListFollowingResponse> {
        Err(not_faked())
    }
    async fn list_followers(&self, _: Request<upb::ListFollowersRequest>) -> R<upb::ListFollowersResponse> {
        Err(not_faked())
    }
    async fn set_role(&self, _: Request<upb::SetRoleRequest>) -> R<upb::SetRoleResponse> {
        Err(not_faked())
    }
    async fn ban_user(&self, _: Request<upb::BanUserRequest>) -> R<upb::BanUserResponse> {
        Err(not_faked())
    }
    async fn unban_user(&self, _: Request<upb::UnbanUserRequest>) -> R<upb::UnbanUserResponse> {
        Err(not_faked())
    }
    async fn delete_user(&self, _: Request<upb::DeleteUserRequest>) -> R<upb::DeleteUserResponse> {
        Err(not_faked())
    }
    async fn change_password(&self, _: Request<upb::ChangePasswordRequest>) -> R<upb::ChangePasswordResponse> {
        Err(not_faked())
    }
    async fn get_public_keys(&self, _: Request<upb::GetPublicKeysRequest>) -> R<upb::GetPublicKeysResponse> {
        Err(not_faked())
    }
    async fn list_revocations(&self, _: Request<upb::ListRevocationsRequest>) -> R<upb::ListRevocationsResponse> {
        self.behaviour.enter("ListRevocations").await?;
        Ok(Response::new(upb::ListRevocationsResponse::default()))
    }
}

/// Where the service's Redis is, kept across restarts of the service.
pub struct Backing {
    pub prefix: KeyPrefix,
    pub server: Option<PrivateRedis>,
    pub messages: FakeMessages,
    pub message_addr: SocketAddr,
    pub users: FakeUsers,
    pub user_addr: SocketAddr,
    pub signer: Arc<TokenSigner>,
    key_dir: tempfile::TempDir,
}

impl Backing {
    /// A key prefix on the shared Redis.
    pub async fn shared() -> Self {
        Self::new(KeyPrefix::new(), None).await
    }

    /// A private append-only Redis the test can stop and start (a private
    /// cluster of six with `CHIRP_TEST_REDIS=cluster`).
    pub async fn private() -> Self {
        if test_support::redis::on_cluster() {
            let cluster = RedisCluster::start().expect("a private Redis Cluster");
            Self::new(
                KeyPrefix::on_cluster(cluster.urls()),
                Some(PrivateRedis::Cluster(cluster)),
            )
            .await
        } else {
            let server = StoreProcess::redis(true).expect("a private redis-server");
            Self::new(KeyPrefix::on(&server.url()), Some(PrivateRedis::Node(server))).await
        }
    }

    /// A private six-node cluster, whatever `CHIRP_TEST_REDIS` says.
    pub async fn private_cluster() -> Self {
        let cluster = RedisCluster::start().expect("a private Redis Cluster");
        Self::new(
            KeyPrefix::on_cluster(cluster.urls()),
            Some(PrivateRedis::Cluster(cluster)),
        )
        .await
    }

    /// The private cluster.
    pub fn cluster(&mut self) -> &mut RedisCluster {
        match self.server.as_mut() {
            Some(PrivateRedis::Cluster(cluster)) => cluster,
            _ => panic!("not on a private cluster"),
        }
    }

    /// The store's address, as the service takes it.
    pub fn address(&self) -> comment_service::store::Address {
        match self.prefix.target() {
            Target::Node(url) => comment_service::store::Address::Node(url.clone()),
            Target::Cluster(urls) => comment_service::store::Address::Cluster(urls.clone()),
        }
    }

    /// The store's address as a flag of comment-service.
    pub fn redis_flag(&self) -> String {
        match self.prefix.target() {
            Target::Node(url) => format!("--redis-url={url}"),
            Target::Cluster(urls) => format!("--redis-cluster-urls={}", urls.join(",")),
        }
    }

    /// The store's address as comment-service's environment.
    pub fn redis_env(&self) -> (&'static str, String) {
        match self.prefix.target() {
            Target::Node(url) => ("REDIS_URL", url.clone()),
            Target::Cluster(urls) => ("REDIS_CLUSTER_URLS", urls.join(",")),
        }
    }

    /// A connection to the store, as the service makes it.
    pub fn connect(&self) -> comment_service::store::Redis {
        comment_service::store::Redis::connect_lazy(&self.address()).expect("a Redis address")
    }

    async fn new(prefix: KeyPrefix, server: Option<PrivateRedis>) -> Self {
        let messages = FakeMessages::default();
        let message_addr = serve_fake(MessageServiceServer::new(messages.clone())).await;
        let users = FakeUsers::default();
        let user_addr = serve_fake(UserServiceServer::new(users.clone())).await;
        let signer = Arc::new(TokenSigner::generate(Duration::from_secs(3600)).unwrap());
        let key_dir = tempfile::tempdir().unwrap();
        std::fs::write(key_dir.path().join("public.pem"), signer.public_key_pem().unwrap()).unwrap();
        Self {
            prefix,
            server,
            messages,
            message_addr,
            users,
            user_addr,
            signer,
            key_dir,
        }
    }

    pub fn redis(&mut self) -> &mut PrivateRedis {
        self.server.as_mut().expect("a private Redis")
    }

    /// A message the fake message-service vouches for.
    pub fn message(&self, author: &str) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        self.messages
            .messages
            .lock()
            .unwrap()
            .insert(id.clone(), author.to_owned());
        id
    }

    /// A user id and a token with `role` (the fake user-service knows the
    /// role too).
    pub fn user(&self, role: Role) -> (String, String) {
        let id = uuid::Uuid::new_v4();
        self.users.roles.lock().unwrap().insert(id.to_string(), role);
        let (token, _) = self
            .signer
            .issue(Caller { user_id: id, role }, chrono::Utc::now().timestamp())
            .unwrap();
        (id.to_string(), token)
    }
}

/// A private Redis of the test's own, one server or a whole cluster, that
/// the test stops, kills and starts as one.
pub enum PrivateRedis {
    Node(StoreProcess),
    Cluster(RedisCluster),
}

impl PrivateRedis {
    pub fn stop(&mut self) {
        match self {
            Self::Node(node) => node.stop(),
            Self::Cluster(cluster) => cluster.stop(),
        }
    }

    pub fn kill(&mut self) {
        match self {
            Self::Node(node) => node.kill(),
            Self::Cluster(cluster) => cluster.kill(),
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Node(node) => node.start(),
            Self::Cluster(cluster) => cluster.restart(),
        }
    }
}

pub struct TestApp {
    pub channel: Channel,
    /// The metrics port, with the operator routes.
    pub metrics_addr: SocketAddr,
    server: Server,
}

impl TestApp {
    pub async fn spawn(backing: &Backing) -> Self {
        Self::spawn_with(backing, &[]).await
    }

    pub async fn spawn_with(backing: &Backing, extra: &[&str]) -> Self {
        let mut args = vec![
            "comment-service".to_owned(),
            backing.redis_flag(),
            format!("--redis-key-prefix={}", backing.prefix.prefix()),
            format!("--message-service-url=http://{}", backing.message_addr),
            format!("--user-service-url=http://{}", backing.user_addr),
            format!(
                "--jwt-public-key-file={}",
                backing.key_dir.path().join("public.pem").display()
            ),
            format!("--peer-timeout={}ms", PEER_TIMEOUT.as_millis()),
            "--store-probe-interval=100ms".to_owned(),
            // Deliveries stay in the outbox (port 1 refuses at once).
            "--analytics-service-url=http://127.0.0.1:1".to_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let config = Config::try_parse_from(args).expect("a valid configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let server = Server::spawn(|stop| comment_service::run(config, listener, Some(metrics), stop));
        let app = Self {
            channel: Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
            metrics_addr,
            server,
        };
        app.wait_for(ServingStatus::Serving).await;
        app
    }

    pub fn client(&self) -> CommentServiceClient<Channel> {
        CommentServiceClient::new(self.channel.clone())
    }

    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        test_support::grpc::health(&self.channel, service).await
    }

    pub async fn wait_for(&self, status: ServingStatus) {
        test_support::grpc::wait_for(&self.channel, &[SERVICE], status).await;
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await
    }
}

/// An AddComment request.
pub fn add(message_id: &str, body: &str) -> pb::AddCommentRequest {
    pb::AddCommentRequest {
        message_id: message_id.into(),
        body: body.into(),
    }
}

/// Every comment of `message`, read through ListComments `page_size` at a
/// time (each page checked to hold at most that many).
pub async fn all_comments(app: &TestApp, message: &str, page_size: i32) -> Vec<pb::Comment> {
    let mut comments = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .client()
            .list_comments(pb::ListCommentsRequest {
                message_id: message.to_owned(),
                page_size,
                page_token,
            })
            .await
            .expect("ListComments")
            .into_inner();
        assert!(page.comments.len() <= usize::try_from(page_size).unwrap_or_default());
        comments.extend(page.comments);
        if page.next_page_token.is_empty() {
            return comments;
        }
        page_token = page.next_page_token;
    }
}

/// Every key under the prefix, read with the driver.
pub async fn keys(backing: &Backing) -> Vec<String> {
    let pattern = format!("{}*", backing.prefix.prefix());
    backing.connect().scan_all(&pattern).await.unwrap()
}

/// Event types waiting in the outbox streams, oldest first in each group,
/// group after group.
pub async fn outbox(backing: &Backing) -> Vec<String> {
    let keys = comment_service::store::keys::Keys::new(backing.prefix.prefix());
    let mut conn = backing.connect();
    let mut types = Vec::new();
    for group in comment_service::store::keys::Group::all() {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(keys.outbox(group))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        types.extend(reply.ids.iter().map(|entry| {
            let json: String = entry.get("event").unwrap();
            let event = service_kit::events::Event::from_json(&json).expect("an event the relay can read");
            serde_json::to_value(&event.payload).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    types
}
