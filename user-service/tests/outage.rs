//! ARCHITECTURE.md invariant 4 for user-service: while PostgreSQL is down the
//! process stays up, its API is NOT_SERVING and answers UNAVAILABLE within
//! the caller's deadline; when PostgreSQL returns, everything recovers in the
//! same process.

mod common;

use std::time::Duration;

use chirp_proto::user::v1 as pb;
use common::{TestApp, SERVICE};
use test_support::{postgres::TestDatabase, process::StoreProcess};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

/// A GetUser with a 1 s deadline: an answer after that would be
/// DEADLINE_EXCEEDED, so UNAVAILABLE proves the service answered in time.
async fn get_user(app: &TestApp, id: &str) -> Result<pb::User, tonic::Status> {
    let mut request = Request::new(pb::GetUserRequest { user_id: id.to_owned() });
    request.set_timeout(Duration::from_secs(1));
    app.client()
        .get_user(request)
        .await
        .map(|r| r.into_inner().user.unwrap_or_default())
}

#[tokio::test]
async fn health_and_rpcs_follow_postgresql_down_and_back_in_the_same_process() {
    let mut postgres = StoreProcess::postgres().expect("a private PostgreSQL");
    let database = TestDatabase::create_on(&postgres.url()).await.expect("a database");
    let url = database.url().to_owned();
    let app = TestApp::spawn_on(&url, None, &[]).await;
    app.wait_for(ServingStatus::Serving).await;
    let alice = app.register("alice").await;

    postgres.stop();
    app.wait_for(ServingStatus::NotServing).await;
    assert_eq!(
        app.health("").await,
        Some(ServingStatus::Serving),
        "the process itself is alive"
    );
    for _ in 0..3 {
        let status = get_user(&app, &alice.id).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            !status.message().contains("Io"),
            "no internal detail leaks: {}",
            status.message()
        );
    }
    let status = app
        .client()
        .register(pb::RegisterRequest {
            username: "bob".into(),
            password: common::PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    postgres.start().expect("PostgreSQL starts again");
    app.wait_for(ServingStatus::Serving).await;
    assert_eq!(get_user(&app, &alice.id).await.expect("reads work again").id, alice.id);
    app.register("bob").await;

    drop(database);
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn a_service_started_while_postgresql_is_down_migrates_and_serves_once_it_is_up() {
    let mut postgres = StoreProcess::postgres().expect("a private PostgreSQL");
    let url = postgres.url();
    postgres.stop();

    let app = TestApp::spawn_on(&url, None, &[]).await;
    app.wait_for(ServingStatus::NotServing).await;
    let status = get_user(&app, &uuid::Uuid::new_v4().to_string()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    postgres.start().expect("PostgreSQL starts");
    app.wait_for(ServingStatus::Serving).await;
    let user = app.register("late").await;
    assert_eq!(get_user(&app, &user.id).await.unwrap().username, "late");
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_before_the_server_stops() {
    let database = TestDatabase::create().await.expect("a database");
    let url = database.url().to_owned();
    let app = TestApp::spawn_on(&url, Some(database), &["--shutdown-delay=1s"]).await;
    app.wait_for(ServingStatus::Serving).await;
    let channel = app.channel.clone();
    let check = |service: &'static str| {
        let channel = channel.clone();
        async move {
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status())
        }
    };
    let stopping = tokio::spawn(app.stop());
    // Still answering (for the 1 s delay), and NOT_SERVING as soon as the
    // stop begins: polled, not slept, so a slow machine cannot flake it.
    let asked = std::time::Instant::now();
    let mut overall = check("").await.unwrap();
    while overall != ServingStatus::NotServing && asked.elapsed() < Duration::from_millis(900) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        overall = check("").await.unwrap();
    }
    assert_eq!(overall, ServingStatus::NotServing);
    assert_eq!(check(SERVICE).await.unwrap(), ServingStatus::NotServing);
    stopping.await.unwrap().expect("run returns Ok after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_registration_is_lost_when_postgresql_is_killed_mid_stream() {
    let mut postgres = StoreProcess::postgres().expect("a private PostgreSQL");
    let database = TestDatabase::create_on(&postgres.url()).await.expect("a database");
    let url = database.url().to_owned();
    let app = TestApp::spawn_on(&url, None, &[]).await;
    app.wait_for(ServingStatus::Serving).await;
    let counts = test_support::WriteCounts::default();
    let writer = {
        let (mut client, counts) = (app.client(), counts.clone());
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..300 {
                let request = pb::RegisterRequest {
                    username: format!("user_{i}"),
                    password: common::PASSWORD.into(),
                    display_name: String::new(),
                };
                let result = client.register(request).await;
                counts.record(result.is_ok());
                if let Ok(reply) = result {
                    acknowledged.push(reply.into_inner().user.unwrap().id);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acknowledged
        })
    };
    // Killed mid-stream: once writes flow, and started again once the
    // writer has seen them fail.
    counts.until_acknowledged(20).await;
    assert!(!writer.is_finished(), "the kill comes in the middle of the writes");
    postgres.kill();
    counts.until_failed(1).await;
    postgres.start().expect("PostgreSQL starts again after the kill");
    let acknowledged = writer.await.unwrap();
    app.wait_for(ServingStatus::Serving).await;

    let mut lost = Vec::new();
    for id in &acknowledged {
        if get_user(&app, id).await.is_err() {
            lost.push(id.clone());
        }
    }
    println!(
        "postgresql SIGKILL: {} registrations acknowledged of 300 sent, {} lost after the restart",
        acknowledged.len(),
        lost.len()
    );
    // (Writes caught by the kill wait for a new connection and usually
    // succeed once PostgreSQL is back: sqlx retries the connect.)
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}
