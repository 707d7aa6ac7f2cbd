//! A client of the whole mesh for the tests that replace a store under
//! it: writes that retry as a client would, and a watcher that calls every
//! service but one and records what came back.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use chirp_proto::{
    analytics::v1::{analytics_service_client::AnalyticsServiceClient, GetUserStatsRequest},
    comment::v1::{comment_service_client::CommentServiceClient, AddCommentRequest, CountCommentsRequest},
    message::v2::{self as m2, message_service_client::MessageServiceClient},
    user::v1::{user_service_client::UserServiceClient, GetUserRequest, LoginRequest, RegisterRequest},
};
use test_support::grpc::authed;
use tonic::transport::Channel;

use super::Up;

pub const PASSWORD: &str = "backup-test-password";

pub struct World {
    pub users: Channel,
    pub messages: Channel,
    pub comments: Channel,
    pub analytics: Channel,
    pub token: String,
    pub user_id: String,
}

impl World {
    pub fn new(up: &Up) -> Self {
        Self {
            users: up.channel(1),
            messages: up.channel(2),
            comments: up.channel(3),
            analytics: up.channel(4),
            token: String::new(),
            user_id: String::new(),
        }
    }

    pub async fn register(&self, username: &str) -> String {
        UserServiceClient::new(self.users.clone())
            .register(RegisterRequest {
                username: username.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
            })
            .await
            .expect("register")
            .into_inner()
            .user
            .unwrap()
            .id
    }

    pub async fn login(&mut self, username: &str) {
        let reply = UserServiceClient::new(self.users.clone())
            .login(LoginRequest {
                username: username.into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("login")
            .into_inner();
        self.token = reply.access_token;
        self.user_id = reply.user.unwrap().id;
    }

    pub async fn post(&self, body: String) -> String {
        let client = MessageServiceClient::new(self.messages.clone());
        retrying("post", || {
            let mut client = client.clone();
            let request = authed(m2::PostMessageRequest { body: body.clone() }, &self.token);
            async move { client.post_message(request).await }
        })
        .await
        .into_inner()
        .message
        .unwrap()
        .id
    }

    pub async fn comment(&self, message_id: &str, body: String) {
        let client = CommentServiceClient::new(self.comments.clone());
        retrying("comment", || {
            let mut client = client.clone();
            let request = authed(
                AddCommentRequest {
                    message_id: message_id.into(),
                    body: body.clone(),
                },
                &self.token,
            );
            async move { client.add_comment(request).await }
        })
        .await;
    }

    pub async fn get(&self, message_id: &str) -> Result<m2::EnrichedMessage, tonic::Status> {
        MessageServiceClient::new(self.messages.clone())
            .get_message(m2::GetMessageRequest {
                message_id: message_id.into(),
            })
            .await
            .map(|r| r.into_inner().message.unwrap_or_default())
    }

    pub async fn comment_count(&self, message_id: &str) -> i64 {
        let reply = CommentServiceClient::new(self.comments.clone())
            .count_comments(CountCommentsRequest {
                message_ids: vec![message_id.into()],
            })
            .await
            .expect("count")
            .into_inner();
        reply.counts.get(message_id).copied().unwrap_or(0)
    }

    pub async fn messages_posted(&self) -> i64 {
        AnalyticsServiceClient::new(self.analytics.clone())
            .get_user_stats(authed(
                GetUserStatsRequest {
                    user_id: self.user_id.clone(),
                },
                &self.token,
            ))
            .await
            .expect("stats")
            .into_inner()
            .message_count
    }
}

/// A write, sent again after UNAVAILABLE (a peer too slow on a loaded
/// machine), as a client would, a few times.
pub async fn retrying<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for attempt in 1.. {
        match call().await {
            Ok(reply) => return reply,
            Err(status) if status.code() == tonic::Code::Unavailable && attempt < 5 => {
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(status) => panic!("{what}: {status:?}"),
        }
    }
    unreachable!()
}

/// Posts `n` messages and one comment on each, eight at a time.
pub async fn write(world: &Arc<World>, n: usize, tag: &str) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
        let posts = chunk.iter().map(|i| {
            let world = world.clone();
            let body = format!("{tag} message {i}");
            async move {
                let id = world.post(body).await;
                world.comment(&id, format!("{tag} comment on {id}")).await;
                id
            }
        });
        ids.extend(futures::future::join_all(posts).await);
    }
    ids
}

