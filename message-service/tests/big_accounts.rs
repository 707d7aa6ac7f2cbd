//! A ban of a user with 50,000 messages: the delivery that carries it
//! returns at once, later deliveries are not held behind it, and a worker
//! hides every message in bounded chunks, each with its event.

mod common;

use std::time::{Duration, Instant};

use chirp_proto::message::v1;
use common::TestApp;
use mongodb::bson::{doc, DateTime as BsonDateTime, Document};
use service_kit::{
    auth::Role,
    events::{Event, Payload, RevocationReason},
};

const MESSAGES: usize = 50_000;

/// `n` messages of `author`, written straight into the collection (as years
/// of posting would have).
async fn seed(app: &TestApp, author: &str, n: usize) {
    let collection = app.collection().await;
    let now = BsonDateTime::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|i| {
                doc! {
                    "_id": uuid::Uuid::now_v7().to_string(),
                    "author_id": author,
                    "body": format!("message {i}"),
                    "created_at": now,
                    "hidden": false,
                }
            })
            .collect();
        collection.insert_many(docs).await.expect("seeding messages");
    }
}

async fn apply(app: &TestApp, events: Vec<Event>) -> Duration {
    let token = app
        .signer
        .service_token(chrono::Utc::now().timestamp(), Duration::from_secs(60))
        .unwrap();
    let started = Instant::now();
    app.v1()
        .apply_user_events(test_support::grpc::authed(
            v1::ApplyUserEventsRequest {
                events: events.iter().map(Event::to_pb).collect(),
            },
            &token,
        ))
        .await
        .expect("ApplyUserEvents");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banning_a_user_with_fifty_thousand_messages_hides_them_all_in_chunks_without_holding_delivery() {
    let app = TestApp::spawn().await;
    let (troll, _) = app.user("troll", Role::User);
    seed(&app, &troll, MESSAGES).await;
    let user_id = uuid::Uuid::parse_str(&troll).unwrap();
    let banned = Event::new(
        "user-service",
        Payload::UserBanned {
            user_id,
            moderator_id: uuid::Uuid::new_v4(),
        },
    );
    let started = Instant::now();
    let ban_took = apply(&app, vec![banned.clone()]).await;
    // The next delivery (another user's revocation) is not held behind it.
    let next_took = apply(
        &app,
        vec![Event::new(
            "user-service",
            Payload::TokensRevoked {
                user_id: uuid::Uuid::new_v4(),
                issued_before: chrono::Utc::now(),
                reason: RevocationReason::SessionEnded,
            },
        )],
    )
    .await;
    assert!(
        ban_took < Duration::from_secs(1),
        "the ban's delivery took {ban_took:?}"
    );
    assert!(
        next_took < Duration::from_secs(1),
        "the next delivery took {next_took:?}"
    );

    let collection = app.collection().await;
    let visible = || async {
        collection
            .count_documents(doc! { "author_id": &troll, "hidden": false })
            .await
            .unwrap()
    };
    while visible().await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{} messages still visible",
            visible().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hidden_after = started.elapsed();
    // analytics-service is unreachable in these tests, so its copies stay
    // in the outbox: one per message.
    let outbox = mongodb::Client::with_uri_str(app.mongo.uri())
        .await
        .unwrap()
        .database(app.mongo.database())
        .collection::<Document>("outbox");
    let analytics = doc! { "destination": "analytics" };
    let events = outbox.count_documents(analytics.clone()).await.unwrap();
    println!(
        "ban of {MESSAGES} messages: delivery answered in {} ms (the next one in {} ms); \
         all hidden after {:.1} s; {events} events for analytics",
        ban_took.as_millis(),
        next_took.as_millis(),
        hidden_after.as_secs_f64()
    );
    assert_eq!(events, MESSAGES as u64, "one event per message");

    // Redelivering the ban changes nothing more.
    apply(&app, vec![banned]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(outbox.count_documents(analytics).await.unwrap(), events);
}
