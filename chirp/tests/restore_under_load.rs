//! `chirp restore` of each service while writes keep coming to every
//! replica (two of message-service and of comment-service) and `chirp load`
//! runs: every replica stops writing before the data is replaced (no write
//! is acknowledged between the moment all replicas said NOT_SERVING and
//! the end of the switch), every write acknowledged after the switch is
//! there afterwards, every replica serves again, and the other services
//! answer throughout with only the degraded parts the fault-isolation
//! matrix documents.
//!
//! Writes acknowledged after the backup and before the restore began are
//! gone by design: a restore returns the store to the backup moment.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use chirp_proto::{
    analytics::v1::{analytics_service_client::AnalyticsServiceClient, GetUserStatsRequest, RecordEventsRequest},
    comment::v1::{comment_service_client::CommentServiceClient, AddCommentRequest, ListCommentsRequest},
    message::v2::{self as m2, message_service_client::MessageServiceClient},
    user::v1::{user_service_client::UserServiceClient, GetUserRequest, RegisterRequest},
};
use chrono::{DateTime, Utc};
use common::{
    free_port_base,
    world::{allowed, Watcher, World, PASSWORD},
    Up,
};
use serde_json::Value;
use service_kit::events::{Event, Payload};
use test_support::grpc::authed;
use tonic::transport::Channel;

/// Offsets of a service's replicas' gRPC ports from the port base.
fn replica_offsets(service: &str) -> Vec<u16> {
    match service {
        "user-service" => vec![1],
        "message-service" => vec![2, 102],
        "comment-service" => vec![3, 103],
        _ => vec![4],
    }
}

#[derive(Clone, Debug)]
struct Ack {
    id: String,
    at: DateTime<Utc>,
    replica: usize,
}

