//! Backup and restore by analytics-service itself, through its operator
//! routes: the backup's rows copied into a file its own migrations made,
//! nothing of the backup's schema ever executed; switched in one
//! transaction, undone the same way.

mod common;

use common::{event, ingest, Backing, TestApp, INGEST_TOKEN};
use service_kit::events::Payload;
use sqlx::Connection as _;
use test_support::operator::{reseal, Operator};
use uuid::Uuid;

async fn spawn(backing: &Backing) -> (TestApp, Operator, tempfile::TempDir) {
    let backups = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_with(backing, &[&format!("--backup-dir={}", backups.path().display())]).await;
    let operator = Operator::with_token(app.metrics_addr, INGEST_TOKEN);
    (app, operator, backups)
}

async fn in_maintenance(app: &TestApp, operator: &Operator, path: &str) -> serde_json::Value {
    operator.in_maintenance(&app.channel, common::SERVICE, path).await
}

async fn record(app: &TestApp, payload: Payload) {
    app.client()
        .record_events(ingest(&[event(payload)]))
        .await
        .expect("RecordEvents");
}

async fn query_one(path: &std::path::Path, sql: &str) -> i64 {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    n
}

#[tokio::test]
async fn a_restore_brings_back_the_backups_rows_and_undo_the_replaced_ones() {
    let backing = Backing::new();
    let (app, operator, _backups) = spawn(&backing).await;
    record(
        &app,
        Payload::UserRegistered {
            user_id: Uuid::new_v4(),
        },
    )
    .await;
    let manifest = operator.ok("POST", "/backups/b").await;
    assert_eq!(manifest["counts"]["events"], 1, "{manifest}");
    record(
        &app,
        Payload::UserRegistered {
            user_id: Uuid::new_v4(),
        },
    )
    .await;

    operator.ok("POST", "/restore/b/load").await;
    let switched = in_maintenance(&app, &operator, "/restore/switch").await;
    assert_eq!(switched["after"]["counts"], manifest["counts"], "{switched}");
    assert_eq!(query_one(&backing.file.path(), "SELECT count(*) FROM events").await, 1);
    in_maintenance(&app, &operator, "/restore/undo").await;
    assert_eq!(
        query_one(&backing.file.path(), "SELECT count(*) FROM events").await,
        2,
        "undo"
    );
    operator.ok("POST", "/restore/b/load").await;
    in_maintenance(&app, &operator, "/restore/switch").await;
    operator.ok("POST", "/restore/confirm").await;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(backing.file.path()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the live file is the owner's alone");
    record(
        &app,
        Payload::UserRegistered {
            user_id: Uuid::new_v4(),
        },
    )
    .await;
}

#[tokio::test]
async fn a_trigger_in_the_backups_schema_is_never_created() {
    let backing = Backing::new();
    let (app, operator, backups) = spawn(&backing).await;
    record(
        &app,
        Payload::UserRegistered {
            user_id: Uuid::new_v4(),
        },
    )
    .await;
    operator.ok("POST", "/backups/b").await;
    // Crafted: a trigger that would plant a row on every event stored, in
    // the backup's own schema.
    let file = backups.path().join("b").join("analytics.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER planted AFTER INSERT ON events BEGIN \
         INSERT OR REPLACE INTO user_stats (user_id, message_count) VALUES ('planted', 99); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    reseal(&backups.path().join("b"));

    operator.ok("POST", "/restore/b/load").await;
    in_maintenance(&app, &operator, "/restore/switch").await;
    record(
        &app,
        Payload::UserRegistered {
            user_id: Uuid::new_v4(),
        },
    )
    .await;
    let live = backing.file.path();
    assert_eq!(
        query_one(&live, "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").await,
        0,
        "the backup's trigger is not in the live schema"
    );
    assert_eq!(
        query_one(&live, "SELECT count(*) FROM user_stats WHERE user_id = 'planted'").await,
        0,
        "and it never ran"
    );
    assert_eq!(query_one(&live, "SELECT count(*) FROM events").await, 2);
}
