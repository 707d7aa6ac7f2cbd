//! Backup and restore by message-service itself, through its operator
//! routes: the backup loaded into a side database its own `prepare` made
//! (so the validator judges every document) and switched in by renames; a
//! document the data model refuses stops the load with nothing changed.

mod common;

use chirp_proto::message::v1 as pb;
use common::{Options, TestApp};
use mongodb::bson::{doc, DateTime};
use service_kit::auth::Role;
use test_support::operator::{reseal, Operator};

async fn spawn() -> (TestApp, Operator, tempfile::TempDir) {
    let backups = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_with(Options {
        extra_args: vec![format!("--backup-dir={}", backups.path().display())],
        ..Options::default()
    })
    .await;
    let operator = Operator::new(app.metrics_addr);
    (app, operator, backups)
}

async fn exists(app: &TestApp, id: &str) -> bool {
    match app
        .v1()
        .get_message(pb::GetMessageRequest { message_id: id.into() })
        .await
    {
        Ok(_) => true,
        Err(status) if status.code() == tonic::Code::NotFound => false,
        Err(status) => panic!("GetMessage: {status:?}"),
    }
}

async fn in_maintenance(app: &TestApp, operator: &Operator, path: &str) -> serde_json::Value {
    operator.in_maintenance(&app.channel, common::V1, path).await
}

#[tokio::test]
async fn a_restore_brings_back_the_backups_documents_and_undo_the_replaced_ones() {
    let (app, operator, _backups) = spawn().await;
    let (_, token) = app.user("author", Role::User);
    let kept = app.post(&token, "before the backup").await;
    let manifest = operator.ok("POST", "/backups/b").await;
    assert_eq!(manifest["counts"]["messages"], 1, "{manifest}");
    let later = app.post(&token, "after the backup").await;

    operator.ok("POST", "/restore/b/load").await;
    assert!(exists(&app, &later.id).await, "loading changes nothing live");
    let switched = in_maintenance(&app, &operator, "/restore/switch").await;
    assert_eq!(switched["after"]["counts"]["messages"], 1, "{switched}");
    assert!(exists(&app, &kept.id).await);
    assert!(!exists(&app, &later.id).await);
    let indexes = app.collection().await.list_index_names().await.unwrap();
    assert!(
        indexes.iter().any(|i| i == "author_time_id"),
        "the indexes came with the switch: {indexes:?}"
    );

    in_maintenance(&app, &operator, "/restore/undo").await;
    assert!(
        exists(&app, &later.id).await,
        "undo brings back what the restore replaced"
    );
    operator.ok("POST", "/restore/b/load").await;
    in_maintenance(&app, &operator, "/restore/switch").await;
    operator.ok("POST", "/restore/confirm").await;
    assert!(!exists(&app, &later.id).await);
    app.post(&token, "after the restore").await;
}

#[tokio::test]
async fn a_document_the_validator_refuses_stops_the_load_and_changes_nothing() {
    let (app, operator, backups) = spawn().await;
    let (_, token) = app.user("author", Role::User);
    app.post(&token, "one").await;
    operator.ok("POST", "/backups/b").await;
    let crafted = backups.path().join("crafted");
    std::fs::create_dir(&crafted).unwrap();
    for entry in std::fs::read_dir(backups.path().join("b")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), crafted.join(entry.file_name())).unwrap();
    }
    // A message with a field the data model forbids (a copied author
    // name), counted in the manifest so only the validator can stop it.
    let invalid = doc! {
        "_id": uuid::Uuid::now_v7().to_string(), "author_id": uuid::Uuid::new_v4().to_string(),
        "body": "copied", "created_at": DateTime::now(), "hidden": false, "author_name": "not ours to keep",
    };
    let mut bytes = std::fs::read(crafted.join("messages.bson")).unwrap();
    bytes.extend(mongodb::bson::to_vec(&invalid).unwrap());
    std::fs::write(crafted.join("messages.bson"), bytes).unwrap();
    let manifest_file = crafted.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_file).unwrap()).unwrap();
    manifest["counts"]["messages"] = 2.into();
    std::fs::write(&manifest_file, manifest.to_string()).unwrap();
    reseal(&crafted);
    app.post(&token, "two").await;

    let before = operator.ok("GET", "/store").await;
    let reason = operator.refused("POST", "/restore/crafted/load").await;
    println!("refused: {reason}\nbefore: {before}");
    assert!(
        reason.contains("loading messages") && reason.contains("nothing live was changed"),
        "{reason}"
    );
    assert_eq!(
        operator.ok("GET", "/store").await,
        before,
        "the live database is as it was"
    );
    assert_eq!(app.stored_count().await, 2);
}
