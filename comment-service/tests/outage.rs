//! ARCHITECTURE.md invariant 4 for comment-service, and durability: comments
//! survive a restart of the service and of an append-only Redis.

mod common;

use std::time::Duration;

use chirp_proto::comment::v1 as pb;
use common::{authed, with_deadline, Backing, TestApp, SERVICE};
use service_kit::auth::Role;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn list(app: &TestApp, message: &str) -> Result<Vec<String>, tonic::Status> {
    app.client()
        .list_comments(with_deadline(
            pb::ListCommentsRequest {
                message_id: message.into(),
                ..Default::default()
            },
            Duration::from_secs(1),
        ))
        .await
        .map(|r| r.into_inner().comments.into_iter().map(|c| c.body).collect())
}

#[tokio::test]
async fn health_and_rpcs_follow_redis_down_and_back_in_the_same_process() {
    let mut backing = Backing::private().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    app.client()
        .add_comment(authed(
            pb::AddCommentRequest {
                message_id: message.clone(),
                body: "before".into(),
            },
            &token,
        ))
        .await
        .unwrap();

    backing.redis().stop();
    app.wait_for(ServingStatus::NotServing).await;
    assert_eq!(
        app.health("").await,
        Some(ServingStatus::Serving),
        "the process itself is alive"
    );
    for _ in 0..3 {
        let status = list(&app, &message).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let status = app
        .client()
        .count_comments(with_deadline(
            pb::CountCommentsRequest {
                message_ids: vec![message.clone()],
            },
            Duration::from_secs(1),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    backing.redis().start().expect("Redis starts again");
    app.wait_for(ServingStatus::Serving).await;
    assert_eq!(list(&app, &message).await.unwrap(), ["before"]);
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn comments_survive_a_restart_of_the_service_and_of_redis() {
    let mut backing = Backing::private().await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    let app = TestApp::spawn(&backing).await;
    for body in ["one", "two"] {
        app.client()
            .add_comment(authed(
                pb::AddCommentRequest {
                    message_id: message.clone(),
                    body: body.into(),
                },
                &token,
            ))
            .await
            .unwrap();
    }
    app.stop().await.unwrap();

    let app = TestApp::spawn(&backing).await;
    assert_eq!(
        list(&app, &message).await.unwrap(),
        ["one", "two"],
        "after a service restart"
    );

    backing.redis().stop();
    // Seen down first: otherwise the service may still be SERVING from
    // before the stop, and its first call meets the connection Redis cut.
    app.wait_for(ServingStatus::NotServing).await;
    backing.redis().start().unwrap();
    app.wait_for(ServingStatus::Serving).await;
    assert_eq!(
        list(&app, &message).await.unwrap(),
        ["one", "two"],
        "after a Redis restart (AOF)"
    );
    assert_eq!(app.health(SERVICE).await, Some(ServingStatus::Serving));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_comment_is_lost_when_redis_is_killed_mid_stream() {
    let mut backing = Backing::private().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    let counts = test_support::WriteCounts::default();
    let writer = {
        let (mut client, message, token, counts) = (app.client(), message.clone(), token.clone(), counts.clone());
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..400 {
                let request = authed(
                    pb::AddCommentRequest {
                        message_id: message.clone(),
                        body: format!("comment {i}"),
                    },
                    &token,
                );
                let acked = client.add_comment(request).await.is_ok();
                counts.record(acked);
                if acked {
                    acknowledged.push(format!("comment {i}"));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acknowledged
        })
    };
    // Killed mid-stream: once writes flow, and started again once the
    // writer has seen them fail.
    counts.until_acknowledged(20).await;
    backing.redis().kill();
    counts.until_failed(1).await;
    backing.redis().start().unwrap();
    let acknowledged = writer.await.unwrap();
    app.wait_for(ServingStatus::Serving).await;

    let stored: Vec<String> = common::all_comments(&app, &message, 100)
        .await
        .into_iter()
        .map(|c| c.body)
        .collect();
    let lost: Vec<_> = acknowledged.iter().filter(|body| !stored.contains(body)).collect();
    println!(
        "redis SIGKILL: {} comments acknowledged of 400 sent, {} stored after the restart, {} lost",
        acknowledged.len(),
        stored.len(),
        lost.len()
    );
    assert!(acknowledged.len() < 400, "the kill interrupted some writes");
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}
