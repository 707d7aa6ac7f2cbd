//! `chirp up --redis-cluster`: comment-service's store as a six-node Redis
//! Cluster (three masters, three replicas) instead of one Redis. The nodes
//! are parts of the mesh like the others (supervised, restarted, stoppable
//! one by one); this module says how each is run and joins them once.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context as _};
use tokio::process::Command;

use crate::layout::{Instance, Part, Ports, REDIS_CLUSTER_NODES};

/// Every node of the cluster.
pub fn nodes() -> impl Iterator<Item = Instance> {
    (1..=REDIS_CLUSTER_NODES).map(|replica| Instance {
        part: Part::Redis,
        replica,
    })
}

/// The seed URLs comment-service is given: every node, directly (a fault
/// proxy in front of a node would hide the addresses the nodes tell the
/// client to go to).
#[must_use]
pub fn urls(ports: Ports) -> String {
    nodes()
        .map(|node| format!("redis://127.0.0.1:{}", ports.of(node)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `redis-server` as a node of the cluster, its data (AOF and
/// `nodes.conf`, which lets a restarted node rejoin) in `dir`.
#[must_use]
pub fn node_command(ports: Ports, node: Instance, dir: &Path) -> Command {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &ports.of(node).to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
        .args(["--cluster-port", &ports.cluster_bus(node).to_string()])
        // A master gone for two seconds is replaced by its replica.
        .args(["--cluster-node-timeout", "2000"])
        // While one is replaced, the other masters serve their slots.
        .args(["--cluster-require-full-coverage", "no"])
        .args(["--repl-diskless-sync-delay", "0"])
        // AOF: an acknowledged comment survives a restart, as on one node.
        .args(["--appendonly", "yes", "--save", ""])
        .arg("--dir")
        .arg(dir);
    command
}

async fn cli(ports: Ports, node: Instance, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new("redis-cli");
    command
        .args(["-h", "127.0.0.1", "-p", &ports.of(node).to_string()])
        .args(args)
        .kill_on_drop(true);
    // A node that accepts and never answers must not hold the start.
    let output = tokio::time::timeout(Duration::from_secs(5), command.output())
        .await
        .context("redis-cli did not answer within 5 s")?
        .context("running redis-cli")?;
    if !output.status.success() {
        bail!("redis-cli: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Joins the nodes into one cluster, unless they are one already (a data
/// directory of an earlier `chirp up --redis-cluster`), and waits until
/// every slot is served and every master's replica has synced.
///
/// # Errors
/// When the nodes cannot be joined, or do not serve within 30 seconds.
pub async fn join(ports: Ports) -> anyhow::Result<()> {
    let first = Instance::from(Part::Redis);
    let info = cli(ports, first, &["CLUSTER", "INFO"]).await?;
    if !info.lines().any(|l| l.trim() == "cluster_slots_assigned:16384") {
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in nodes() {
            create.arg(format!("127.0.0.1:{}", ports.of(node)));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .context("running redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        println!("[chirp] redis cluster created: three masters, three replicas");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if serving(ports).await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the Redis Cluster does not serve every slot with every replica in sync after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether every node says every slot is served, and every master has a
/// replica whose link is up (a replica that has not synced cannot take
/// over).
async fn serving(ports: Ports) -> bool {
    for node in nodes() {
        let (Ok(info), Ok(replication)) = (
            cli(ports, node, &["CLUSTER", "INFO"]).await,
            cli(ports, node, &["INFO", "replication"]).await,
        ) else {
            return false;
        };
        let field = |text: &str, name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':').map(str::to_owned))
                .unwrap_or_default()
        };
        let in_sync = match field(&replication, "role").as_str() {
            "master" => field(&replication, "connected_slaves")
                .parse::<u32>()
                .is_ok_and(|n| n >= 1),
            _ => field(&replication, "master_link_status") == "up",
        };
        if field(&info, "cluster_state") != "ok" || field(&info, "cluster_slots_ok") != "16384" || !in_sync {
            return false;
        }
    }
    true
}