/// Writes to every replica of one service, as fast as they answer.
struct Writer {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    refused: Arc<Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(up: &Up, world: &Arc<World>, service: &'static str, home: String, ingest_token: String) -> Self {
        let channels: Vec<Channel> = replica_offsets(service).into_iter().map(|o| up.channel(o)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(BTreeMap::new()));
        let (stop2, acks2, refused2, world) = (stop.clone(), acks.clone(), refused.clone(), world.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                for (replica, channel) in channels.iter().enumerate() {
                    n += 1;
                    let written = write_one(service, channel.clone(), &world, &home, &ingest_token, n).await;
                    match written {
                        Ok(id) => acks2.lock().unwrap().push(Ack {
                            id,
                            at: Utc::now(),
                            replica: replica + 1,
                        }),
                        Err(status) => {
                            *refused2
                                .lock()
                                .unwrap()
                                .entry(format!("{:?}", status.code()))
                                .or_default() += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Self {
            stop,
            acks,
            refused,
            task,
        }
    }

    fn acknowledged(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    async fn finish(self) -> (Vec<Ack>, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let acks = self.acks.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        (acks, refused)
    }
}

fn deadline<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    request.set_timeout(Duration::from_secs(2));
    request
}

/// One write to `service` on `channel`: what identifies it afterwards.
async fn write_one(
    service: &str,
    channel: Channel,
    world: &World,
    home: &str,
    ingest_token: &str,
    n: u64,
) -> Result<String, tonic::Status> {
    match service {
        "message-service" => Ok(MessageServiceClient::new(channel)
            .post_message(deadline(authed(
                m2::PostMessageRequest {
                    body: format!("under load {n}"),
                },
                &world.token,
            )))
            .await?
            .into_inner()
            .message
            .unwrap_or_default()
            .id),
        "comment-service" => Ok(CommentServiceClient::new(channel)
            .add_comment(deadline(authed(
                AddCommentRequest {
                    message_id: home.to_owned(),
                    body: format!("under load {n}"),
                },
                &world.token,
            )))
            .await?
            .into_inner()
            .comment
            .unwrap_or_default()
            .id),
        "user-service" => Ok(UserServiceClient::new(channel)
            .register(deadline(tonic::Request::new(RegisterRequest {
                username: format!(
                    "load_{n}_{}",
                    uuid::Uuid::new_v4().simple().to_string().get(..6).unwrap_or("x")
                ),
                password: PASSWORD.into(),
                display_name: String::new(),
            })))
            .await?
            .into_inner()
            .user
            .unwrap_or_default()
            .id),
        _ => {
            // As a producer would: a follow of a fresh user, whose follower
            // count then tells whether the event is there.
            let followee = uuid::Uuid::new_v4();
            let event = Event::new(
                "restore-test",
                Payload::UserFollowed {
                    follower_id: uuid::Uuid::new_v4(),
                    followee_id: followee,
                },
            );
            let mut request = deadline(tonic::Request::new(RecordEventsRequest {
                events: vec![event.to_pb()],
            }));
            request
                .metadata_mut()
                .insert("x-chirp-ingest-token", ingest_token.parse().unwrap());
            AnalyticsServiceClient::new(channel).record_events(request).await?;
            Ok(followee.to_string())
        }
    }
}

/// Whether the write `id` of `service` is in its store now.
async fn present(up: &Up, world: &World, service: &str, home: &str, comments: &[String], id: &str) -> bool {
    match service {
        "message-service" => MessageServiceClient::new(up.channel(2))
            .get_message(m2::GetMessageRequest { message_id: id.into() })
            .await
            .is_ok(),
        "comment-service" => comments.iter().any(|c| c == id) && !home.is_empty(),
        "user-service" => UserServiceClient::new(up.channel(1))
            .get_user(GetUserRequest { user_id: id.into() })
            .await
            .is_ok(),
        _ => AnalyticsServiceClient::new(up.channel(4))
            .get_user_stats(authed(GetUserStatsRequest { user_id: id.into() }, &world.token))
            .await
            .is_ok_and(|r| r.into_inner().follower_count == 1),
    }
}

async fn all_comment_ids(up: &Up, message: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = CommentServiceClient::new(up.channel(3))
            .list_comments(ListCommentsRequest {
                message_id: message.into(),
                page_size: 100,
                page_token,
            })
            .await
            .expect("ListComments")
            .into_inner();
        ids.extend(page.comments.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

fn at(report: &Value, field: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(
        report[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {report}")),
    )
    .unwrap()
    .with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_stops_writing_for_a_restore_and_nothing_acknowledged_after_it_is_lost() {
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let up = Up::start_with(
        data.path(),
        free_port_base(),
        &["--no-seed", "--replicas", "message-service=2,comment-service=2"],
    );
    let mut world = World::new(&up);
    world.register("restore_load").await;
    world.login("restore_load").await;
    let world = Arc::new(world);
    let home = world.post("the message the comments go to".into()).await;
    let probe = world.post("the message the watcher reads".into()).await;
    world.comment(&probe, "so it has a comment".into()).await;
    let ingest_token = std::fs::read_to_string(data.path().join("keys").join("ingest-token"))
        .unwrap()
        .trim()
        .to_owned();
    test_support::eventually("the mesh settles", Duration::from_secs(60), || {
        common::settled(&up.status())
    })
    .await;

    let (code, out) = up.run(&["--json", "backup", "all"]);
    assert_eq!(code, 0, "{out}");
    let backups: Value = serde_json::from_str(out.trim()).unwrap();
    let (code, out) = up.run(&["load", "start", "--rate", "20"]);
    assert_eq!(code, 0, "{out}");

    for service in [
        "message-service",
        "comment-service",
        "user-service",
        "analytics-service",
    ] {
        let dir = backups
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["service"] == service)
            .and_then(|b| b["dir"].as_str())
            .unwrap()
            .to_owned();
        let writer = Writer::start(&up, &world, service, home.clone(), ingest_token.clone());
        test_support::eventually("writes before the restore", Duration::from_secs(30), || {
            writer.acknowledged() >= 20
        })
        .await;
        let watcher = Watcher::start(&world, service, probe.clone());
        watcher.calls(9).await;
        let (code, out) = up.run(&["--json", "restore", service, &dir]);
        assert_eq!(code, 0, "{out}");
        let after_restore = writer.acknowledged();
        test_support::eventually("writes after the restore", Duration::from_secs(30), || {
            writer.acknowledged() >= after_restore + 20
        })
        .await;
        watcher.calls(9).await;
        let (acks, refused) = writer.finish().await;
        let (outcomes, calls) = watcher.finish().await;
        let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        let (down, switched) = (at(&report, "all_not_serving_at"), at(&report, "switched_at"));

        let during: Vec<&Ack> = acks.iter().filter(|a| a.at > down && a.at <= switched).collect();
        let later: Vec<&Ack> = acks.iter().filter(|a| a.at > switched).collect();
        let before = acks.len() - during.len() - later.len();
        let comments = if service == "comment-service" {
            all_comment_ids(&up, &home).await
        } else {
            Vec::new()
        };
        let mut kept = 0;
        let mut lost = Vec::new();
        for ack in &later {
            if present(&up, &world, service, &home, &comments, &ack.id).await {
                kept += 1;
            } else {
                lost.push((*ack).clone());
            }
        }
        let windows: Vec<String> = report["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} NOT_SERVING {:.2} s",
                    r["replica"].as_str().unwrap(),
                    r["not_serving_seconds"]
                )
            })
            .collect();
        let by_replica = |r: usize| later.iter().filter(|a| a.replica == r).count();
        println!(
            "{service}: restored in {:.2} s; {} writes acknowledged: {before} before the restore's maintenance \
             (after the backup: gone by design), {} while every replica was out, {kept}/{} after the switch present \
             afterwards (by replica: {} and {}); refused during maintenance: {refused:?}; {windows:?}; \
             {calls} calls to the others: {outcomes:?}",
            report["seconds"].as_f64().unwrap_or_default(),
            acks.len(),
            during.len(),
            later.len(),
            by_replica(1),
            by_replica(2),
        );
        assert!(
            during.is_empty(),
            "{service}: writes acknowledged while its data was replaced: {during:?}"
        );
        assert!(
            lost.is_empty(),
            "{service}: writes acknowledged after the restore are gone: {lost:?}"
        );
        assert!(later.len() >= 20);
        assert_eq!(
            report["replicas"].as_array().unwrap().len(),
            replica_offsets(service).len(),
            "every replica took part"
        );
        for offset in replica_offsets(service) {
            assert_eq!(
                test_support::grpc::health(&up.channel(offset), up_service(service)).await,
                Some(tonic_health::pb::health_check_response::ServingStatus::Serving),
                "{service} (port offset {offset}) serves again"
            );
        }
        let unexpected: Vec<&(String, usize)> = outcomes.iter().filter(|(o, _)| !allowed(service, o)).collect();
        assert!(
            unexpected.is_empty(),
            "restoring {service} cost the others: {unexpected:?}"
        );
        let (code, out) = up.run(&["restore", service, "--confirm"]);
        assert_eq!(code, 0, "{out}");
    }
    up.run(&["load", "stop"]);
    up.stop();
}

fn up_service(service: &str) -> &'static str {
    match service {
        "user-service" => "chirp.user.v1.UserService",
        "message-service" => "chirp.message.v1.MessageService",
        "comment-service" => "chirp.comment.v1.CommentService",
        _ => "chirp.analytics.v1.AnalyticsService",
    }
}
