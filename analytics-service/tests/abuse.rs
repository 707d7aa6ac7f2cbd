//! Heavy reads cannot starve ingestion or health: they run on readers of
//! their own, and SQLite stops a query at its caller's deadline.

mod common;

use std::time::{Duration, Instant};

use chirp_proto::analytics::v1 as pb;
use common::{authed, event, ingest, Backing, TestApp, SERVICE};
use service_kit::{auth::Role, context::RequestContext, events::Payload, store::StoreStatus};
use sqlx::Connection as _;
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// `n` comments on 20,000 messages over the last day, written straight into
/// the file (as years of traffic would be), so TopMessages has work to do.
async fn seed(backing: &Backing, n: u32) {
    let mut conn = sqlx::SqliteConnection::connect(&backing.file.url()).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 - 1)
         INSERT INTO events (event_id, producer, kind, occurred_at, message_id, payload)
         SELECT 'seed-' || i, 'test', 'comment_added', ?2 - (i % 86400000), 'm' || (i % 20000), '{}' FROM n",
    )
    .bind(n)
    .bind(now)
    .execute(&mut conn)
    .await
    .unwrap();
}

fn last_year() -> (Option<prost_types::Timestamp>, Option<prost_types::Timestamp>) {
    let now = chrono::Utc::now().timestamp();
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    (at(now - 365 * 86_400), at(now + 60))
}

#[tokio::test]
async fn sqlite_stops_a_read_at_its_callers_deadline() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    seed(&backing, 200_000).await;
    let store = analytics_service::store::Store::connect_lazy(&backing.file.url(), StoreStatus::always_up()).unwrap();
    let now = chrono::Utc::now();
    let window = analytics_service::domain::Window::parse(Some(now - chrono::Duration::days(365)), Some(now)).unwrap();

    let unhurried = store.top_messages(window, 10).await.expect("a read with time");
    assert_eq!(unhurried.len(), 10);
    let hurried = RequestContext {
        request_id: "hurried".into(),
        deadline: Some(Instant::now() + Duration::from_millis(1)),
        sampled: false,
    }
    .scope(store.top_messages(window, 10))
    .await;
    assert!(
        matches!(hurried, Err(analytics_service::error::Error::DeadlineExceeded)),
        "{hurried:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_worst_case_reads_at_once_leave_ingestion_and_health_alone() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    seed(&backing, 200_000).await;
    let token = backing.token(Role::User);
    let mut health = HealthClient::new(app.channel.clone());
    // Writes (each with a health check) for a second on their own, then for
    // three beside eight readers.
    let alone = writes_until(&app, &mut health, Instant::now() + Duration::from_secs(1)).await;
    let stop = Instant::now() + Duration::from_secs(3);

    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (mut client, token) = (app.client(), token.clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                while Instant::now() < stop {
                    let (start_time, end_time) = last_year();
                    let mut request = authed(
                        pb::TopMessagesRequest {
                            start_time,
                            end_time,
                            limit: 100,
                        },
                        &token,
                    );
                    request.set_timeout(Duration::from_millis(300));
                    codes.push(match client.top_messages(request).await {
                        Ok(_) => Code::Ok,
                        Err(status) => status.code(),
                    });
                }
                codes
            })
        })
        .collect();
    let (writes, slowest_write) = writes_until(&app, &mut health, stop).await;
    let mut codes = Vec::new();
    for reader in readers {
        codes.extend(reader.await.unwrap());
    }
    let count = |code| codes.iter().filter(|c| **c == code).count();
    println!(
        "8 readers: {} reads ({} ok, {} refused at once, {} past their deadline); \
         {writes} RecordEvents in 3 s beside them (slowest {} ms), {} in 1 s alone",
        codes.len(),
        count(Code::Ok),
        count(Code::ResourceExhausted),
        count(Code::DeadlineExceeded) + count(Code::Cancelled),
        slowest_write.as_millis(),
        alone.0
    );
    let unexpected: Vec<_> = codes
        .iter()
        .filter(|c| {
            !matches!(
                c,
                Code::Ok | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled
            )
        })
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert!(
        slowest_write < Duration::from_secs(1),
        "a write waited {slowest_write:?}"
    );
    // Three times as long beside the readers: at least half the pace alone
    // (sharing connections with the readers, it fell to a tenth).
    assert!(
        writes * 2 >= alone.0 * 3,
        "{writes} writes beside the reads, {} alone",
        alone.0
    );
}

