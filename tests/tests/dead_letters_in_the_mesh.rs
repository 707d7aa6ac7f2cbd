//! A poison event never blocks a relay: in each of the six outboxes (three
//! in user-service's PostgreSQL, two in message-service's MongoDB, one in
//! comment-service's Redis), an event its consumer rejects and an entry the
//! producer cannot read are set aside in that store's dead letters with the
//! reason, and the events written after them are delivered. Sent back with
//! a retry, they are set aside again, and nothing else moves.

use std::time::{Duration, Instant};

use chirp_mesh_tests::Mesh;
use chirp_proto::{analytics::v1 as apb, comment::v1 as cpb, message::v1 as mpb, user::v1 as upb};
use comment_service::store::keys::{Group, Keys};
use mongodb::bson::{doc, DateTime as BsonDateTime, Document};
use redis::AsyncCommands as _;
use service_kit::{
    events::{Event, Payload},
    relay::{DeadLetter, Outbox},
    store::StoreStatus,
};
use test_support::grpc::authed;
use uuid::Uuid;

/// An event every consumer rejects: its producer is empty.
fn rejected_event() -> String {
    Event::new(
        "",
        Payload::UserRegistered {
            user_id: Uuid::new_v4(),
        },
    )
    .to_json()
    .expect("json")
}

/// Stored text no version of Chirp reads as an event.
const UNREADABLE: &str = r#"{"written_by":"a future version"}"#;

