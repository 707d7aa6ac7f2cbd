//! Backup and restore by user-service itself, through its operator routes:
//! a restore loads beside the live database and proves the backup there
//! before it switches; what it replaced is kept until confirmed; a backup
//! is untrusted input.

mod common;

use std::path::{Path, PathBuf};

use chirp_proto::user::v1 as pb;
use common::TestApp;
use sqlx::Connection as _;
use test_support::operator::{reseal, OneShot, Operator};
use tonic_health::pb::health_check_response::ServingStatus;

async fn spawn() -> (TestApp, tempfile::TempDir) {
    let backups = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_on_fresh(&[&format!("--backup-dir={}", backups.path().display())]).await;
    (app, backups)
}

async fn exists(app: &TestApp, id: &str) -> bool {
    match app.client().get_user(pb::GetUserRequest { user_id: id.into() }).await {
        Ok(_) => true,
        Err(status) if status.code() == tonic::Code::NotFound => false,
        Err(status) => panic!("GetUser: {status:?}"),
    }
}

/// Whether the user exists, once the service reads its database again
/// (a restore from the binary ends the sessions a running replica holds).
async fn exists_once_served(app: &TestApp, id: &str) -> bool {
    for _ in 0..100 {
        match app.client().get_user(pb::GetUserRequest { user_id: id.into() }).await {
            Ok(_) => return true,
            Err(status) if status.code() == tonic::Code::NotFound => return false,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(status) => panic!("GetUser: {status:?}"),
        }
    }
    panic!("user-service did not serve again within 10 s");
}

async fn in_maintenance(app: &TestApp, path: &str) -> serde_json::Value {
    Operator::new(app.metrics_addr)
        .in_maintenance(&app.channel, common::SERVICE, path)
        .await
}

async fn live(app: &TestApp) -> serde_json::Value {
    Operator::new(app.metrics_addr).ok("GET", "/store").await
}

fn copy_backup(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test]
async fn a_restore_switches_only_in_maintenance_and_is_undone_or_confirmed() {
    let (app, backups) = spawn().await;
    let kept = app.register("kept_user").await;
    let manifest = Operator::new(app.metrics_addr).ok("POST", "/backups/first").await;
    assert_eq!(manifest["counts"]["users"], 2, "the admin and kept_user: {manifest}");
    let later = app.register("later_user").await;

    let loaded = Operator::new(app.metrics_addr).ok("POST", "/restore/first/load").await;
    assert_eq!(loaded["before"]["counts"]["users"], 3);
    assert!(exists(&app, &later.id).await, "loading changes nothing live");
    let reason = Operator::new(app.metrics_addr).refused("POST", "/restore/switch").await;
    assert!(reason.contains("maintenance"), "{reason}");
    assert!(exists(&app, &later.id).await);

    let switched = in_maintenance(&app, "/restore/switch").await;
    assert_eq!(switched["after"]["counts"]["users"], 2, "{switched}");
    assert!(exists(&app, &kept.id).await);
    assert!(!exists(&app, &later.id).await, "the live data is the backup's");
    let reason = Operator::new(app.metrics_addr)
        .refused("POST", "/restore/first/load")
        .await;
    assert!(
        reason.contains("confirm or undo"),
        "one restore waits at a time: {reason}"
    );

    in_maintenance(&app, "/restore/undo").await;
    assert!(
        exists(&app, &later.id).await,
        "undo brings back what the restore replaced"
    );
    app.register("after_undo").await;

    Operator::new(app.metrics_addr).ok("POST", "/restore/first/load").await;
    in_maintenance(&app, "/restore/switch").await;
    Operator::new(app.metrics_addr).ok("POST", "/restore/confirm").await;
    assert!(!exists(&app, &later.id).await);
    Operator::new(app.metrics_addr).ok("POST", "/maintenance/on").await;
    let reason = Operator::new(app.metrics_addr).refused("POST", "/restore/undo").await;
    assert!(reason.contains("nothing to undo"), "{reason}");
    Operator::new(app.metrics_addr).ok("POST", "/maintenance/off").await;
    app.wait_for(ServingStatus::Serving).await;
    app.register("after_confirm").await;
    drop(backups);
}

#[tokio::test]
async fn the_binary_backs_up_and_restores_its_database_with_the_services_own_configuration() {
    let (app, backups) = spawn().await;
    let binary = OneShot::new(
        env!("CARGO_BIN_EXE_user-service"),
        &[
            ("DATABASE_URL", app.database_url.clone()),
            ("BACKUP_DIR", backups.path().display().to_string()),
        ],
    );
    let kept = app.register("kept_user").await;
    let taken = binary.ok(&["backup", "--keep", "3", "nightly"]).await;
    assert_eq!(
        taken["manifest"]["counts"]["users"], 2,
        "the admin and kept_user: {taken}"
    );
    assert!(backups.path().join("nightly").join("manifest.json").is_file());
    let later = app.register("later_user").await;

    binary.ok(&["restore", "--replicas-stopped", "nightly"]).await;
    assert!(exists_once_served(&app, &kept.id).await);
    assert!(
        !exists_once_served(&app, &later.id).await,
        "the restore replaced the live data"
    );
    binary.ok(&["restore", "--undo", "--replicas-stopped"]).await;
    assert!(
        exists_once_served(&app, &later.id).await,
        "undo brings the replaced data back"
    );
}

