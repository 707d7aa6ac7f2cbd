//! ARCHITECTURE.md invariant 4 for message-service: while MongoDB is down the
//! process stays up, both API versions are NOT_SERVING and answer
//! UNAVAILABLE within the caller's deadline; when MongoDB returns, the same
//! process serves again.

mod common;

use std::time::Duration;

use chirp_proto::message::{v1, v2};
use common::{with_deadline, TestApp, V1, V2};
use service_kit::auth::Role;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn health_and_rpcs_follow_mongodb_down_and_back_in_the_same_process() {
    let mut app = TestApp::spawn_with(common::Options {
        private_mongo: true,
        ..common::Options::default()
    })
    .await;
    let (_, token) = app.user("alice", Role::User);
    let posted = app.post(&token, "before the outage").await;

    app.mongo_server().stop();
    app.wait_for(ServingStatus::NotServing).await;
    assert_eq!(
        app.health("").await,
        Some(ServingStatus::Serving),
        "the process itself is alive"
    );
    for _ in 0..3 {
        let status = app
            .v1()
            .get_message(with_deadline(
                v1::GetMessageRequest {
                    message_id: posted.id.clone(),
                },
                Duration::from_secs(1),
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let status = app
        .v2()
        .post_message(common::authed(v2::PostMessageRequest { body: "lost?".into() }, &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    app.mongo_server().start().expect("MongoDB starts again");
    app.wait_for(ServingStatus::Serving).await;
    assert_eq!(app.health(V1).await, Some(ServingStatus::Serving));
    assert_eq!(app.health(V2).await, Some(ServingStatus::Serving));
    let again = app
        .v2()
        .get_message(v2::GetMessageRequest {
            message_id: posted.id.clone(),
        })
        .await
        .expect("reads work again")
        .into_inner();
    assert_eq!(again.message.unwrap().message.unwrap().body, "before the outage");
    app.post(&token, "after the outage").await;
    app.stop().await.expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_post_is_lost_when_mongodb_is_killed_mid_stream() {
    let mut app = TestApp::spawn_with(common::Options {
        private_mongo: true,
        ..common::Options::default()
    })
    .await;
    let (_, token) = app.user("alice", Role::User);
    let counts = test_support::WriteCounts::default();
    let writer = {
        let (mut client, token, counts) = (app.v1(), token.clone(), counts.clone());
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..300 {
                let request = common::authed(
                    v1::PostMessageRequest {
                        body: format!("post {i}"),
                    },
                    &token,
                );
                let result = client.post_message(request).await;
                counts.record(result.is_ok());
                if let Ok(reply) = result {
                    acknowledged.push(reply.into_inner().message.unwrap().id);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acknowledged
        })
    };
    // Killed mid-stream: once writes flow, and started again once the
    // writer has seen them fail.
    counts.until_acknowledged(20).await;
    app.mongo_server().kill();
    counts.until_failed(1).await;
    app.mongo_server().start().unwrap();
    let acknowledged = writer.await.unwrap();
    app.wait_for(ServingStatus::Serving).await;

    let mut lost = Vec::new();
    for id in &acknowledged {
        let found = app
            .v1()
            .get_message(v1::GetMessageRequest { message_id: id.clone() })
            .await;
        if let Err(status) = found {
            lost.push((id.clone(), status.code(), status.message().to_owned()));
        }
    }
    println!(
        "mongodb SIGKILL: {} posts acknowledged of 300 sent, {} lost after the restart",
        acknowledged.len(),
        lost.len()
    );
    assert!(acknowledged.len() < 300, "the kill interrupted some writes");
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}
