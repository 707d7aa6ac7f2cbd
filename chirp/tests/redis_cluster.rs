//! `chirp up --redis-cluster`: comment-service on a six-node Redis Cluster
//! that `chirp up` runs, shows, supervises and lets an operator stop node by
//! node; a master stopped is replaced by its replica and comments go on;
//! comment-service backs the cluster up like one Redis.

mod common;

use std::time::{Duration, Instant};

use common::{rand_u16, Up};

/// A block of ports free for the mesh and the cluster's six nodes (each
/// 100 above the last, with its bus port 50 above it).
fn free_base_for_a_cluster() -> u16 {
    for _ in 0..200 {
        let base = 10_000 + rand_u16() % 20_000;
        let free = (0..30)
            .chain((0..6).flat_map(|n| [22 + 100 * n, 72 + 100 * n]))
            .all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free block of ports");
}

/// Whether the node on `port` holds a key matching `pattern`.
fn holds(port: u16, pattern: &str) -> bool {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--scan", "--pattern", pattern])
        .output()
        .expect("redis-cli runs");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

fn role(port: u16) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "ROLE"])
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_cluster_runs_as_parts_of_the_mesh_and_comments_survive_a_master_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_for_a_cluster();
    let up = Up::start_with(dir.path(), base, &["--redis-cluster"]);

    let status = up.status();
    let nodes: Vec<&serde_json::Value> = status["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["part"] == "redis")
        .collect();
    assert_eq!(nodes.len(), 6, "{status}");
    assert!(nodes.iter().all(|n| n["state"] == "running"), "{nodes:?}");
    let (_, table) = up.run(&["status"]);
    println!("{table}");
    assert!(table.contains("redis-6"), "{table}");

    up.run(&["login", "alice"]);
    let (code, posted) = up.run(&["--json", "post", "on a cluster"]);
    assert_eq!(code, 0, "{posted}");
    let message = serde_json::from_str::<serde_json::Value>(posted.trim()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out) = up.run(&["--json", "comment", &message, "before"]);
    assert_eq!(code, 0, "{out}");
    let comment = serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Stop the master that holds the message's comments, the way an
    // operator would; its replica takes over.
    let master = (1..=6u16)
        .find(|n| {
            let port = base + 22 + 100 * (n - 1);
            role(port) == "master" && holds(port, &format!("*c:{comment}"))
        })
        .expect("the master of the message's group");
    let name = if master == 1 {
        "redis".to_owned()
    } else {
        format!("redis-{master}")
    };
    let (code, out) = up.run(&["chaos", "stop", &name]);
    assert_eq!(code, 0, "{out}");
    let stopped = Instant::now();
    let mut comments = 0;
    while comments < 5 {
        let (code, _) = up.run(&["comment", &message, "during the failover"]);
        if code == 0 {
            comments += 1;
        } else {
            assert!(
                stopped.elapsed() < Duration::from_secs(30),
                "no comment within 30 s of {name} stopped"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "comments go on {:.1} s after {name} stopped",
        stopped.elapsed().as_secs_f64()
    );
    let (code, out) = up.run(&["chaos", "start", &name]);
    assert_eq!(code, 0, "{out}");

    let (code, shown) = up.run(&["--json", "get", &message]);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains("before") && shown.contains("during the failover"),
        "{shown}"
    );

    // comment-service backs up every master's share.
    let (code, out) = up.run(&["backup", "comment-service"]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    let backed_up: u32 = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("comments="))
        .and_then(|n| n.parse().ok())
        .expect("a count of comments");
    assert!(
        backed_up >= 6,
        "the six comments written here, beside the demo's: {out}"
    );
}
