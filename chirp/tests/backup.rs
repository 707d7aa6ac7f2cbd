//! `chirp backup` and `chirp restore` on a running mesh, one service at a
//! time: what the API returns and what the store holds go back to the
//! backup moment, while a client calling every other service sees no error
//! beyond the degraded parts the fault-isolation matrix documents; a damaged
//! or newer backup is refused and changes nothing.
//!
//! `CHIRP_BACKUP_TEST_SIZE` sets how many messages (and as many comments)
//! the data set has (default 300).

mod common;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use chirp_proto::{
    message::v2::{self as m2, message_service_client::MessageServiceClient},
    user::v1::{user_service_client::UserServiceClient, GetUserRequest},
};
use common::{
    free_port_base,
    world::{allowed, write, Watcher, World},
    Up,
};
use serde_json::Value;
use test_support::grpc::authed;

const SERVICES: [&str; 4] = [
    "user-service",
    "message-service",
    "comment-service",
    "analytics-service",
];

fn backup_dirs(json: &str) -> Vec<(String, PathBuf, Value)> {
    let taken: Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
    taken
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            println!(
                "backed up {} in {:.2} s, {} bytes",
                b["service"], b["seconds"], b["bytes"]
            );
            (
                b["service"].as_str().unwrap().to_owned(),
                PathBuf::from(b["dir"].as_str().unwrap()),
                b["manifest"].clone(),
            )
        })
        .collect()
}

