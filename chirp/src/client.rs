//! Client commands: a person's view of the mesh, one RPC (or a few) each.
//! Tables by default, `--json` for scripts.

use std::path::PathBuf;

use anyhow::Context as _;
use chirp_proto::{
    analytics::v1::{analytics_service_client::AnalyticsServiceClient, GetUserStatsRequest},
    comment::v1::{comment_service_client::CommentServiceClient, AddCommentRequest},
    message::{v1 as m1, v2 as m2},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use service_kit::client::PeerChannel;
use tonic::transport::Channel;

use crate::layout::{Part, Ports};

/// Where the token from `chirp login` is kept.
fn session_file() -> PathBuf {
    std::env::var_os("CHIRP_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::config_dir().map(|d| d.join("chirp")))
        .unwrap_or_else(|| std::env::temp_dir().join("chirp"))
        .join("session.json")
}

#[derive(Debug, Serialize, Deserialize)]
struct Session {
    username: String,
    user_id: String,
    token: String,
}

fn load_session() -> anyhow::Result<Session> {
    let text = std::fs::read_to_string(session_file()).context("not logged in: run `chirp login <username>` first")?;
    Ok(serde_json::from_str(&text)?)
}

const OK: &str = "PART_STATUS_OK";

/// A message as shown, whichever API version it came from: the two differ
/// only in how the time is written.
struct Shown {
    id: String,
    author_id: String,
    body: String,
    time: serde_json::Value,
    author_status: &'static str,
    username: String,
    comments_status: &'static str,
    count: i64,
    preview: Vec<String>,
}

macro_rules! shown_from {
    ($name:ident, $pb:ident) => {
        fn $name(e: &$pb::EnrichedMessage) -> Self {
            let status = |s: i32| $pb::PartStatus::try_from(s).map_or("?", |s| s.as_str_name());
            let m = e.message.clone().unwrap_or_default();
            let a = e.author.clone().unwrap_or_default();
            let c = e.comments.clone().unwrap_or_default();
            Self {
                id: m.id,
                author_id: m.author_id,
                body: m.body,
                time: json!(m.create_time),
                author_status: status(a.status),
                username: a.username,
                comments_status: status(c.status),
                count: c.count,
                preview: c.preview.into_iter().map(|p| p.body).collect(),
            }
        }
    };
}

impl Shown {
    shown_from!(from_v1, m1);
    shown_from!(from_v2, m2);
}

pub struct Client {
    ports: Ports,
    pub json: bool,
}

/// A channel to `part` that carries the command's trace context (when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, chirp's own spans are exported too).
fn channel(ports: Ports, part: Part) -> anyhow::Result<PeerChannel> {
    let channel = Channel::from_shared(ports.url(part))?
        .connect_timeout(std::time::Duration::from_secs(1))
        .timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    Ok(PeerChannel::new(channel, part.name()))
}

fn authed<T>(message: T) -> anyhow::Result<tonic::Request<T>> {
    let session = load_session()?;
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", session.token).parse()?);
    Ok(request)
}

/// Output: a JSON value for scripts, or rows for people.
fn show(json_mode: bool, value: &serde_json::Value, rows: &[Vec<String>]) {
    if json_mode {
        println!("{value}");
        return;
    }
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = if i + 1 == row.len() { 0 } else { widths[i] }))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

impl Client {
    #[must_use]
    pub fn new(ports: Ports, json: bool) -> Self {
        Self { ports, json }
    }

    fn users(&self) -> anyhow::Result<UserServiceClient<PeerChannel>> {
        Ok(UserServiceClient::new(channel(self.ports, Part::UserService)?))
    }

    pub async fn register(&self, username: &str, password: &str, display_name: Option<&str>) -> anyhow::Result<()> {
        let user = self
            .users()?
            .register(upb::RegisterRequest {
                username: username.into(),
                password: password.into(),
                display_name: display_name.unwrap_or_default().into(),
            })
            .await?
            .into_inner()
            .user
            .unwrap_or_default();
        show(
            self.json,
            &json!({"id": user.id, "username": user.username}),
            &[vec!["registered".into(), user.username, user.id]],
        );
        Ok(())
    }

    pub async fn login(&self, username: &str, password: &str) -> anyhow::Result<()> {
        let reply = self
            .users()?
            .login(upb::LoginRequest {
                username: username.into(),
                password: password.into(),
            })
            .await?
            .into_inner();
        let user = reply.user.unwrap_or_default();
        let session = Session {
            username: user.username.clone(),
            user_id: user.id.clone(),
            token: reply.access_token,
        };
        let file = session_file();
        if let Some(dir) = file.parent() {
            service_kit::files::private_dirs(dir)?;
        }
        // The token is a credential: never readable by others, not even
        // for a moment.
        service_kit::files::replace_private(&file, serde_json::to_string(&session)?.as_bytes())?;
        show(
            self.json,
            &json!({"user_id": user.id, "username": user.username}),
            &[vec!["logged in as".into(), user.username, user.id]],
        );
        Ok(())
    }

    pub async fn post(&self, body: &str) -> anyhow::Result<()> {
        let mut client =
            m2::message_service_client::MessageServiceClient::new(channel(self.ports, Part::MessageService)?);
        let message = client
            .post_message(authed(m2::PostMessageRequest { body: body.into() })?)
            .await?
            .into_inner()
            .message
            .unwrap_or_default();
        show(
            self.json,
            &json!({"id": message.id, "create_time": message.create_time}),
            &[vec!["posted".into(), message.id, message.create_time]],
        );
        Ok(())
    }

    pub async fn get(&self, id: &str, v1: bool) -> anyhow::Result<()> {
        let channel = channel(self.ports, Part::MessageService)?;
        if v1 {
            let reply = m1::message_service_client::MessageServiceClient::new(channel)
                .get_message(m1::GetMessageRequest { message_id: id.into() })
                .await?
                .into_inner()
                .message
                .unwrap_or_default();
            self.print_messages(&[Shown::from_v1(&reply)], None);
        } else {
            let reply = m2::message_service_client::MessageServiceClient::new(channel)
                .get_message(m2::GetMessageRequest { message_id: id.into() })
                .await?
                .into_inner()
                .message
                .unwrap_or_default();
            self.print_messages(&[Shown::from_v2(&reply)], None);
        }
        Ok(())
    }

    pub async fn timeline(&self, v1: bool, page_size: i32) -> anyhow::Result<()> {
        let channel = channel(self.ports, Part::MessageService)?;
        if v1 {
            let reply = m1::message_service_client::MessageServiceClient::new(channel)
                .home_timeline(authed(m1::HomeTimelineRequest {
                    page_size,
                    page_token: String::new(),
                })?)
                .await?
                .into_inner();
            let shown: Vec<Shown> = reply.messages.iter().map(Shown::from_v1).collect();
            self.print_messages(&shown, Some(reply.degraded));
        } else {
            let reply = m2::message_service_client::MessageServiceClient::new(channel)
                .home_timeline(authed(m2::HomeTimelineRequest {
                    page_size,
                    page_token: String::new(),
                })?)
                .await?
                .into_inner();
            let shown: Vec<Shown> = reply.messages.iter().map(Shown::from_v2).collect();
            self.print_messages(&shown, Some(reply.degraded));
        }
        Ok(())
    }

    /// Prints messages of either API version; `degraded` is the timeline's flag.
    fn print_messages(&self, messages: &[Shown], degraded: Option<bool>) {
        let value: Vec<_> = messages
            .iter()
            .map(|m| {
                json!({"id": m.id, "author_id": m.author_id, "body": m.body, "create_time": m.time,
                       "author": {"status": m.author_status, "username": m.username},
                       "comments": {"status": m.comments_status, "count": m.count, "preview": m.preview}})
            })
            .collect();
        if self.json {
            match degraded {
                Some(degraded) => println!("{}", json!({"messages": value, "degraded": degraded})),
                None => println!("{}", json!(value)),
            }
            return;
        }
        if degraded == Some(true) {
            println!("(degraded: the following list is stale or missing)");
        }
        let rows: Vec<Vec<String>> = messages
            .iter()
            .map(|m| {
                vec![
                    m.time.to_string().trim_matches('"').to_owned(),
                    if m.author_status == OK {
                        m.username.clone()
                    } else {
                        format!("[{}]", m.author_status)
                    },
                    if m.comments_status == OK {
                        format!("{} comments", m.count)
                    } else {
                        "[comments unavailable]".into()
                    },
                    m.id.clone(),
                    m.body.clone(),
                ]
            })
            .collect();
        show(false, &json!(null), &rows);
    }

    pub async fn comment(&self, message_id: &str, body: &str) -> anyhow::Result<()> {
        let comment = CommentServiceClient::new(channel(self.ports, Part::CommentService)?)
            .add_comment(authed(AddCommentRequest {
                message_id: message_id.into(),
                body: body.into(),
            })?)
            .await?
            .into_inner()
            .comment
            .unwrap_or_default();
        show(
            self.json,
            &json!({"id": comment.id}),
            &[vec!["commented".into(), comment.id]],
        );
        Ok(())
    }

    pub async fn follow(&self, user: &str) -> anyhow::Result<()> {
        let user_id = self.resolve(user).await?;
        self.users()?
            .follow(authed(upb::FollowRequest {
                user_id: user_id.clone(),
            })?)
            .await?;
        show(
            self.json,
            &json!({"followed": user_id}),
            &[vec!["following".into(), user.into(), user_id]],
        );
        Ok(())
    }

    pub async fn ban(&self, user: &str, reason: &str) -> anyhow::Result<()> {
        let user_id = self.resolve(user).await?;
        let banned = self
            .users()?
            .ban_user(authed(upb::BanUserRequest {
                user_id: user_id.clone(),
                reason: reason.into(),
            })?)
            .await?
            .into_inner()
            .user
            .unwrap_or_default();
        show(
            self.json,
            &json!({"banned": banned.id, "username": banned.username}),
            &[vec!["banned".into(), banned.username, banned.id]],
        );
        Ok(())
    }

    pub async fn stats(&self, user: Option<&str>) -> anyhow::Result<()> {
        let user_id = match user {
            Some(user) => self.resolve(user).await?,
            None => load_session()?.user_id,
        };
        let stats = AnalyticsServiceClient::new(channel(self.ports, Part::AnalyticsService)?)
            .get_user_stats(authed(GetUserStatsRequest {
                user_id: user_id.clone(),
            })?)
            .await?
            .into_inner();
        show(
            self.json,
            &json!({"user_id": user_id, "messages": stats.message_count, "comments": stats.comment_count,
                    "followers": stats.follower_count, "following": stats.following_count,
                    "comments_received": stats.comments_received_count}),
            &[
                vec!["messages".into(), stats.message_count.to_string()],
                vec!["comments".into(), stats.comment_count.to_string()],
                vec!["followers".into(), stats.follower_count.to_string()],
                vec!["following".into(), stats.following_count.to_string()],
                vec!["comments received".into(), stats.comments_received_count.to_string()],
            ],
        );
        Ok(())
    }

    /// A user id as given, or the id of the user the session follows by
    /// that username (found among whom the session's user follows, or the
    /// session's own).
    async fn resolve(&self, user: &str) -> anyhow::Result<String> {
        if uuid::Uuid::try_parse(user).is_ok() {
            return Ok(user.to_owned());
        }
        let session = load_session()?;
        if session.username == user {
            return Ok(session.user_id);
        }
        let mut client = self.users()?;
        for list in [true, false] {
            let users = if list {
                client
                    .list_following(upb::ListFollowingRequest {
                        user_id: session.user_id.clone(),
                        page_size: 100,
                        page_token: String::new(),
                    })
                    .await?
                    .into_inner()
                    .users
            } else {
                client
                    .list_followers(upb::ListFollowersRequest {
                        user_id: session.user_id.clone(),
                        page_size: 100,
                        page_token: String::new(),
                    })
                    .await?
                    .into_inner()
                    .users
            };
            if let Some(found) = users.into_iter().find(|u| u.username == user) {
                return Ok(found.id);
            }
        }
        anyhow::bail!("`{user}` is not a user id, and not someone you follow or who follows you")
    }
}
