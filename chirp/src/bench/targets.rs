//! What a benchmark calls: each RPC of the mesh, the mixed social workload,
//! and the baselines (a bare tonic unary call and each store driven directly
//! through the driver its service uses), over a seeded graph.

use std::{str::FromStr as _, sync::Arc, time::Duration};

use anyhow::Context as _;
use chirp_proto::{
    comment::v1::{self as cpb, comment_service_client::CommentServiceClient},
    message::{v1 as m1, v2 as m2},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use clap::ValueEnum;
use mongodb::bson::{doc, DateTime as BsonDateTime, Document};
use rand::{seq::SliceRandom as _, Rng as _, SeedableRng as _};
use serde::Serialize;
use sqlx::Connection as _;
use tonic::{metadata::MetadataValue, transport::Channel, Request};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::layout::Part;

/// Something to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Baseline: grpc.health.v1.Check on a server that does nothing else.
    Echo,
    /// Baseline: sqlx primary-key select of a user row.
    PgSelect,
    /// Baseline: Redis GET.
    RedisGet,
    /// Baseline: Redis HSET.
    RedisHset,
    /// Baseline: MongoDB insert of one message-shaped document.
    MongoInsert,
    /// Baseline: a message and its outbox entry in one MongoDB transaction.
    MongoTx,
    /// Baseline: MongoDB find of a message by id.
    MongoFind,
    /// Baseline: a SQLite insert (WAL, synchronous=FULL, one writer).
    SqliteInsert,
    GetUser,
    AddComment,
    ListComments,
    CountComments,
    CheckMessage,
    GetMessage,
    PostMessage,
    HomeTimeline,
    UserTimeline,
    /// 60 % home timeline, 30 % user timeline, 10 % post (DeathStarBench's
    /// social network mix).
    Mixed,
    /// Wrong-password logins with no token, as an attacker would send them,
    /// while one caller in eight reads users (their latency is reported on
    /// its own); run it alone (`--only login-flood`): the rate limits it
    /// trips also hold back real logins from this address for a minute.
    LoginFlood,
}

impl Target {
    pub const RPCS: [Self; 10] = [
        Self::GetUser,
        Self::AddComment,
        Self::ListComments,
        Self::CountComments,
        Self::CheckMessage,
        Self::GetMessage,
        Self::PostMessage,
        Self::HomeTimeline,
        Self::UserTimeline,
        Self::Mixed,
    ];
    pub const BASELINES: [Self; 8] = [
        Self::Echo,
        Self::PgSelect,
        Self::RedisGet,
        Self::RedisHset,
        Self::MongoInsert,
        Self::MongoTx,
        Self::MongoFind,
        Self::SqliteInsert,
    ];

    #[must_use]
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// The baseline(s) this RPC is held to, and the ratio of their
    /// throughput it should reach (the lower baseline counts).
    #[must_use]
    pub fn target(self) -> Option<(&'static [Self], f64)> {
        match self {
            Self::GetUser => Some((&[Self::Echo, Self::PgSelect], 0.6)),
            Self::AddComment => Some((&[Self::Echo], 0.5)),
            Self::ListComments | Self::CountComments => Some((&[Self::Echo], 0.6)),
            Self::PostMessage => Some((&[Self::MongoTx], 0.7)),
            Self::GetMessage => Some((&[Self::MongoFind], 0.6)),
            Self::HomeTimeline => Some((&[Self::MongoFind], 0.4)),
            _ => None,
        }
    }
}

/// A seeded user: id, name and ready-made `authorization` value.
struct User {
    id: String,
    username: String,
    bearer: MetadataValue<tonic::metadata::Ascii>,
}

/// The size of the seeded graph.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct GraphSize {
    pub users: usize,
    pub follows: usize,
    pub messages: usize,
    pub comments: usize,
}

/// Where the mesh and its stores are.
pub struct Endpoints {
    pub service_url: Box<dyn Fn(Part) -> String + Send + Sync>,
    pub echo_url: String,
    pub postgres_url: String,
    pub redis_url: String,
    /// Whether `redis_url` is a node of a Redis Cluster (`--redis-cluster`).
    pub redis_cluster: bool,
    pub mongodb_uri: String,
}

