//! Backup and restore by comment-service itself, through its operator
//! routes: keys written under a side prefix and checked there before one
//! script switches them in; a truncated backup, a key the data model does
//! not know or a value of the wrong type is refused with nothing changed.

mod common;

use common::{add, all_comments, Backing, TestApp};
use service_kit::auth::Role;
use test_support::{
    grpc::authed,
    operator::{reseal, OneShot, Operator},
};

struct World {
    backing: Backing,
    app: TestApp,
    operator: Operator,
    backups: tempfile::TempDir,
    message: String,
    token: String,
}

impl World {
    async fn new() -> Self {
        let backing = Backing::shared().await;
        let backups = tempfile::tempdir().unwrap();
        let app = TestApp::spawn_with(&backing, &[&format!("--backup-dir={}", backups.path().display())]).await;
        let operator = Operator::new(app.metrics_addr);
        let (author, token) = backing.user(Role::User);
        let message = backing.message(&author);
        Self {
            backing,
            app,
            operator,
            backups,
            message,
            token,
        }
    }

    async fn comment(&self, body: &str) -> String {
        self.app
            .client()
            .add_comment(authed(add(&self.message, body), &self.token))
            .await
            .expect("AddComment")
            .into_inner()
            .comment
            .unwrap()
            .id
    }