/// RecordEvents, each followed by a health check that must say SERVING,
/// until `stop`: how many, and the slowest write.
async fn writes_until(
    app: &TestApp,
    health: &mut HealthClient<tonic::transport::Channel>,
    stop: Instant,
) -> (u32, Duration) {
    let (mut writes, mut slowest) = (0, Duration::ZERO);
    while Instant::now() < stop {
        let started = Instant::now();
        app.client()
            .record_events(ingest(&[event(Payload::CommentAdded {
                comment_id: uuid::Uuid::now_v7(),
                message_id: uuid::Uuid::now_v7(),
                author_id: uuid::Uuid::new_v4(),
                message_author_id: uuid::Uuid::new_v4(),
            })]))
            .await
            .expect("RecordEvents beside the reads");
        slowest = slowest.max(started.elapsed());
        writes += 1;
        let serving = health
            .check(HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        assert_eq!(serving, ServingStatus::Serving as i32, "the service left SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (writes, slowest)
}

/// analytics-service as its own process on `file`: SQLite lives in it, so
/// killing it is killing the store.
fn spawn_process(backing: &Backing, port: u16) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_analytics-service"))
        .args([
            format!("--database-url={}", backing.file.url()),
            format!("--listen-addr=127.0.0.1:{port}"),
            "--metrics-addr=127.0.0.1:0".to_owned(),
            format!("--ingest-token={}", common::INGEST_TOKEN),
            format!("--jwt-public-key-file={}", backing.public_key_file().display()),
            "--store-probe-interval=100ms".to_owned(),
            // No user-service: the revocation catch-up fails fast.
            "--user-service-url=http://127.0.0.1:1".to_owned(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the analytics-service binary")
}

async fn serving(port: u16) -> tonic::transport::Channel {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    test_support::grpc::wait_for(&channel, &[SERVICE], ServingStatus::Serving).await;
    channel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_is_lost_when_the_process_holding_sqlite_is_killed() {
    let backing = Backing::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = spawn_process(&backing, port);
    let channel = serving(port).await;
    let counts = test_support::WriteCounts::default();
    let writer = tokio::spawn({
        let counts = counts.clone();
        async move {
            let mut client = pb::analytics_service_client::AnalyticsServiceClient::new(channel);
            let mut acknowledged = Vec::new();
            for _ in 0..400 {
                let batch: Vec<_> = (0..5)
                    .map(|_| {
                        event(Payload::MessagePosted {
                            message_id: uuid::Uuid::now_v7(),
                            author_id: uuid::Uuid::new_v4(),
                        })
                    })
                    .collect();
                let ok = client.record_events(ingest(&batch)).await.is_ok();
                counts.record(ok);
                if ok {
                    acknowledged.extend(batch.iter().map(|e| e.id.to_string()));
                } else {
                    break;
                }
            }
            acknowledged
        }
    });
    // Kill once writes are flowing, however long a loaded machine takes to
    // get there.
    counts.until_acknowledged(20).await;
    assert!(!writer.is_finished(), "the kill comes in the middle of the writes");
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let acknowledged = writer.await.unwrap();

    let mut child = spawn_process(&backing, port);
    serving(port).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut conn = sqlx::SqliteConnection::connect(&backing.file.url()).await.unwrap();
    let mut lost = 0;
    for id in &acknowledged {
        let found: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE event_id = ?")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        lost += 1 - found;
    }
    println!(
        "sqlite (analytics-service) SIGKILL: {} events acknowledged, {lost} lost after the restart",
        acknowledged.len()
    );
    assert!(!acknowledged.is_empty());
    assert_eq!(lost, 0);
}