/// The URL of the master that serves `key`, asked of the cluster node at
/// `node`.
async fn master_of(node: &str, key: &str) -> anyhow::Result<String> {
    let mut conn = redis::Client::open(node)?.get_multiplexed_async_connection().await?;
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut conn)
        .await?;
    // Each entry: start, end, then the master [host, port, …] and its replicas.
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await?;
    for range in slots {
        let redis::Value::Array(parts) = range else { continue };
        let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to)), Some(redis::Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        if (*from..=*to).contains(&slot) {
            if let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                (master.first(), master.get(1))
            {
                return Ok(format!("redis://{}:{port}", String::from_utf8_lossy(host)));
            }
        }
    }
    anyhow::bail!("no master serves the benchmark's slot {slot}")
}

/// Everything the calls need, built once.
pub struct Ctx {
    users: Vec<User>,
    messages: Vec<String>,
    channels: std::collections::HashMap<Part, Vec<Channel>>,
    echo: Vec<Channel>,
    pg: sqlx::PgPool,
    /// The server the mesh's PostgreSQL runs on, for the baseline's own
    /// database.
    pg_server: sqlx::postgres::PgConnectOptions,
    /// The baselines' own PostgreSQL database: the benchmark reads no
    /// service's store.
    pg_database: String,
    redis: redis::aio::ConnectionManager,
    /// The key prefix of this run's Redis keys.
    redis_prefix: String,
    mongo: mongodb::Client,
    bench_db: mongodb::Database,
    sqlite: sqlx::SqlitePool,
    _sqlite_dir: tempfile::TempDir,
    run: String,
    /// Latencies (µs) of the reads made beside a flood.
    pub beside: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
}

async fn channels(url: &str, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let mut all = Vec::new();
    for _ in 0..connections.max(1) {
        // Each connect() opens its own HTTP/2 connection.
        all.push(
            Channel::from_shared(url.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to {url}"))?,
        );
    }
    Ok(all)
}

fn authed<T>(message: T, user: &User) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", user.bearer.clone());
    request.set_timeout(Duration::from_secs(10));
    request
}

