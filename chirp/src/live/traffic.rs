//! Gentle traffic for the page (its Load button and `chirp load`): a few
//! requests a second as the demo users (reads mostly, a post and a comment
//! now and then), so the edges move, and the last requests kept with what
//! each reply said of its parts.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use chirp_proto::{
    analytics::v1::{analytics_service_client::AnalyticsServiceClient, GetUserStatsRequest},
    comment::v1::{comment_service_client::CommentServiceClient, AddCommentRequest},
    message::v2 as m2,
    user::v1::{user_service_client::UserServiceClient, LoginRequest, RegisterRequest},
};
use rand::{seq::SliceRandom as _, Rng as _};
use serde::Serialize;
use tokio::{sync::Semaphore, task::JoinHandle};
use tonic::transport::Channel;

use crate::layout::{Part, Ports};

/// How many requests the recent-requests panel keeps.
pub const RECENT: usize = 40;
/// Requests a second when none is given.
pub const DEFAULT_RATE: f64 = 8.0;
/// At most this many requests wait at once; past it a due request is
/// skipped, so a stalled mesh does not pile up work in the generator.
const MAX_IN_FLIGHT: usize = 32;
/// Each request's deadline: longer than any part's, so the reply shows
/// what the mesh did about a slow part instead of the generator giving up.
const DEADLINE: Duration = Duration::from_secs(2);
/// Message ids the generator reads and comments on; the newest are kept.
const KNOWN_MESSAGES: usize = 64;

/// One request as the panel shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Recent {
    /// Unix time in milliseconds.
    pub at: i64,
    pub rpc: &'static str,
    /// `OK` or the gRPC code's name.
    pub code: String,
    pub ms: f64,
    /// What the reply said of the author part (`OK`, `UNAVAILABLE`,
    /// `NOT_FOUND`), for replies that carry one.
    pub author: Option<&'static str>,
    pub comments: Option<&'static str>,
    /// Whether the reply came back with a part missing.
    pub degraded: bool,
    /// The request's trace id, when the mesh exports traces.
    pub trace_id: Option<String>,
}

impl Recent {
    /// A request sent now, answered OK until told otherwise.
    fn sent(rpc: &'static str, trace_id: Option<String>) -> Self {
        Self {
            at: chrono::Utc::now().timestamp_millis(),
            rpc,
            code: "OK".into(),
            ms: 0.0,
            author: None,
            comments: None,
            degraded: false,
            trace_id,
        }
    }
}

/// The generator: off until started; the last requests it sent.
pub struct Traffic {
    ports: Ports,
    traced: bool,
    password: String,
    running: Mutex<Option<(f64, JoinHandle<()>)>>,
    recent: Mutex<VecDeque<Recent>>,
}

impl Traffic {
    #[must_use]
    pub fn new(ports: Ports, traced: bool, password: &str) -> Arc<Self> {
        Arc::new(Self {
            ports,
            traced,
            password: password.to_owned(),
            running: Mutex::new(None),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        })
    }

    /// Starts sending `rate` requests a second (restarting at the new rate
    /// if it runs already).
    pub fn start(self: &Arc<Self>, rate: f64) {
        let mut running = lock(&self.running);
        if let Some((_, task)) = running.take() {
            task.abort();
        }
        let me = self.clone();
        *running = Some((rate, tokio::spawn(async move { me.run(rate).await })));
    }

    pub fn stop(&self) {
        if let Some((_, task)) = lock(&self.running).take() {
            task.abort();
        }
    }

    /// The rate it runs at, if it runs.
    #[must_use]
    pub fn rate(&self) -> Option<f64> {
        lock(&self.running).as_ref().map(|(rate, _)| *rate)
    }

    /// Newest first.
    #[must_use]
    pub fn recent(&self) -> Vec<Recent> {
        lock(&self.recent).iter().rev().cloned().collect()
    }

    fn record(&self, entry: Recent) {
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(entry);
    }