    async fn comment_ids(&self) -> Vec<String> {
        all_comments(&self.app, &self.message, 100)
            .await
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    async fn in_maintenance(&self, path: &str) -> serde_json::Value {
        self.operator
            .in_maintenance(&self.app.channel, common::SERVICE, path)
            .await
    }

    /// A copy of backup `name` as `crafted`, its keys rewritten by `edit`
    /// (one JSON value per line) and its manifest resealed.
    fn crafted(&self, name: &str, edit: impl Fn(&mut serde_json::Value)) {
        let from = self.backups.path().join(name);
        let to = self.backups.path().join("crafted");
        std::fs::create_dir(&to).unwrap();
        std::fs::copy(from.join("manifest.json"), to.join("manifest.json")).unwrap();
        let mut out = String::new();
        for line in std::fs::read_to_string(from.join("keys.jsonl")).unwrap().lines() {
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            edit(&mut value);
            out.push_str(&value.to_string());
            out.push('\n');
        }
        std::fs::write(to.join("keys.jsonl"), out).unwrap();
        reseal(&to);
    }
}

#[tokio::test]
async fn a_restore_brings_back_the_backups_keys_and_undo_the_replaced_ones() {
    let world = World::new().await;
    let first = world.comment("before the backup").await;
    let manifest = world.operator.ok("POST", "/backups/b").await;
    assert_eq!(manifest["counts"]["comments"], 1, "{manifest}");
    let later = world.comment("after the backup").await;

    world.operator.ok("POST", "/restore/b/load").await;
    assert_eq!(world.comment_ids().await.len(), 2, "loading changes nothing live");
    let switched = world.in_maintenance("/restore/switch").await;
    assert_eq!(switched["after"]["counts"], manifest["counts"], "{switched}");
    assert_eq!(world.comment_ids().await, vec![first.clone()]);

    world.in_maintenance("/restore/undo").await;
    assert_eq!(world.comment_ids().await, vec![first.clone(), later.clone()], "undo");
    world.operator.ok("POST", "/restore/b/load").await;
    world.in_maintenance("/restore/switch").await;
    world.operator.ok("POST", "/restore/confirm").await;
    assert_eq!(world.comment_ids().await, vec![first]);
    world.comment("after the restore").await;
    drop(world.backing);
}

#[tokio::test]
async fn the_binary_backs_up_and_restores_its_store_with_the_services_own_configuration() {
    let world = World::new().await;
    let binary = OneShot::new(
        env!("CARGO_BIN_EXE_comment-service"),
        &[
            world.backing.redis_env(),
            ("REDIS_KEY_PREFIX", world.backing.prefix.prefix().to_owned()),
            ("BACKUP_DIR", world.backups.path().display().to_string()),
        ],
    );
    let first = world.comment("before the backups").await;
    let oldest = binary.ok(&["backup"]).await["backup"].as_str().unwrap().to_owned();
    // Named by hand: never rotated.
    binary.ok(&["backup", "comment-service-pre-upgrade"]).await;
    let taken = binary.ok(&["backup", "--keep", "1"]).await;
    assert_eq!(taken["manifest"]["counts"]["comments"], 1, "{taken}");
    assert_eq!(taken["removed"], serde_json::json!([oldest]), "{taken}");
    assert!(!world.backups.path().join(&oldest).exists());
    assert!(world.backups.path().join("comment-service-pre-upgrade").exists());
    let name = taken["backup"].as_str().unwrap().to_owned();
    let later = world.comment("after the backups").await;

    let (code, refused) = binary.run(&["restore", &name]).await;
    assert_eq!(
        code, 2,
        "a restore without --replicas-stopped is a usage error: {refused}"
    );
    assert_eq!(world.comment_ids().await.len(), 2, "and changes nothing");

    let restored = binary.ok(&["restore", "--replicas-stopped", &name]).await;
    assert_eq!(restored["after"]["counts"]["comments"], 1, "{restored}");
    assert_eq!(world.comment_ids().await, vec![first.clone()]);
    binary.ok(&["restore", "--undo", "--replicas-stopped"]).await;
    assert_eq!(world.comment_ids().await, vec![first.clone(), later], "undo");
    binary.ok(&["restore", "--replicas-stopped", &name]).await;
    binary.ok(&["restore", "--confirm"]).await;
    let (code, report) = binary.run(&["restore", "--confirm"]).await;
    assert_ne!(code, 0, "nothing is kept after a confirm: {report}");
    assert_eq!(world.comment_ids().await, vec![first]);
    drop(world.backing);
}

#[tokio::test]
async fn a_truncated_backup_is_refused_and_changes_nothing() {
    let world = World::new().await;
    world.comment("one").await;
    world.comment("two").await;
    world.operator.ok("POST", "/backups/b").await;
    world.crafted("b", |_| {});
    let keys = world.backups.path().join("crafted").join("keys.jsonl");
    let bytes = std::fs::read(&keys).unwrap();
    std::fs::write(&keys, &bytes[..bytes.len() - 20]).unwrap();
    reseal(&world.backups.path().join("crafted"));
    world.comment("three").await;
    let before = world.operator.ok("GET", "/store").await;
    let ids = world.comment_ids().await;

    let reason = world.operator.refused("POST", "/restore/crafted/load").await;
    println!("refused: {reason}\nbefore: {before}");
    assert!(
        reason.contains("keys.jsonl line") && reason.contains("nothing live was changed"),
        "{reason}"
    );
    assert_eq!(
        world.operator.ok("GET", "/store").await,
        before,
        "the live keys are as they were"
    );
    assert_eq!(world.comment_ids().await, ids);
    world.comment("four").await;
    let changed = world.operator.ok("GET", "/store").await;
    assert_ne!(
        changed["digest"], before["digest"],
        "the digest sees any change: {changed}"
    );
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_refused_and_changes_nothing() {
    let world = World::new().await;
    world.comment("one").await;
    world.operator.ok("POST", "/backups/b").await;
    world.crafted("b", |line| {
        if line["key"].as_str().unwrap().contains("}c:") {
            line["type"] = "hash".into();
            line["value"] = serde_json::json!([["body", "not a comment"]]);
        }
    });
    let before = world.operator.ok("GET", "/store").await;
    let reason = world.operator.refused("POST", "/restore/crafted/load").await;
    println!("refused: {reason}");
    assert!(
        reason.contains("is a hash in the backup, a string in the data model"),
        "{reason}"
    );
    assert_eq!(world.operator.ok("GET", "/store").await, before);
}

#[tokio::test]
async fn a_comment_that_is_not_one_or_not_in_its_messages_group_is_refused_and_changes_nothing() {
    let world = World::new().await;
    world.comment("one").await;
    world.operator.ok("POST", "/backups/b").await;
    for (edit, expected) in [
        (
            (|line: &mut serde_json::Value| line["value"] = "not a comment".into()) as fn(&mut serde_json::Value),
            "not a comment of the data model",
        ),
        (
            |line: &mut serde_json::Value| {
                let key = line["key"].as_str().unwrap();
                let (_, rest) = key.split_once('}').unwrap();
                let other = if key.starts_with("{g0.315}") {
                    "{g1.1526}"
                } else {
                    "{g0.315}"
                };
                line["key"] = format!("{other}{rest}").into();
            },
            "not in its message's group",
        ),
    ] {
        world.crafted("b", |line| {
            if line["key"].as_str().unwrap().contains("}c:") {
                edit(line);
            }
        });
        let before = world.operator.ok("GET", "/store").await;
        let reason = world.operator.refused("POST", "/restore/crafted/load").await;
        println!("refused: {reason}");
        assert!(reason.contains(expected), "{reason}");
        assert_eq!(world.operator.ok("GET", "/store").await, before);
        std::fs::remove_dir_all(world.backups.path().join("crafted")).unwrap();
    }
}

#[tokio::test]
async fn a_list_naming_something_else_than_its_groups_comments_at_score_0_is_refused_and_changes_nothing() {
    let world = World::new().await;
    world.comment("one").await;
    world.operator.ok("POST", "/backups/b").await;
    for (edit, expected) in [
        (
            (|list: &mut serde_json::Value| list["value"][0][1] = "5".into()) as fn(&mut serde_json::Value),
            "a score other than 0",
        ),
        (
            |list: &mut serde_json::Value| list["value"][0][0] = "not-an-id".into(),
            "not an id as the store writes one",
        ),
        (
            |list: &mut serde_json::Value| list["value"][0][0] = uuid::Uuid::now_v7().simple().to_string().into(),
            "not an id as the store writes one",
        ),
    ] {
        world.crafted("b", |line| {
            if line["key"].as_str().unwrap().contains("}m:") {
                edit(line);
            }
        });
        let before = world.operator.ok("GET", "/store").await;
        let reason = world.operator.refused("POST", "/restore/crafted/load").await;
        assert!(reason.contains(expected), "{reason}");
        assert_eq!(world.operator.ok("GET", "/store").await, before);
        std::fs::remove_dir_all(world.backups.path().join("crafted")).unwrap();
    }
}

#[tokio::test]
async fn a_key_outside_the_data_model_is_refused_and_changes_nothing() {
    let world = World::new().await;
    world.comment("one").await;
    world.operator.ok("POST", "/backups/b").await;
    world.crafted("b", |line| {
        if line["key"] == "{meta}schema_version" {
            line["key"] = "../../elsewhere".into();
        }
    });
    let before = world.operator.ok("GET", "/store").await;
    let reason = world.operator.refused("POST", "/restore/crafted/load").await;
    println!("refused: {reason}\nbefore: {before}");
    assert!(reason.contains("no key of comment-service's data model"), "{reason}");
    assert_eq!(world.operator.ok("GET", "/store").await, before);
}