fn code(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

impl Ctx {
    /// Connects, and seeds a graph of `size` through the public API.
    pub async fn build(
        endpoints: &Endpoints,
        connections: usize,
        size: GraphSize,
        password: &str,
    ) -> anyhow::Result<Self> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let mut by_part = std::collections::HashMap::new();
        for part in [Part::UserService, Part::MessageService, Part::CommentService] {
            by_part.insert(part, channels(&(endpoints.service_url)(part), connections).await?);
        }
        let echo = channels(&endpoints.echo_url, connections).await?;

        // The baselines' own database on the mesh's server, with a table
        // shaped like user-service's accounts, filled after seeding.
        let pg_server = sqlx::postgres::PgConnectOptions::from_str(&endpoints.postgres_url)?;
        let pg_database = format!("chirp_bench_{run}");
        {
            let mut admin = sqlx::PgConnection::connect_with(&pg_server.clone().database("postgres"))
                .await
                .context("PostgreSQL")?;
            sqlx::query(&format!("CREATE DATABASE \"{pg_database}\""))
                .execute(&mut admin)
                .await?;
            admin.close().await?;
        }
        let pg = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect_with(pg_server.clone().database(&pg_database))
            .await
            .context("PostgreSQL")?;
        sqlx::query(
            "CREATE TABLE accounts (id UUID PRIMARY KEY, username TEXT NOT NULL UNIQUE, display_name TEXT NOT NULL, \
             password_hash TEXT NOT NULL, role TEXT NOT NULL, banned_at TIMESTAMPTZ, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .execute(&pg)
        .await?;
        // On a cluster the baseline's keys share one hash tag, and the
        // baseline talks to the master of its slot, as one server.
        let redis_prefix = if endpoints.redis_cluster {
            format!("chirp:bench:{{{run}}}:")
        } else {
            format!("chirp:bench:{run}:")
        };
        let redis_url = if endpoints.redis_cluster {
            master_of(&endpoints.redis_url, &format!("{redis_prefix}key")).await?
        } else {
            endpoints.redis_url.clone()
        };
        let redis = redis::aio::ConnectionManager::new(redis::Client::open(redis_url.as_str())?)
            .await
            .context("Redis")?;
        let mut options = mongodb::options::ClientOptions::parse(&endpoints.mongodb_uri).await?;
        // The same durability message-service asks for.
        options.write_concern = Some(
            mongodb::options::WriteConcern::builder()
                .w(mongodb::options::Acknowledgment::Majority)
                .journal(true)
                .build(),
        );
        let mongo = mongodb::Client::with_options(options)?;
        let bench_db = mongo.database(&format!("chirp_bench_{run}"));
        for name in [POSTS, POST_EVENTS] {
            bench_db.create_collection(name).await.context("MongoDB")?;
        }
        let sqlite_dir = tempfile::tempdir()?;
        let sqlite = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(sqlite_dir.path().join("bench.db"))
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Full),
            )
            .await?;
        sqlx::query("CREATE TABLE bench_events (id TEXT PRIMARY KEY, at INTEGER NOT NULL, payload TEXT NOT NULL)")
            .execute(&sqlite)
            .await?;

        let mut ctx = Self {
            users: Vec::new(),
            messages: Vec::new(),
            channels: by_part,
            echo,
            pg,
            pg_server,
            pg_database,
            redis,
            redis_prefix,
            mongo,
            bench_db,
            sqlite,
            _sqlite_dir: sqlite_dir,
            run,
            beside: std::sync::Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
                    .map_err(|e| anyhow::anyhow!("histogram: {e}"))?,
            ),
        };
        ctx.seed(size, password).await?;
        Ok(ctx)
    }

    fn channel(&self, part: Part, worker: u64) -> Channel {
        let all = &self.channels[&part];
        all[usize::try_from(worker).unwrap_or(0) % all.len()].clone()
    }

    fn user(&self, n: u64) -> &User {
        &self.users[usize::try_from(n).unwrap_or(0) % self.users.len()]
    }

    fn message(&self, n: u64) -> &str {
        &self.messages[usize::try_from(n).unwrap_or(0) % self.messages.len()]
    }

    async fn seed(&mut self, size: GraphSize, password: &str) -> anyhow::Result<()> {
        let mut users = UserServiceClient::new(self.channel(Part::UserService, 0));
        for i in 0..size.users.max(2) {
            let username = format!("bench_{}_{i}", self.run);
            let user = users
                .register(upb::RegisterRequest {
                    username: username.clone(),
                    password: password.into(),
                    display_name: format!("Bench user {i}"),
                })
                .await
                .context("registering a bench user")?
                .into_inner()
                .user
                .context("a registered user")?;
            let token = users
                .login(upb::LoginRequest {
                    username,
                    password: password.into(),
                })
                .await
                .context("logging a bench user in")?
                .into_inner()
                .access_token;
            self.users.push(User {
                id: user.id,
                username: format!("bench_{}_{i}", self.run),
                bearer: format!("Bearer {token}").parse()?,
            });
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(20_261_129);
        let ids: Vec<String> = self.users.iter().map(|u| u.id.clone()).collect();
        for user in &self.users {
            for followee in ids.choose_multiple(&mut rng, size.follows.min(ids.len())) {
                if *followee != user.id {
                    users
                        .follow(authed(
                            upb::FollowRequest {
                                user_id: followee.clone(),
                            },
                            user,
                        ))
                        .await
                        .context("following")?;
                }
            }
        }
        let mut messages = m2::message_service_client::MessageServiceClient::new(self.channel(Part::MessageService, 0));
        let mut comments = CommentServiceClient::new(self.channel(Part::CommentService, 0));
        for round in 0..size.messages.max(1) {
            for user in &self.users {
                let posted = messages
                    .post_message(authed(
                        m2::PostMessageRequest {
                            body: format!("bench message {round}"),
                        },
                        user,
                    ))
                    .await
                    .context("posting")?
                    .into_inner()
                    .message
                    .context("a posted message")?;
                self.messages.push(posted.id);
            }
        }
        for (i, message) in self.messages.iter().enumerate() {
            for c in 0..size.comments {
                let user = &self.users[(i + c + 1) % self.users.len()];
                comments
                    .add_comment(authed(
                        cpb::AddCommentRequest {
                            message_id: message.clone(),
                            body: "a bench comment".into(),
                        },
                        user,
                    ))
                    .await
                    .context("commenting")?;
            }
        }
        let mut redis = self.redis.clone();
        let _: () = redis::AsyncCommands::set(&mut redis, format!("{}key", self.redis_prefix), "value").await?;
        // The baselines read copies in their own namespaces, keyed as the
        // mesh's are.
        for user in &self.users {
            sqlx::query("INSERT INTO accounts (id, username, display_name, password_hash, role) VALUES ($1, $2, '', 'x', 'user')")
                .bind(uuid::Uuid::parse_str(&user.id)?)
                .bind(&user.username)
                .execute(&self.pg)
                .await?;
        }
        let copies: Vec<Document> = self
            .messages
            .iter()
            .map(|id| {
                let mut doc = message_doc(&self.users[0].id);
                doc.insert("_id", id.as_str());
                doc
            })
            .collect();
        if !copies.is_empty() {
            self.bench_db.collection::<Document>(POSTS).insert_many(copies).await?;
        }
        Ok(())
    }

    /// One call of `target` by `worker`, the `sequence`-th it makes.
    pub async fn call(self: Arc<Self>, target: Target, worker: u64, sequence: u64) -> Result<(), String> {
        let user = self.user(worker);
        let other = self.user(worker.wrapping_add(sequence).wrapping_add(1));
        let message = self.message(worker.wrapping_mul(7919).wrapping_add(sequence));
        let users = || UserServiceClient::new(self.channel(Part::UserService, worker));
        let messages_v1 =
            || m1::message_service_client::MessageServiceClient::new(self.channel(Part::MessageService, worker));
        let messages =
            || m2::message_service_client::MessageServiceClient::new(self.channel(Part::MessageService, worker));
        let comments = || CommentServiceClient::new(self.channel(Part::CommentService, worker));
        let grpc = |r: Result<(), tonic::Status>| r.map_err(|s| code(&s));
        // Store errors are keyed by their first words, so that one kind of
        // failure is one column entry however many times it happens.
        let store = |r: anyhow::Result<()>| {
            r.map_err(|e| {
                let text = e.to_string();
                format!("store: {}", text.chars().take(48).collect::<String>())
            })
        };
        match target {
            Target::Echo => {
                let channel = self.echo[usize::try_from(worker).unwrap_or(0) % self.echo.len()].clone();
                grpc(HealthClient::new(channel).check(HealthCheckRequest::default()).await.map(drop))
            }
            Target::GetUser => grpc(
                users()
                    .get_user(authed(upb::GetUserRequest { user_id: other.id.clone() }, user))
                    .await
                    .map(drop),
            ),
            Target::AddComment => grpc(
                comments()
                    .add_comment(authed(
                        cpb::AddCommentRequest {
                            message_id: message.to_owned(),
                            body: "a bench comment".into(),
                        },
                        user,
                    ))
                    .await
                    .map(drop),
            ),
            Target::ListComments => grpc(
                comments()
                    .list_comments(authed(
                        cpb::ListCommentsRequest {
                            message_id: message.to_owned(),
                            page_size: 20,
                            page_token: String::new(),
                        },
                        user,
                    ))
                    .await
                    .map(drop),
            ),
            Target::CountComments => {
                let ids = (0..20).map(|i| self.message(sequence + i).to_owned()).collect();
                grpc(
                    comments()
                        .count_comments(authed(cpb::CountCommentsRequest { message_ids: ids }, user))
                        .await
                        .map(drop),
                )
            }
            Target::CheckMessage => grpc(
                messages_v1()
                    .check_message(authed(
                        m1::CheckMessageRequest {
                            message_id: message.to_owned(),
                        },
                        user,
                    ))
                    .await
                    .map(drop),
            ),
            Target::GetMessage => grpc(
                messages()
                    .get_message(authed(
                        m2::GetMessageRequest {
                            message_id: message.to_owned(),
                        },
                        user,
                    ))
                    .await
                    .map(drop),
            ),
            Target::PostMessage => grpc(
                messages()
                    .post_message(authed(
                        m2::PostMessageRequest {
                            body: "a bench post".into(),
                        },
                        user,
                    ))
                    .await
                    .map(drop),
            ),
            Target::HomeTimeline => grpc(
                messages()
                    .home_timeline(authed(
                        m2::HomeTimelineRequest {
                            page_size: 20,
                            page_token: String::new(),
                        },
                        user,
                    ))
                    .await
                    .map(drop),
            ),
            Target::UserTimeline => grpc(
                messages()
                    .list_user_messages(authed(
                        m2::ListUserMessagesRequest {
                            user_id: other.id.clone(),
                            page_size: 20,
                            page_token: String::new(),
                        },
                        user,
                    ))
                    .await
                    .map(drop),
            ),
            Target::Mixed => {
                let pick = match rand::thread_rng().gen_range(0..10) {
                    0..=5 => Target::HomeTimeline,
                    6..=8 => Target::UserTimeline,
                    _ => Target::PostMessage,
                };
                Box::pin(self.clone().call(pick, worker, sequence)).await
            }
            Target::LoginFlood if worker.is_multiple_of(8) => {
                let sent = std::time::Instant::now();
                let result = users()
                    .get_user(authed(upb::GetUserRequest { user_id: other.id.clone() }, user))
                    .await;
                if let Ok(mut beside) = self.beside.lock() {
                    beside.saturating_record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                }
                grpc(result.map(drop))
            }
            Target::LoginFlood => {
                let mut request = Request::new(upb::LoginRequest {
                    username: other.username.clone(),
                    password: "not the password".into(),
                });
                request.set_timeout(Duration::from_secs(10));
                grpc(users().login(request).await.map(drop))
            }
            Target::PgSelect => store(
                sqlx::query("SELECT id, username, display_name, role, banned_at IS NOT NULL AS banned, created_at FROM accounts WHERE id = $1")
                    .bind(uuid::Uuid::parse_str(&other.id).map_err(|e| e.to_string())?)
                    .fetch_optional(&self.pg)
                    .await
                    .map(drop)
                    .map_err(Into::into),
            ),
            Target::RedisGet => {
                let mut redis = self.redis.clone();
                let got: redis::RedisResult<Option<String>> =
                    redis::AsyncCommands::get(&mut redis, format!("{}key", self.redis_prefix)).await;
                store(got.map(drop).map_err(Into::into))
            }
            Target::RedisHset => {
                let mut redis = self.redis.clone();
                let key = format!("{}h:{}", self.redis_prefix, sequence % 1000);
                let set: redis::RedisResult<i64> = redis::AsyncCommands::hset(&mut redis, key, "body", "a bench comment").await;
                store(set.map(drop).map_err(Into::into))
            }
            Target::MongoInsert => store(
                self.bench_db
                    .collection::<Document>(POSTS)
                    .insert_one(message_doc(&user.id))
                    .await
                    .map(drop)
                    .map_err(Into::into),
            ),
            Target::MongoTx => store(self.mongo_tx(&user.id).await),
            Target::MongoFind => store(
                self.bench_db
                    .collection::<Document>(POSTS)
                    .find_one(doc! { "_id": message })
                    .await
                    .map(drop)
                    .map_err(Into::into),
            ),
            Target::SqliteInsert => store(
                sqlx::query("INSERT INTO bench_events (id, at, payload) VALUES (?, ?, ?)")
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(chrono_millis())
                    .bind(r#"{"type":"comment_added"}"#)
                    .execute(&self.sqlite)
                    .await
                    .map(drop)
                    .map_err(Into::into),
            ),
        }
    }

    /// What PostMessage writes, straight through the driver.
    async fn mongo_tx(&self, author: &str) -> anyhow::Result<()> {
        let message = message_doc(author);
        let outbox = doc! {
            "_id": format!("analytics:{}", uuid::Uuid::now_v7()),
            "destination": "analytics",
            "event": r#"{"type":"message_posted"}"#,
            "occurred_at": BsonDateTime::now(),
        };
        let mut session = self.mongo.start_session().await?;
        session.start_transaction().await?;
        self.bench_db
            .collection::<Document>(POSTS)
            .insert_one(message)
            .session(&mut session)
            .await?;
        self.bench_db
            .collection::<Document>(POST_EVENTS)
            .insert_one(outbox)
            .session(&mut session)
            .await?;
        session.commit_transaction().await?;
        Ok(())
    }

    /// Removes what the baselines wrote (the seeded graph stays: it is
    /// ordinary data of the mesh).
    pub async fn clean_up(&self) {
        let _ = self.bench_db.drop().await;
        self.pg.close().await;
        if let Ok(mut admin) = sqlx::PgConnection::connect_with(&self.pg_server.clone().database("postgres")).await {
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.pg_database);
            let _ = sqlx::query(&drop).execute(&mut admin).await;
            let _ = admin.close().await;
        }
        let mut redis = self.redis.clone();
        let keys: redis::RedisResult<Vec<String>> =
            redis::AsyncCommands::keys(&mut redis, format!("{}*", self.redis_prefix)).await;
        if let Ok(keys) = keys {
            if !keys.is_empty() {
                let _: redis::RedisResult<i64> = redis::AsyncCommands::del(&mut redis, keys).await;
            }
        }
    }
}

/// The baselines' collections, in their own database: a post as
/// message-service stores one, and its outbox entry.
const POSTS: &str = "bench_posts";
const POST_EVENTS: &str = "bench_post_events";

fn message_doc(author: &str) -> Document {
    doc! {
        "_id": uuid::Uuid::now_v7().to_string(),
        "author_id": author,
        "body": "a bench post",
        "created_at": BsonDateTime::now(),
        "hidden": false,
    }
}

fn chrono_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}