/// Waits until `outbox` has nothing waiting and two dead letters; returns
/// them.
async fn settled<O: Outbox>(name: &str, outbox: &O) -> Vec<DeadLetter> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let backlog = outbox.backlog().await.expect("the outbox's backlog");
        if backlog.depth == 0 && backlog.dead_letters == 2 {
            return outbox.dead_letters(10).await.expect("the dead letters");
        }
        assert!(Instant::now() < deadline, "{name}: {backlog:?} after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One rejected by the consumer, naming the field; one unreadable here.
fn assert_reasons(name: &str, letters: &[DeadLetter]) {
    let mut reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    reasons.sort_unstable();
    assert!(
        reasons[0].starts_with("events[") && reasons[0].ends_with("].producer: must not be empty"),
        "{name}: {reasons:?}"
    );
    assert!(
        reasons[1].starts_with("unreadable in the outbox: "),
        "{name}: {reasons:?}"
    );
}

/// Polls `check` for up to 30 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_poison_event_in_any_outbox_is_set_aside_and_the_events_behind_it_are_delivered() {
    let mesh = Mesh::start().await;
    let (alice, alice_token) = mesh.user("alice").await;
    let (bob, bob_token) = mesh.user("bob").await;
    let (moe, moe_token) = mesh.moderator("moe").await;

    // The poison, written straight into each store, ahead of what follows.
    let pg = sqlx::PgPool::connect(mesh.user_store()).await.expect("PostgreSQL");
    for destination in ["analytics", "comments", "messages"] {
        for text in [rejected_event(), UNREADABLE.to_owned()] {
            sqlx::query("INSERT INTO outbox (destination, event_id, event, occurred_at) VALUES ($1, $2, $3, now())")
                .bind(destination)
                .bind(Uuid::now_v7())
                .bind(text)
                .execute(&pg)
                .await
                .expect("a poisoned outbox row");
        }
    }
    let (mongo_uri, mongo_db) = mesh.message_store();
    let mongo = mongodb::Client::with_uri_str(mongo_uri).await.expect("MongoDB");
    let mongo_outbox = mongo.database(mongo_db).collection::<Document>("outbox");
    for destination in ["analytics", "comments"] {
        for text in [rejected_event(), UNREADABLE.to_owned()] {
            mongo_outbox
                .insert_one(doc! {
                    "_id": format!("{destination}:{}", Uuid::now_v7()),
                    "destination": destination,
                    "event": text,
                    "occurred_at": BsonDateTime::now(),
                })
                .await
                .expect("a poisoned outbox document");
        }
    }
    let (redis_url, prefix) = mesh.comment_store();
    let mut redis = redis::Client::open(redis_url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    for text in [rejected_event(), UNREADABLE.to_owned()] {
        let _: String = redis
            .xadd(
                Keys::new(prefix).outbox(Group::all().next().expect("a group")),
                "*",
                &[("event", text)],
            )
            .await
            .expect("a poisoned stream entry");
    }

    // Behind the poison: one change per outbox.
    mesh.follow(&alice_token, &moe).await; // user-service → analytics
    let post = |token: &str, body: &str| {
        let mut messages = mesh.messages_v1();
        let request = authed(mpb::PostMessageRequest { body: body.into() }, token);
        async move {
            messages
                .post_message(request)
                .await
                .expect("a post")
                .into_inner()
                .message
                .expect("a message")
                .id
        }
    };
    let doomed = post(&alice_token, "to be deleted").await; // message-service → analytics
    let kept = post(&alice_token, "to keep").await;
    let bobs = post(&bob_token, "by bob").await;
    let comment = |token: &str, message: &str| {
        let mut comments = mesh.comments();
        let request = authed(
            cpb::AddCommentRequest {
                message_id: message.into(),
                body: "a comment".into(),
            },
            token,
        );
        async move {
            comments.add_comment(request).await.expect("a comment");
        }
    };
    comment(&alice_token, &doomed).await; // comment-service → analytics
    comment(&bob_token, &kept).await;
    comment(&moe_token, &kept).await;
    mesh.messages_v1()
        .delete_message(authed(
            mpb::DeleteMessageRequest {
                message_id: doomed.clone(),
            },
            &alice_token,
        ))
        .await
        .expect("a deletion"); // message-service → comments
    mesh.users()
        .ban_user(authed(
            upb::BanUserRequest {
                user_id: bob.clone(),
                reason: "spam".into(),
            },
            &moe_token,
        ))
        .await
        .expect("a ban"); // user-service → comments, messages

    // Each change took effect where its consumer keeps it.
    let admin = mesh.login(chirp_mesh_tests::ADMIN).await;
    let stats = |user: &str| {
        let mut analytics = mesh.analytics();
        let request = authed(apb::GetUserStatsRequest { user_id: user.into() }, &admin);
        async move { analytics.get_user_stats(request).await.expect("stats").into_inner() }
    };
    // Two posts, one deleted; bob's comment purged with the ban, moe's kept.
    eventually(
        "the follow, posts and comments counted by analytics-service",
        || async {
            let (alice, moe) = (stats(&alice).await, stats(&moe).await);
            (
                alice.following_count,
                alice.message_count,
                alice.comments_received_count,
                moe.comment_count,
            ) == (1, 1, 1, 1)
        },
    )
    .await;
    let count = |message: &str| {
        let mut comments = mesh.comments();
        let request = authed(
            cpb::CountCommentsRequest {
                message_ids: vec![message.to_owned()],
            },
            &admin,
        );
        async move {
            comments
                .count_comments(request)
                .await
                .expect("counts")
                .into_inner()
                .counts
                .values()
                .sum::<i64>()
        }
    };
    eventually("the deleted message's comments gone", || async {
        count(&doomed).await == 0
    })
    .await;
    eventually("the banned user's comments gone", || async { count(&kept).await == 1 }).await;
    eventually("the banned user's messages hidden", || async {
        mesh.messages_v1()
            .check_message(authed(
                mpb::CheckMessageRequest {
                    message_id: bobs.clone(),
                },
                &admin,
            ))
            .await
            .is_ok_and(|reply| !reply.into_inner().exists)
    })
    .await;

    // And the poison waits aside in each producer's own store.
    let users = user_service::store::Store::connect_lazy(mesh.user_store(), 2, StoreStatus::always_up())
        .expect("user-service's store");
    let messages = message_service::store::Store::connect_lazy(mongo_uri, mongo_db, StoreStatus::always_up())
        .await
        .expect("message-service's store");
    let comments = comment_service::store::Store::connect_lazy(
        &comment_service::store::Address::Node(redis_url.to_owned()),
        prefix,
        StoreStatus::always_up(),
    )
    .expect("comment-service's store");
    for destination in ["analytics", "comments", "messages"] {
        let name = format!("user-service → {destination}");
        assert_reasons(&name, &settled(&name, &users.outbox(destination)).await);
    }
    for destination in ["analytics", "comments"] {
        let name = format!("message-service → {destination}");
        assert_reasons(&name, &settled(&name, &messages.outbox(destination)).await);
    }
    let name = "comment-service → analytics";
    assert_reasons(name, &settled(name, &comments.outbox()).await);

    // Sent back, each is rejected (or unreadable) again and set aside again.
    assert_eq!(users.outbox("comments").retry_dead_letters(100).await.unwrap(), 2);
    assert_eq!(messages.outbox("analytics").retry_dead_letters(100).await.unwrap(), 2);
    assert_eq!(comments.outbox().retry_dead_letters(100).await.unwrap(), 2);
    assert_reasons("retried", &settled("retried", &users.outbox("comments")).await);
    assert_reasons("retried", &settled("retried", &messages.outbox("analytics")).await);
    assert_reasons("retried", &settled("retried", &comments.outbox()).await);
}
