//! A ban of a user with 50,000 comments: the delivery that carries it
//! returns at once, and the worker purges the comments in bounded atomic
//! steps, each deletion with its event.

mod common;

use std::time::{Duration, Instant};

use chirp_proto::comment::v1 as pb;
use comment_service::{
    domain::{Body, Comment, MessageId, UserId},
    store::{
        keys::{Group, Keys},
        new_comment_id, value,
    },
};
use common::{Backing, TestApp};
use redis::AsyncCommands as _;
use service_kit::{
    auth::Role,
    events::{Event, Payload},
};

const COMMENTS: usize = 50_000;

/// `n` comments of `author` on `message`, written straight into Redis in
/// the service's data model (as years of commenting would have).
async fn seed(backing: &Backing, author: &str, message: &str, n: usize) {
    let keys = Keys::new(backing.prefix.prefix());
    let message = MessageId::parse("message", message).unwrap();
    let author = UserId::parse("author", author).unwrap();
    let group = Group::of_message(message);
    let mut redis = backing.connect();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        // One message's keys share a slot: one pipeline, on a cluster too.
        let mut pipe = redis::pipe();
        for i in chunk {
            let comment = Comment {
                id: new_comment_id(message),
                message_id: message,
                author_id: author,
                message_author_id: author,
                body: Body::parse(&format!("comment {i}")).unwrap(),
            };
            let id = comment.id.to_string();
            pipe.set(keys.comment(comment.id), value::encode(&comment))
                .ignore()
                .zadd(keys.message(message), &id, 0)
                .ignore()
                .sadd(keys.user(group, author), &id)
                .ignore();
        }
        pipe.query_async::<()>(&mut redis).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banning_a_user_with_fifty_thousand_comments_purges_them_in_steps_without_holding_delivery() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (troll, _) = backing.user(Role::User);
    let message = backing.message(&troll);
    seed(&backing, &troll, &message, COMMENTS).await;

    let token = backing
        .signer
        .service_token(chrono::Utc::now().timestamp(), Duration::from_secs(60))
        .unwrap();
    let banned = Event::new(
        "user-service",
        Payload::UserBanned {
            user_id: uuid::Uuid::parse_str(&troll).unwrap(),
            moderator_id: uuid::Uuid::new_v4(),
        },
    );
    let started = Instant::now();
    app.client()
        .apply_events(test_support::grpc::authed(
            pb::ApplyEventsRequest {
                events: vec![banned.to_pb()],
            },
            &token,
        ))
        .await
        .expect("ApplyEvents");
    let answered = started.elapsed();
    assert!(
        answered < Duration::from_secs(1),
        "the ban's delivery took {answered:?}"
    );

    let count = || {
        let mut client = app.client();
        let message = message.clone();
        async move {
            client
                .count_comments(pb::CountCommentsRequest {
                    message_ids: vec![message.clone()],
                })
                .await
                .unwrap()
                .into_inner()
                .counts
                .get(&message)
                .copied()
                .unwrap_or_default()
        }
    };
    while count().await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} comments left",
            count().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let purged = started.elapsed();
    let mut redis = backing.connect();
    // analytics-service is unreachable here: every deletion's event waits
    // (in the message's group's outbox).
    let group = Group::of_message(MessageId::parse("message", &message).unwrap());
    let events: usize = redis
        .xlen(Keys::new(backing.prefix.prefix()).outbox(group))
        .await
        .unwrap();
    println!(
        "ban of {COMMENTS} comments: delivery answered in {} ms; all purged after {:.1} s; {events} events",
        answered.as_millis(),
        purged.as_secs_f64()
    );
    assert_eq!(events, COMMENTS, "one CommentDeleted per comment");
}
