//! ARCHITECTURE.md invariant 5 across the mesh: every acknowledged write's event
//! reaches analytics-service exactly once in effect, through an outage of
//! analytics-service, and a ban reaches the services holding the banned
//! user's content once they are back.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use chirp_mesh_tests::{Mesh, Service};
use chirp_proto::{analytics::v1 as apb, comment::v1 as cpb, message::v1 as mpb, user::v1 as upb};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use test_support::grpc::authed;

/// What the test saw acknowledged, counted the way analytics counts.
#[derive(Default)]
struct Truth {
    users: HashMap<String, [i64; 5]>,
    messages: HashMap<String, (String, i64)>,
}

const MESSAGES: usize = 0;
const COMMENTS: usize = 1;
const FOLLOWERS: usize = 2;
const FOLLOWING: usize = 3;
const RECEIVED: usize = 4;

impl Truth {
    fn bump(&mut self, user: &str, counter: usize, delta: i64) {
        self.users.entry(user.to_owned()).or_default()[counter] += delta;
    }
}

struct Person {
    id: String,
    token: String,
    messages: Vec<String>,
    comments: Vec<(String, String)>,
}

#[tokio::test]
async fn every_acknowledged_write_is_counted_exactly_once_through_an_analytics_outage() {
    const WRITES: usize = 1_200;
    const OUTAGE: std::ops::Range<usize> = 300..800;

    let mut mesh = Mesh::start().await;
    let mut rng = StdRng::seed_from_u64(20261125);
    let mut truth = Truth::default();
    let mut people = Vec::new();
    for i in 0..12 {
        let (id, token) = mesh.user(&format!("writer_{i:02}")).await;
        truth.bump(&id, MESSAGES, 0);
        people.push(Person {
            id,
            token,
            messages: Vec::new(),
            comments: Vec::new(),
        });
    }
    let mut follows: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut all_messages: Vec<(String, String)> = Vec::new(); // (message, author)
    let mut outage_started = None;
    let mut outage_length = Duration::ZERO;
    let mut acknowledged = 0usize;

    for step in 0..WRITES {
        if step == OUTAGE.start {
            mesh.stop(Service::Analytics).await;
            outage_started = Some(Instant::now());
        }
        if step == OUTAGE.end {
            mesh.restart(Service::Analytics).await;
            outage_length = outage_started.map(|t| t.elapsed()).unwrap_or_default();
        }
        let who = rng.gen_range(0..people.len());
        match rng.gen_range(0..10) {
            0 | 1 => {
                let whom = rng.gen_range(0..people.len());
                if whom == who || follows.contains(&(who, whom)) {
                    continue;
                }
                mesh.follow(&people[who].token, &people[whom].id).await;
                follows.insert((who, whom));
                truth.bump(&people[who].id, FOLLOWING, 1);
                truth.bump(&people[whom].id, FOLLOWERS, 1);
            }
            2 => {
                let Some(&(a, b)) = follows.iter().nth(rng.gen_range(0..follows.len().max(1))) else {
                    continue;
                };
                mesh.users()
                    .unfollow(authed(
                        upb::UnfollowRequest {
                            user_id: people[b].id.clone(),
                        },
                        &people[a].token,
                    ))
                    .await
                    .unwrap();
                follows.remove(&(a, b));
                truth.bump(&people[a].id, FOLLOWING, -1);
                truth.bump(&people[b].id, FOLLOWERS, -1);
            }
            3..=5 => {
                let posted = mesh
                    .messages_v1()
                    .post_message(authed(
                        mpb::PostMessageRequest {
                            body: format!("step {step}"),
                        },
                        &people[who].token,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .message
                    .unwrap();
                truth.bump(&people[who].id, MESSAGES, 1);
                truth.messages.insert(posted.id.clone(), (people[who].id.clone(), 0));
                people[who].messages.push(posted.id.clone());
                all_messages.push((posted.id, people[who].id.clone()));
            }
            6 => {
                if people[who].messages.is_empty() {
                    continue;
                }
                let i = rng.gen_range(0..people[who].messages.len());
                let message = people[who].messages.swap_remove(i);
                mesh.messages_v1()
                    .delete_message(authed(
                        mpb::DeleteMessageRequest {
                            message_id: message.clone(),
                        },
                        &people[who].token,
                    ))
                    .await
                    .unwrap();
                truth.bump(&people[who].id, MESSAGES, -1);
                all_messages.retain(|(m, _)| *m != message);
                // Its comments go with it (comment-service purges them when
                // the deletion reaches it), each counted down like a deletion.
                let author = people[who].id.clone();
                for person in &mut people {
                    let (gone, kept) = person.comments.drain(..).partition(|(_, m)| *m == message);
                    person.comments = kept;
                    let gone: Vec<(String, String)> = gone;
                    let n = i64::try_from(gone.len()).unwrap();
                    truth.bump(&person.id, COMMENTS, -n);
                    truth.bump(&author, RECEIVED, -n);
                }
                if let Some(entry) = truth.messages.get_mut(&message) {
                    entry.1 = 0;
                }
            }
            7 | 8 => {
                if all_messages.is_empty() {
                    continue;
                }
                let (message, author) = all_messages[rng.gen_range(0..all_messages.len())].clone();
                let comment = mesh
                    .comments()
                    .add_comment(authed(
                        cpb::AddCommentRequest {
                            message_id: message.clone(),
                            body: format!("comment {step}"),
                        },
                        &people[who].token,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .comment
                    .unwrap();
                truth.bump(&people[who].id, COMMENTS, 1);
                truth.bump(&author, RECEIVED, 1);
                truth.messages.entry(message.clone()).or_insert((author.clone(), 0)).1 += 1;
                people[who].comments.push((comment.id, message));
            }
            _ => {
                if people[who].comments.is_empty() {
                    continue;
                }
                let i = rng.gen_range(0..people[who].comments.len());
                let (comment, message) = people[who].comments.swap_remove(i);
                mesh.comments()
                    .delete_comment(authed(
                        cpb::DeleteCommentRequest { comment_id: comment },
                        &people[who].token,
                    ))
                    .await
                    .unwrap();
                let author = truth.messages[&message].0.clone();
                truth.bump(&people[who].id, COMMENTS, -1);
                truth.bump(&author, RECEIVED, -1);
                truth.messages.get_mut(&message).unwrap().1 -= 1;
            }
        }
        acknowledged += 1;
    }
    assert!(acknowledged >= 1_000, "only {acknowledged} writes");

    // Converge: the relays drain their outboxes into the restarted service.
    let reader = mesh.login(&format!("writer_{:02}", 0)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut lost, mut doubled);
    loop {
        (lost, doubled) = (0i64, 0i64);
        for (user, expected) in &truth.users {
            let got = mesh
                .analytics()
                .get_user_stats(authed(apb::GetUserStatsRequest { user_id: user.clone() }, &reader))
                .await
                .unwrap()
                .into_inner();
            let got = [
                got.message_count,
                got.comment_count,
                got.follower_count,
                got.following_count,
                got.comments_received_count,
            ];
            for (g, e) in got.iter().zip(expected) {
                lost += (e - g).max(0);
                doubled += (g - e).max(0);
            }
        }
        if (lost, doubled) == (0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s: {lost} counts missing, {doubled} counted twice"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (message, (author, comments)) in &truth.messages {
        let got = mesh
            .analytics()
            .get_message_stats(authed(
                apb::GetMessageStatsRequest {
                    message_id: message.clone(),
                },
                &reader,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (&got.author_id, got.comment_count),
            (author, *comments),
            "message {message}"
        );
    }

    // Deliver every stored event a second time, as relays that died between
    // delivering and marking would: nothing may change.
    let recorded = resend_everything(&mesh).await;
    println!(
        "exactness: {acknowledged} acknowledged writes ({} events), analytics down for {} writes ({:.1} s); \
         {lost} lost, {doubled} double-counted; {recorded} events redelivered, all deduplicated",
        recorded,
        OUTAGE.len(),
        outage_length.as_secs_f64()
    );
    for (user, expected) in &truth.users {
        let got = mesh
            .analytics()
            .get_user_stats(authed(apb::GetUserStatsRequest { user_id: user.clone() }, &reader))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            [
                got.message_count,
                got.comment_count,
                got.follower_count,
                got.following_count,
                got.comments_received_count
            ],
            *expected,
            "user {user} after redelivery"
        );
    }
}

/// Reads every event analytics stored and records them all again; returns
/// how many, after checking each came back a duplicate.
async fn resend_everything(mesh: &Mesh) -> usize {
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(&mesh.analytics_url()).await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar("SELECT payload FROM events ORDER BY occurred_at")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for chunk in stored.chunks(500) {
        let events = chunk
            .iter()
            .map(|json| service_kit::events::Event::from_json(json).unwrap().to_pb())
            .collect();
        let mut request = tonic::Request::new(apb::RecordEventsRequest { events });
        request
            .metadata_mut()
            .insert("x-chirp-ingest-token", mesh.ingest_token().parse().unwrap());
        let reply = mesh.analytics().record_events(request).await.unwrap().into_inner();
        assert_eq!(
            (reply.accepted_count, reply.duplicate_count),
            (0, chunk.len() as i64),
            "a redelivered event was applied again"
        );
    }
    stored.len()
}

#[tokio::test]
async fn a_ban_issued_while_comment_service_is_down_purges_once_it_is_back() {
    let mut mesh = Mesh::start().await;
    let (troll, troll_token) = mesh.user("troll").await;
    let (_, friend_token) = mesh.user("friend").await;
    let (_, moderator) = mesh.moderator("moe").await;
    let target = mesh
        .messages_v1()
        .post_message(authed(
            mpb::PostMessageRequest {
                body: "a good post".into(),
            },
            &friend_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    for body in ["spam one", "spam two", "spam three"] {
        mesh.comments()
            .add_comment(authed(
                cpb::AddCommentRequest {
                    message_id: target.id.clone(),
                    body: body.into(),
                },
                &troll_token,
            ))
            .await
            .unwrap();
    }
    mesh.comments()
        .add_comment(authed(
            cpb::AddCommentRequest {
                message_id: target.id.clone(),
                body: "a real comment".into(),
            },
            &friend_token,
        ))
        .await
        .unwrap();
    for body in ["troll post 1", "troll post 2"] {
        mesh.messages_v1()
            .post_message(authed(mpb::PostMessageRequest { body: body.into() }, &troll_token))
            .await
            .unwrap();
    }

    mesh.stop(Service::Comment).await;
    mesh.users()
        .ban_user(authed(
            upb::BanUserRequest {
                user_id: troll.clone(),
                reason: "spam".into(),
            },
            &moderator,
        ))
        .await
        .expect("the ban is acknowledged while comment-service is down");

    // message-service is up: the troll's messages disappear promptly.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = mesh
            .messages_v1()
            .list_user_messages(mpb::ListUserMessagesRequest {
                user_id: troll.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if listed.messages.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the troll's messages are still visible after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Keep comment-service down a while: the purge waits in the outbox.
    tokio::time::sleep(Duration::from_secs(2)).await;
    mesh.restart(Service::Comment).await;
    let back = Instant::now();
    loop {
        let bodies: Vec<String> = mesh
            .comments()
            .list_comments(cpb::ListCommentsRequest {
                message_id: target.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .comments
            .into_iter()
            .map(|c| c.body)
            .collect();
        if bodies == ["a real comment"] {
            println!(
                "ban-while-down: comments purged {:.2} s after comment-service returned",
                back.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "still {bodies:?} 5 s after comment-service returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
