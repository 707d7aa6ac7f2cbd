//! spawn_app for message-service: the real service on port 0 against a fresh
//! MongoDB database, with fake user- and comment-service peers that count
//! their calls and can be told to fail or hang.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use chirp_proto::{
    comment::v1::{self as cpb, comment_service_server::CommentServiceServer},
    message::{v1, v2},
    user::v1::{self as upb, user_service_server::UserServiceServer},
};
use clap::Parser as _;
use message_service::config::Config;
use service_kit::auth::{Caller, Role, TokenSigner};
use test_support::grpc::Server;
pub use test_support::grpc::{authed, violated_fields, with_deadline, Mode};
use test_support::{
    grpc::{not_faked, serve_fake, Behaviour},
    mongo::TestMongo,
};
use tokio::net::TcpListener;
use tonic::{transport::Channel, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

pub const V1: &str = "chirp.message.v1.MessageService";
pub const V2: &str = "chirp.message.v2.MessageService";
/// Deadline of each call to a peer, as configured for the service under test.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(250);

/// user-service as message-service sees it.
#[derive(Clone, Default)]
pub struct FakeUsers {
    pub behaviour: Arc<Behaviour>,
    pub users: Arc<Mutex<HashMap<String, upb::User>>>,
    pub following: Arc<Mutex<HashMap<String, Vec<String>>>>,
    pub keys: Arc<Mutex<Vec<upb::PublicKey>>>,
}

#[tonic::async_trait]
impl upb::user_service_server::UserService for FakeUsers {
    async fn batch_get_users(
        &self,
        request: Request<upb::BatchGetUsersRequest>,
    ) -> Result<Response<upb::BatchGetUsersResponse>, Status> {
        self.behaviour.enter("BatchGetUsers").await?;
        let users = self.users.lock().unwrap();
        let (found, missing): (Vec<_>, Vec<_>) = request
            .into_inner()
            .user_ids
            .into_iter()
            .partition(|id| users.contains_key(id));
        Ok(Response::new(upb::BatchGetUsersResponse {
            users: found.iter().map(|id| users[id].clone()).collect(),
            missing_user_ids: missing,
        }))
    }

    async fn list_following(
        &self,
        request: Request<upb::ListFollowingRequest>,
    ) -> Result<Response<upb::ListFollowingResponse>, Status> {
        self.behaviour.enter("ListFollowing").await?;
        let following = self.following.lock().unwrap();
        let ids = following.get(&request.get_ref().user_id).cloned().unwrap_or_default();
        Ok(Response::new(upb::ListFollowingResponse {
            users: ids
                .into_iter()
                .map(|id| upb::User {
                    id,
                    ..Default::default()
                })
                .collect(),
            next_page_token: String::new(),
        }))
    }

    async fn list_revocations(
        &self,
        _: Request<upb::ListRevocationsRequest>,
    ) -> Result<Response<upb::ListRevocationsResponse>, Status> {
        self.behaviour.enter("ListRevocations").await?;
        Ok(Response::new(upb::ListRevocationsResponse::default()))
    }

    async fn get_public_keys(
        &self,
        _: Request<upb::GetPublicKeysRequest>,
    ) -> Result<Response<upb::GetPublicKeysResponse>, Status> {
        self.behaviour.enter("GetPublicKeys").await?;
        Ok(Response::new(upb::GetPublicKeysResponse {
            keys: self.keys.lock().unwrap().clone(),
        }))
    }

    async fn register(&self, _: Request<upb::RegisterRequest>) -> Result<Response<upb::RegisterResponse>, Status> {
        Err(not_faked())
    }
    async fn login(&self, _: Request<upb::LoginRequest>) -> Result<Response<upb::LoginResponse>, Status> {
        Err(not_faked())
    }
    async fn get_user(&self, _: Request<upb::GetUserRequest>) -> Result<Response<upb::GetUserResponse>, Status> {
        Err(not_faked())
    }
    async fn follow(&self, _: Request<upb::FollowRequest>) -> Result<Response<upb::FollowResponse>, Status> {
        Err(not_faked())
    }
    async fn unfollow(&self, _: Request<upb::UnfollowRequest>) -> Result<Response<upb::UnfollowResponse>, Status> {
        Err(not_faked())
    }
    async fn list_followers(
        &self,
        _: Request<upb::ListFollowersRequest>,
    ) -> Result<Response<upb::ListFollowersResponse>, Status> {
        Err(not_faked())
    }
    async fn set_role(&self, _: Request<upb::SetRoleRequest>) -> Result<Response<upb::SetRoleResponse>, Status> {
        Err(not_faked())
    }
    async fn ban_user(&self, _: Request<upb::BanUserRequest>) -> Result<Response<upb::BanUserResponse>, Status> {
        Err(not_faked())
    }
    async fn unban_user(&self, _: Request<upb::UnbanUserRequest>) -> Result<Response<upb::UnbanUserResponse>, Status> {
        Err(not_faked())
    }
    async fn delete_user(
        &self,
        _: Request<upb::DeleteUserRequest>,
    ) -> Result<Response<upb::DeleteUserResponse>, Status> {
        Err(not_faked())
    }
    async fn change_password(
        &self,
        _: Request<upb::ChangePasswordRequest>,
    ) -> Result<Response<upb::ChangePasswordResponse>, Status> {
        Err(not_faked())
    }
}

/// comment-service as message-service sees it.
#[derive(Clone, Default)]
pub struct FakeComments {
    pub behaviour: Arc<Behaviour>,
    pub comments: Arc<Mutex<HashMap<String, Vec<cpb::Comment>>>>,
    /// Events delivered to ApplyEvents (message deletions).
    pub applied: Arc<Mutex<Vec<chirp_proto::events::v1::Event>>>,
    /// Answer ListComments without `total_count`, as a comment-service that
    /// predates it.
    pub without_total: Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl cpb::comment_service_server::CommentService for FakeComments {
    async fn count_comments(
        &self,
        request: Request<cpb::CountCommentsRequest>,
    ) -> Result<Response<cpb::CountCommentsResponse>, Status> {
        self.behaviour.enter("CountComments").await?;
        let comments = self.comments.lock().unwrap();
        Ok(Response::new(cpb::CountCommentsResponse {
            counts: request
                .into_inner()
                .message_ids
                .into_iter()
                .map(|id| {
                    let n = comments.get(&id).map_or(0, Vec::len) as i64;
                    (id, n)
                })
                .collect(),
        }))
    }

    async fn list_comments(
        &self,
        request: Request<cpb::ListCommentsRequest>,
    ) -> Result<Response<cpb::ListCommentsResponse>, Status> {
        self.behaviour.enter("ListComments").await?;
        let r = request.into_inner();
        let comments = self.comments.lock().unwrap();
        let total = comments.get(&r.message_id).map_or(0, Vec::len) as i64;
        Ok(Response::new(cpb::ListCommentsResponse {
            comments: comments
                .get(&r.message_id)
                .map(|c| c.iter().take(r.page_size as usize).cloned().collect())
                .unwrap_or_default(),
            next_page_token: String::new(),
            total_count: (!self.without_total.load(std::sync::atomic::Ordering::SeqCst)).then_some(total),
        }))
    }

    async fn add_comment(
        &self,
        _: Request<cpb::AddCommentRequest>,
    ) -> Result<Response<cpb::AddCommentResponse>, Status> {
        Err(not_faked())
    }
    async fn delete_comment(
        &self,
        _: Request<cpb::DeleteCommentRequest>,
    ) -> Result<Response<cpb::DeleteCommentResponse>, Status> {
        Err(not_faked())
    }
    async fn purge_user_comments(
        &self,
        _: Request<cpb::PurgeUserCommentsRequest>,
    ) -> Result<Response<cpb::PurgeUserCommentsResponse>, Status> {
        Err(not_faked())
    }
    async fn apply_events(
        &self,
        request: Request<cpb::ApplyEventsRequest>,
    ) -> Result<Response<cpb::ApplyEventsResponse>, Status> {
        self.behaviour.enter("ApplyEvents").await?;
        let events = request.into_inner().events;
        let count = events.len() as i64;
        self.applied.lock().unwrap().extend(events);
        Ok(Response::new(cpb::ApplyEventsResponse {
            applied_count: count,
            ignored_count: 0,
            // None: an older consumer's answer, every event delivered.
            outcomes: Vec::new(),
        }))
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The metrics port, with the operator routes.
    pub metrics_addr: SocketAddr,
    pub channel: Channel,
    pub users: FakeUsers,
    pub comments: FakeComments,
    pub signer: TokenSigner,
    pub mongo: TestMongo,
    server: Server,
    _key_dir: tempfile::TempDir,
}

pub struct Options {
    /// Verify tokens with keys fetched from the (fake) user-service instead
    /// of a key file.
    pub keys_from_user_service: bool,
    pub following_cache_ttl: &'static str,
    /// Followed ids the following cache may hold in all.
    pub following_cache_max_ids: u64,
    /// A private MongoDB server the test can stop, even when `MONGODB_URI`
    /// names a shared one.
    pub private_mongo: bool,
    /// Where comment-service is instead of the fake (e.g. several replicas,
    /// comma-separated).
    pub comment_service_url: Option<String>,
    /// Flags beyond these.
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            keys_from_user_service: false,
            following_cache_ttl: "30s",
            following_cache_max_ids: 200_000,
            private_mongo: false,
            comment_service_url: None,
            extra_args: Vec::new(),
        }
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let mongo = if options.private_mongo {
            TestMongo::private()
        } else {
            TestMongo::create()
        }
        .expect("a MongoDB namespace");
        let signer = TokenSigner::generate(Duration::from_secs(3600)).unwrap();
        let users = FakeUsers::default();
        users.keys.lock().unwrap().push(upb::PublicKey {
            key_id: signer.public_key().key_id,
            algorithm: "EdDSA".into(),
            public_key: signer.public_key().bytes.to_vec(),
        });
        let comments = FakeComments::default();
        let user_addr = serve_fake(UserServiceServer::new(users.clone())).await;
        let comment_addr = serve_fake(CommentServiceServer::new(comments.clone())).await;

        let key_dir = tempfile::tempdir().unwrap();
        let key_file = key_dir.path().join("public.pem");
        std::fs::write(&key_file, signer.public_key_pem().unwrap()).unwrap();

        let mut args = vec![
            "message-service".to_owned(),
            format!("--mongodb-uri={}", mongo.uri()),
            format!("--mongodb-database={}", mongo.database()),
            format!("--user-service-url=http://{user_addr}"),
            format!(
                "--comment-service-url={}",
                options
                    .comment_service_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{comment_addr}"))
            ),
            format!("--peer-timeout={}ms", PEER_TIMEOUT.as_millis()),
            "--store-probe-interval=100ms".to_owned(),
            format!("--following-cache-ttl={}", options.following_cache_ttl),
            format!("--following-cache-max-ids={}", options.following_cache_max_ids),
            // Deliveries stay in the outbox (port 1 refuses at once).
            "--analytics-service-url=http://127.0.0.1:1".to_owned(),
        ];
        if !options.keys_from_user_service {
            args.push(format!("--jwt-public-key-file={}", key_file.display()));
        }
        args.extend(options.extra_args.iter().cloned());
        let config = Config::try_parse_from(args).expect("a valid configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let server = Server::spawn(|stop| message_service::run(config, listener, Some(metrics), stop));
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let app = Self {
            addr,
            metrics_addr,
            channel,
            users,
            comments,
            signer,
            mongo,
            server,
            _key_dir: key_dir,
        };
        app.wait_for(ServingStatus::Serving).await;
        app
    }

    pub fn v1(&self) -> v1::message_service_client::MessageServiceClient<Channel> {
        v1::message_service_client::MessageServiceClient::new(self.channel.clone())
    }

    pub fn v2(&self) -> v2::message_service_client::MessageServiceClient<Channel> {
        v2::message_service_client::MessageServiceClient::new(self.channel.clone())
    }

    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        test_support::grpc::health(&self.channel, service).await
    }

    pub async fn wait_for(&self, status: ServingStatus) {
        test_support::grpc::wait_for(&self.channel, &[V1, V2], status).await;
    }

    /// A user the fake user-service knows, and a token for them.
    pub fn user(&self, username: &str, role: Role) -> (String, String) {
        let id = uuid::Uuid::new_v4();
        self.users.users.lock().unwrap().insert(
            id.to_string(),
            upb::User {
                id: id.to_string(),
                username: username.into(),
                display_name: username.to_uppercase(),
                role: match role {
                    Role::User => upb::Role::User,
                    Role::Moderator => upb::Role::Moderator,
                    Role::Admin => upb::Role::Admin,
                }
                .into(),
                ..Default::default()
            },
        );
        let (token, _) = self
            .signer
            .issue(Caller { user_id: id, role }, chrono::Utc::now().timestamp())
            .unwrap();
        (id.to_string(), token)
    }

    pub async fn post(&self, token: &str, body: &str) -> v1::Message {
        self.v1()
            .post_message(authed(v1::PostMessageRequest { body: body.into() }, token))
            .await
            .expect("posting succeeds")
            .into_inner()
            .message
            .expect("a message")
    }

    /// The service's collection, read with the driver directly.
    pub async fn collection(&self) -> mongodb::Collection<mongodb::bson::Document> {
        let client = mongodb::Client::with_uri_str(self.mongo.uri())
            .await
            .expect("a MongoDB client");
        client.database(self.mongo.database()).collection("messages")
    }

    /// Event types waiting in the outbox, by destination, then oldest first.
    pub async fn outbox(&self) -> Vec<String> {
        use futures::TryStreamExt as _;
        let client = mongodb::Client::with_uri_str(self.mongo.uri())
            .await
            .expect("a MongoDB client");
        let docs: Vec<mongodb::bson::Document> = client
            .database(self.mongo.database())
            .collection::<mongodb::bson::Document>("outbox")
            .find(mongodb::bson::doc! {})
            .sort(mongodb::bson::doc! { "_id": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        docs.iter()
            .map(|d| {
                let event = service_kit::events::Event::from_json(d.get_str("event").unwrap()).unwrap();
                serde_json::to_value(&event.payload).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    pub async fn stored_count(&self) -> u64 {
        self.collection()
            .await
            .count_documents(mongodb::bson::doc! {})
            .await
            .unwrap()
    }

    /// The private MongoDB server (see [`Options::private_mongo`]).
    pub fn mongo_server(&mut self) -> &mut test_support::process::StoreProcess {
        self.mongo.server().expect("spawned with private_mongo")
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await
    }
}