/// Calls every service but `restoring` until stopped: what failed, and what
/// came back degraded (by part), as seen.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    pub fn start(world: &Arc<World>, restoring: &'static str, message_id: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(Mutex::new(0));
        let (world, stop2, seen2, calls2) = (world.clone(), stop.clone(), seen.clone(), calls.clone());
        let task = tokio::spawn(async move {
            while !stop2.load(Ordering::Relaxed) {
                let mut outcomes: Vec<String> = Vec::new();
                if restoring != "user-service" {
                    let r = UserServiceClient::new(world.users.clone())
                        .get_user(GetUserRequest {
                            user_id: world.user_id.clone(),
                        })
                        .await;
                    outcomes.push(format!("GetUser {}", code(&r)));
                }
                if restoring != "message-service" {
                    let r = world.get(&message_id).await;
                    let mut outcome = format!("GetMessage {}", code(&r));
                    if let Ok(m) = &r {
                        let unavailable = m2::PartStatus::Unavailable as i32;
                        if m.author.as_ref().is_some_and(|a| a.status == unavailable) {
                            outcome.push_str(" author-unavailable");
                        }
                        if m.comments.as_ref().is_some_and(|c| c.status == unavailable) {
                            outcome.push_str(" comments-unavailable");
                        }
                    }
                    outcomes.push(outcome);
                }
                if restoring != "comment-service" {
                    let r = CommentServiceClient::new(world.comments.clone())
                        .count_comments(CountCommentsRequest {
                            message_ids: vec![message_id.clone()],
                        })
                        .await;
                    outcomes.push(format!("CountComments {}", code(&r)));
                }
                if restoring != "analytics-service" {
                    let r = AnalyticsServiceClient::new(world.analytics.clone())
                        .get_user_stats(authed(
                            GetUserStatsRequest {
                                user_id: world.user_id.clone(),
                            },
                            &world.token,
                        ))
                        .await;
                    outcomes.push(format!("GetUserStats {}", code(&r)));
                }
                *calls2.lock().unwrap() += outcomes.len() as u64;
                seen2.lock().unwrap().extend(outcomes);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self {
            stop,
            seen,
            calls,
            task,
        }
    }

    /// Waits until `more` calls beyond those made so far are answered
    /// (bounded), so that the watch covers a moment however slow the
    /// machine.
    pub async fn calls(&self, more: u64) {
        let until = *self.calls.lock().unwrap() + more;
        test_support::eventually("the watcher's calls", Duration::from_secs(30), || {
            *self.calls.lock().unwrap() >= until
        })
        .await;
    }

    /// Stops; the distinct outcomes with their counts, and the calls made.
    pub async fn finish(self) -> (Vec<(String, usize)>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let seen = self.seen.lock().unwrap().clone();
        let mut distinct: Vec<(String, usize)> = Vec::new();
        for outcome in seen {
            match distinct.iter_mut().find(|(o, _)| *o == outcome) {
                Some((_, n)) => *n += 1,
                None => distinct.push((outcome, 1)),
            }
        }
        (distinct, *self.calls.lock().unwrap())
    }
}

pub fn code<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(status) => format!("{:?}", status.code()),
    }
}

/// What a restore may cost the others: the restored service's own parts
/// in their replies, degraded as when its store is down.
pub fn allowed(restoring: &str, outcome: &str) -> bool {
    match outcome {
        o if o.ends_with(" ok") => true,
        "GetMessage ok author-unavailable" => restoring == "user-service",
        "GetMessage ok comments-unavailable" => restoring == "comment-service",
        _ => false,
    }
}