    async fn run(self: Arc<Self>, rate: f64) {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let world = Arc::new(World::new(self.ports));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.clamp(0.1, 200.0)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sequence: u64 = 0;
        loop {
            tick.tick().await;
            if !world.signed_in() {
                world.sign_in(&self.password).await;
                continue;
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            sequence += 1;
            let (me, world) = (self.clone(), world.clone());
            tokio::spawn(async move {
                let entry = world.request(sequence, me.traced).await;
                me.record(entry);
                drop(slot);
            });
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Who the generator is and what it knows of the mesh.
struct World {
    channels: [Channel; 4],
    /// (user id, token) of each signed-in user.
    users: Mutex<Vec<(String, String)>>,
    messages: Mutex<VecDeque<String>>,
}

impl World {
    fn new(ports: Ports) -> Self {
        let channel = |part| {
            // A valid URL by construction; connects on first use.
            Channel::from_shared(ports.url(part))
                .unwrap_or_else(|_| unreachable!("the mesh's own URL is valid"))
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy()
        };
        Self {
            channels: [
                channel(Part::UserService),
                channel(Part::MessageService),
                channel(Part::CommentService),
                channel(Part::AnalyticsService),
            ],
            users: Mutex::new(Vec::new()),
            messages: Mutex::new(VecDeque::new()),
        }
    }

    fn signed_in(&self) -> bool {
        !lock(&self.users).is_empty()
    }

    /// Logs in as the demo users, or (on a mesh started with `--no-seed`)
    /// as users of its own, registered once.
    async fn sign_in(&self, password: &str) {
        let mut client = UserServiceClient::new(self.channels[0].clone());
        let mut users = Vec::new();
        for name in ["alice", "bob", "carol", "traffic_a", "traffic_b"] {
            if users.len() >= 3 {
                break;
            }
            let login = |client: &mut UserServiceClient<Channel>| {
                let mut client = client.clone();
                let request = LoginRequest {
                    username: name.into(),
                    password: password.into(),
                };
                async move { client.login(with_deadline(request)).await }
            };
            let mut reply = login(&mut client).await;
            if reply.is_err() && name.starts_with("traffic") {
                let _ = client
                    .register(with_deadline(RegisterRequest {
                        username: name.into(),
                        password: password.into(),
                        display_name: String::new(),
                    }))
                    .await;
                reply = login(&mut client).await;
            }
            if let Ok(reply) = reply {
                let reply = reply.into_inner();
                users.push((reply.user.unwrap_or_default().id, reply.access_token));
            }
        }
        *lock(&self.users) = users;
    }

    fn user(&self) -> Option<(String, String)> {
        lock(&self.users).choose(&mut rand::thread_rng()).cloned()
    }

    fn message(&self) -> Option<String> {
        lock(&self.messages)
            .iter()
            .collect::<Vec<_>>()
            .choose(&mut rand::thread_rng())
            .map(|s| (*s).clone())
    }

    fn learn(&self, ids: impl IntoIterator<Item = String>) {
        let mut known = lock(&self.messages);
        for id in ids {
            if !known.contains(&id) {
                if known.len() == KNOWN_MESSAGES {
                    known.pop_front();
                }
                known.push_back(id);
            }
        }
    }

    /// One request, chosen by `sequence`: four in ten read a message, three
    /// read a timeline, and one each posts, comments and reads stats.
    async fn request(&self, sequence: u64, traced: bool) -> Recent {
        let Some((user_id, token)) = self.user() else {
            return Recent {
                code: "Unauthenticated".into(),
                ..Recent::sent("Login", None)
            };
        };
        let trace = traced.then(new_trace);
        let caller = Caller {
            token,
            traceparent: trace.as_ref().map(|(t, s)| format!("00-{t}-{s}-01")),
        };
        let message_id = self.message();
        let messages = m2::message_service_client::MessageServiceClient::new(self.channels[1].clone());
        let start = std::time::Instant::now();
        let mut entry = Recent::sent("", trace.as_ref().map(|(t, _)| t.clone()));
        let outcome: Result<(), tonic::Status> = match (sequence % 10, message_id) {
            (0..=3, Some(id)) => {
                entry.rpc = "GetMessage";
                messages
                    .clone()
                    .get_message(caller.request(m2::GetMessageRequest { message_id: id }))
                    .await
                    .map(|reply| {
                        if let Some(m) = reply.into_inner().message {
                            entry.author = m.author.map(|a| part_status(a.status));
                            entry.comments = m.comments.map(|c| part_status(c.status));
                        }
                    })
            }
            (7, _) => {
                entry.rpc = "PostMessage";
                let body = format!("traffic #{sequence} from the chirp page");
                messages
                    .clone()
                    .post_message(caller.request(m2::PostMessageRequest { body }))
                    .await
                    .map(|reply| self.learn(reply.into_inner().message.map(|m| m.id)))
            }
            (8, Some(id)) => {
                entry.rpc = "AddComment";
                CommentServiceClient::new(self.channels[2].clone())
                    .add_comment(caller.request(AddCommentRequest {
                        message_id: id,
                        body: format!("comment #{sequence}"),
                    }))
                    .await
                    .map(drop)
            }
            (9, _) => {
                entry.rpc = "GetUserStats";
                AnalyticsServiceClient::new(self.channels[3].clone())
                    .get_user_stats(caller.request(GetUserStatsRequest { user_id }))
                    .await
                    .map(drop)
            }
            _ => {
                entry.rpc = "HomeTimeline";
                messages
                    .clone()
                    .home_timeline(caller.request(m2::HomeTimelineRequest {
                        page_size: 10,
                        page_token: String::new(),
                    }))
                    .await
                    .map(|reply| {
                        let reply = reply.into_inner();
                        let worst = |statuses: Vec<&'static str>| {
                            statuses.iter().find(|s| **s != "OK").or(statuses.first()).copied()
                        };
                        entry.author = worst(
                            reply
                                .messages
                                .iter()
                                .filter_map(|m| m.author.as_ref())
                                .map(|a| part_status(a.status))
                                .collect(),
                        );
                        entry.comments = worst(
                            reply
                                .messages
                                .iter()
                                .filter_map(|m| m.comments.as_ref())
                                .map(|c| part_status(c.status))
                                .collect(),
                        );
                        entry.degraded = reply.degraded;
                        self.learn(reply.messages.into_iter().filter_map(|m| m.message.map(|m| m.id)));
                    })
            }
        };
        entry.ms = start.elapsed().as_secs_f64() * 1000.0;
        entry.degraded |= [entry.author, entry.comments]
            .iter()
            .flatten()
            .any(|s| *s == "UNAVAILABLE");
        if let Err(status) = outcome {
            entry.code = format!("{:?}", status.code());
            if status.code() == tonic::Code::Unauthenticated {
                // Expired or revoked: sign in again on the next tick.
                lock(&self.users).clear();
            }
        }
        entry
    }
}

/// Who a request is from, and the trace it starts.
struct Caller {
    token: String,
    traceparent: Option<String>,
}

impl Caller {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = with_deadline(message);
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(value) = self.traceparent.as_deref().and_then(|t| t.parse().ok()) {
            request.metadata_mut().insert("traceparent", value);
        }
        request
    }
}

fn with_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(DEADLINE);
    request
}

fn part_status(status: i32) -> &'static str {
    match m2::PartStatus::try_from(status) {
        Ok(m2::PartStatus::Ok) => "OK",
        Ok(m2::PartStatus::Unavailable) => "UNAVAILABLE",
        Ok(m2::PartStatus::NotFound) => "NOT_FOUND",
        _ => "UNSPECIFIED",
    }
}

/// A new sampled W3C trace context: (trace id, parent span id), as hex.
fn new_trace() -> (String, String) {
    let mut rng = rand::thread_rng();
    (
        format!("{:032x}", rng.gen::<u128>() | 1),
        format!("{:016x}", rng.gen::<u64>() | 1),
    )
}