fn restore(up: &Up, service: &str, dir: &Path) -> (i32, String) {
    up.run(&["--json", "restore", service, dir.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_is_restored_to_its_backup_while_the_others_keep_serving() {
    let size: usize = std::env::var("CHIRP_BACKUP_TEST_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let up = Up::start_with(data.path(), free_port_base(), &["--no-seed"]);
    let mut world = World::new(&up);
    world.register("backup_author").await;
    world.login("backup_author").await;
    let world = Arc::new(world);

    let start = Instant::now();
    let before_ids = write(&world, size, "kept").await;
    println!(
        "wrote {size} messages and {size} comments in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    // Analytics counts what the outboxes delivered: wait for all of it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while world.messages_posted().await < size as i64 {
        assert!(Instant::now() < deadline, "analytics did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !common::settled(&up.status()) {
        assert!(Instant::now() < deadline, "the mesh did not settle: {:#}", up.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let backups_dir = data.path().join("backups");
    let (code, out) = up.run(&["--json", "backup", "all", "--to", backups_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let backups = backup_dirs(&out);
    for (service, dir, manifest) in &backups {
        println!("backup of {service}: {} counts {}", dir.display(), manifest["counts"]);
    }
    for (service, dir, _) in &backups {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir), 0o700, "{service}'s backup directory is private");
        for file in std::fs::read_dir(dir).unwrap() {
            let file = file.unwrap().path();
            assert_eq!(mode(&file), 0o600, "{} is private", file.display());
        }
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for secret in ["keys/ingest-token", "keys/signing.pem"] {
        assert_eq!(mode(&data.path().join(secret)), 0o600, "{secret} is the owner's alone");
    }
    for dir in ["keys", "backups", "run"] {
        assert_eq!(mode(&data.path().join(dir)), 0o700, "{dir} is private");
    }
    let manifest_of = |service: &str| backups.iter().find(|(s, _, _)| s == service).unwrap().clone();
    assert_eq!(manifest_of("message-service").2["counts"]["messages"], size as u64);
    assert_eq!(manifest_of("comment-service").2["counts"]["comments"], size as u64);

    // After the backup: a new user, new messages with comments, a deleted
    // message and another comment on a kept one.
    let newcomer = world.register("after_backup").await;
    let after_ids = write(&world, 10, "later").await;
    let until_posted = |count: i64| {
        let world = world.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while world.messages_posted().await != count {
                assert!(Instant::now() < deadline, "analytics did not reach {count} messages");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    until_posted(size as i64 + 10).await;
    MessageServiceClient::new(world.messages.clone())
        .delete_message(authed(
            m2::DeleteMessageRequest {
                message_id: before_ids[0].clone(),
            },
            &world.token,
        ))
        .await
        .expect("delete");
    world.comment(&before_ids[1], "a second comment".into()).await;
    until_posted(size as i64 + 9).await;

    // A damaged backup and a newer one are refused; nothing changes.
    let (_, comment_backup, _) = manifest_of("comment-service");
    let damaged = data.path().join("damaged");
    copy_dir(&comment_backup, &damaged);
    let file = damaged.join("keys.jsonl");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    let (code, out) = restore(&up, "comment-service", &damaged);
    assert_ne!(code, 0, "a damaged backup is refused: {out}");
    assert!(out.contains("does not match its checksum"), "{out}");
    let newer = data.path().join("newer");
    copy_dir(&comment_backup, &newer);
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(newer.join("manifest.json")).unwrap()).unwrap();
    manifest["schema_version"] = (manifest["schema_version"].as_i64().unwrap() + 1).into();
    std::fs::write(newer.join("manifest.json"), manifest.to_string()).unwrap();
    let (code, out) = restore(&up, "comment-service", &newer);
    assert_ne!(code, 0, "a newer backup is refused: {out}");
    assert!(out.contains("schema version"), "{out}");
    assert_eq!(
        world.comment_count(&before_ids[1]).await,
        2,
        "the refused restores changed nothing"
    );
    assert_eq!(up.part("comment-service")["service"]["serving"], true);

    // Each service restored in turn, a client calling the others meanwhile.
    let probe = before_ids[2].clone();
    for service in SERVICES {
        // The previous restore's degradation has cleared (its peers'
        // circuits closed again) before the next one is judged.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let whole = world.get(&probe).await.is_ok_and(|m| {
                let ok = m2::PartStatus::Ok as i32;
                m.author.is_some_and(|a| a.status == ok) && m.comments.is_some_and(|c| c.status == ok)
            });
            if whole {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the mesh did not recover before restoring {service}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, dir, manifest) = manifest_of(service);
        let watcher = Watcher::start(&world, service, probe.clone());
        watcher.calls(9).await;
        let started = Instant::now();
        let (code, out) = restore(&up, service, &dir);
        let took = started.elapsed();
        watcher.calls(9).await;
        let (outcomes, calls) = watcher.finish().await;
        assert_eq!(code, 0, "{out}");
        let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        println!(
            "{service}: restored in {:.2} s; before {} → after {} (backup {}); {calls} calls to the others: {outcomes:?}",
            took.as_secs_f64(),
            report["before"],
            report["after"],
            manifest["counts"]
        );
        assert_eq!(
            report["after"], manifest["counts"],
            "the store holds what the backup held"
        );
        let unexpected: Vec<&(String, usize)> = outcomes.iter().filter(|(o, _)| !allowed(service, o)).collect();
        assert!(
            unexpected.is_empty(),
            "restoring {service} cost the others: {unexpected:?}"
        );
        assert_eq!(up.part(service)["service"]["serving"], true, "{service} serves again");
    }

    // What the API says is the backup moment's.
    let gone = UserServiceClient::new(world.users.clone())
        .get_user(GetUserRequest { user_id: newcomer })
        .await;
    assert_eq!(
        gone.unwrap_err().code(),
        tonic::Code::NotFound,
        "the user registered later is gone"
    );
    assert_eq!(
        world.get(&after_ids[0]).await.unwrap_err().code(),
        tonic::Code::NotFound,
        "a message posted later is gone"
    );
    let deleted = world.get(&before_ids[0]).await.expect("the deleted message is back");
    assert_eq!(deleted.comments.unwrap().count, 1);
    assert_eq!(
        world.comment_count(&before_ids[1]).await,
        1,
        "the later comment is gone"
    );
    assert_eq!(
        world.messages_posted().await,
        size as i64,
        "analytics counts as at the backup"
    );
    // Each restore kept what it replaced. comment-service's comes back with
    // --undo (the later comment with it), goes again with a second
    // restore, and is dropped with --confirm, after which nothing is left
    // to undo; the others are confirmed.
    let (_, comment_backup, _) = manifest_of("comment-service");
    let (code, out) = up.run(&["restore", "comment-service", "--undo"]);
    assert_eq!(code, 0, "{out}");
    println!("{out}");
    assert_eq!(
        world.comment_count(&before_ids[1]).await,
        2,
        "--undo brought the replaced data back"
    );
    let (code, out) = restore(&up, "comment-service", &comment_backup);
    assert_eq!(code, 0, "{out}");
    assert_eq!(world.comment_count(&before_ids[1]).await, 1, "restored again");
    for service in SERVICES {
        let (code, out) = up.run(&["restore", service, "--confirm"]);
        assert_eq!(code, 0, "{service}: {out}");
    }
    let (code, out) = up.run(&["restore", "comment-service", "--undo"]);
    assert_ne!(code, 0, "nothing is left to undo once confirmed: {out}");
    assert!(out.contains("nothing to undo"), "{out}");
    assert_eq!(
        world.comment_count(&before_ids[1]).await,
        1,
        "the refused undo changed nothing"
    );
    assert_eq!(up.part("comment-service")["service"]["serving"], true);

    // The mesh works on: a new post flows to analytics.
    world.post("after the restores".into()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.messages_posted().await < size as i64 + 1 {
        assert!(
            Instant::now() < deadline,
            "a post after the restores did not reach analytics"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    up.stop();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