#[tokio::test]
async fn a_dump_whose_header_claims_a_newer_format_changes_nothing() {
    let (app, backups) = spawn().await;
    app.register("someone").await;
    Operator::new(app.metrics_addr).ok("POST", "/backups/real").await;
    let newer = backups.path().join("newer");
    copy_backup(&backups.path().join("real"), &newer);
    // The custom format's header: "PGDMP", then major, minor and revision
    // of the archive format.
    let dump = newer.join("users.dump");
    let mut bytes = std::fs::read(&dump).unwrap();
    assert_eq!(&bytes[..5], b"PGDMP");
    bytes[5] = 9;
    bytes[6] = 99;
    std::fs::write(&dump, bytes).unwrap();
    reseal(&newer);
    app.register("after_backup").await;

    let before = live(&app).await;
    let reason = Operator::new(app.metrics_addr)
        .refused("POST", "/restore/newer/load")
        .await;
    println!("refused: {reason}\nbefore: {before}");
    assert!(
        reason.contains("pg_restore") && reason.contains("nothing live was changed"),
        "{reason}"
    );
    assert_eq!(live(&app).await, before, "the live database is as it was");
    assert_eq!(app.user_count().await, 3);
}

#[tokio::test]
async fn a_manifest_naming_a_file_outside_the_backup_changes_nothing() {
    let (app, backups) = spawn().await;
    app.register("someone").await;
    Operator::new(app.metrics_addr).ok("POST", "/backups/real").await;
    let crafted = backups.path().join("crafted");
    copy_backup(&backups.path().join("real"), &crafted);
    let manifest_file = crafted.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_file).unwrap()).unwrap();
    manifest["files"]["../x"] = "00".into();
    std::fs::write(&manifest_file, manifest.to_string()).unwrap();

    let before = live(&app).await;
    let reason = Operator::new(app.metrics_addr)
        .refused("POST", "/restore/crafted/load")
        .await;
    println!("refused: {reason}\nbefore: {before}");
    assert!(reason.contains("not a plain name"), "{reason}");
    let reason = Operator::new(app.metrics_addr)
        .refused("POST", "/restore/..%2Fcrafted/load")
        .await;
    assert!(
        reason.contains("not a plain name"),
        "a backup name is one path component: {reason}"
    );
    assert_eq!(live(&app).await, before);
}

fn pg_tool(name: &str) -> PathBuf {
    test_support::process::pg_binary(name).unwrap()
}

#[tokio::test]
async fn a_dump_carrying_a_function_that_runs_a_program_loads_without_it() {
    let (app, backups) = spawn().await;
    app.register("someone").await;
    Operator::new(app.metrics_addr).ok("POST", "/backups/real").await;

    // Crafted as an attacker with a superuser would: the real backup,
    // restored elsewhere, given a function that runs a program and an index
    // that calls it, dumped again.
    let marker = std::env::temp_dir().join(format!("chirp-restore-marker-{}", uuid::Uuid::new_v4().simple()));
    let scratch = test_support::postgres::TestDatabase::create().await.unwrap();
    let restored = std::process::Command::new(pg_tool("pg_restore"))
        .args(["--no-owner", "--dbname", scratch.url()])
        .arg(backups.path().join("real").join("users.dump"))
        .output()
        .unwrap();
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let mut conn = sqlx::PgConnection::connect(scratch.url()).await.unwrap();
    // The index's function must say IMMUTABLE, and such a function may not
    // COPY itself: it calls one that may.
    sqlx::query(&format!(
        "CREATE FUNCTION chirp_evil_copy() RETURNS void LANGUAGE plpgsql AS $$ \
         BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {}'''; END $$",
        marker.display()
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "CREATE FUNCTION chirp_evil(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$ \
         BEGIN PERFORM chirp_evil_copy(); RETURN t; END $$",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("CREATE INDEX users_evil ON users ((chirp_evil(username)))")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert!(marker.exists(), "the payload runs a program when the index is built");
    std::fs::remove_file(&marker).unwrap();
    let crafted = backups.path().join("crafted");
    copy_backup(&backups.path().join("real"), &crafted);
    let dumped = std::process::Command::new(pg_tool("pg_dump"))
        .args(["--format=custom", "--no-owner", "--file"])
        .arg(crafted.join("users.dump"))
        .args(["--dbname", scratch.url()])
        .output()
        .unwrap();
    assert!(dumped.status.success(), "{}", String::from_utf8_lossy(&dumped.stderr));
    reseal(&crafted);

    Operator::new(app.metrics_addr)
        .ok("POST", "/restore/crafted/load")
        .await;
    in_maintenance(&app, "/restore/switch").await;
    assert!(!marker.exists(), "no program ran");
    let mut conn = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    let functions: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_proc WHERE proname LIKE 'chirp_evil%'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(functions, 0, "the dump's function was never created");
    conn.close().await.unwrap();
    assert_eq!(app.user_count().await, 2, "the rows were loaded");
    Operator::new(app.metrics_addr).ok("POST", "/restore/confirm").await;
}
