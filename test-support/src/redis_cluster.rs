//! A Redis Cluster of the test's own: six `redis-server`s (three masters,
//! three replicas) on free ports, joined with `redis-cli --cluster create`,
//! each a [`StoreProcess`] a test can kill and start again.

use std::{process::Command, sync::OnceLock, time::Duration};

use anyhow::{bail, Context as _};

use crate::process::StoreProcess;

/// Six nodes, replicas 1: the smallest cluster that survives the loss of
/// any one node.
pub struct RedisCluster {
    nodes: Vec<StoreProcess>,
}

impl RedisCluster {
    /// Starts six nodes and makes them one cluster; returns once every slot
    /// is served and every master's replica has synced.
    ///
    /// # Errors
    /// When redis-server or redis-cli cannot run, or the cluster does not
    /// form within 30 seconds.
    pub fn start() -> anyhow::Result<Self> {
        let nodes = (0..6)
            .map(|_| StoreProcess::redis_cluster_node())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let output = create.output().context("running redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let cluster = Self { nodes };
        cluster.wait_until_ok(Duration::from_secs(30))?;
        // Until a replica has synced, it cannot take over.
        cluster.wait_until_replicated(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// The cluster this test process shares: `TEST_REDIS_CLUSTER_URLS`
    /// (comma-separated seeds) when set, else one started once for the
    /// process. Its seeds.
    ///
    /// # Panics
    /// When none is given and one cannot start.
    #[must_use]
    pub fn shared_urls() -> Vec<String> {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        if let Ok(urls) = std::env::var("TEST_REDIS_CLUSTER_URLS") {
            return urls.split(',').map(str::to_owned).collect();
        }
        SHARED
            .get_or_init(|| Self::start().unwrap_or_else(|e| panic!("a private Redis Cluster failed: {e:#}")))
            .urls()
    }

    /// Every node's URL (any of them is a seed).
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(StoreProcess::url).collect()
    }

    /// Node `i` (0–5), to stop, kill or start.
    #[must_use]
    pub fn node(&mut self, i: usize) -> &mut StoreProcess {
        &mut self.nodes[i]
    }

    /// Stops every node (an outage of the whole cluster), keeping its data.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// Kills every node outright.
    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every stopped node again and waits until the cluster serves
    /// every slot.
    ///
    /// # Errors
    /// When a node does not start or the cluster does not recover within
    /// 30 seconds.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.start()?;
        }
        self.wait_until_ok(Duration::from_secs(30))
    }

    /// The nodes that are masters now, by index.
    ///
    /// # Errors
    /// When no running node answers.
    pub fn masters(&self) -> anyhow::Result<Vec<usize>> {
        let mut masters = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            if role(node.port())? == "master" {
                masters.push(i);
            }
        }
        Ok(masters)
    }

    /// Waits until every running node says `cluster_state:ok`.
    ///
    /// # Errors
    /// When that takes longer than `limit`.
    pub fn wait_until_ok(&self, limit: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|n| n.is_running())
                .all(|n| cli(n.port(), &["CLUSTER", "INFO"]).is_ok_and(|info| info.contains("cluster_state:ok")));
            if ok {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("the cluster is not ok after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl RedisCluster {
    /// Waits until `masters` running nodes are masters and the cluster
    /// serves every slot: after a master is killed, until its replica has
    /// taken over.
    ///
    /// # Errors
    /// When that takes longer than `limit`.
    pub fn wait_until_promoted(&self, masters: usize, limit: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        while self.masters().map_or(true, |m| m.len() < masters) {
            if start.elapsed() > limit {
                bail!("no replica took over within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_until_ok(limit.saturating_sub(start.elapsed()))
    }

    /// The slot ranges node `i` serves as a master (none for a replica).
    ///
    /// # Errors
    /// When the node does not answer.
    pub fn slots_of(&self, i: usize) -> anyhow::Result<Vec<(u16, u16)>> {
        let nodes = cli(self.nodes[i].port(), &["CLUSTER", "NODES"])?;
        let mine = nodes
            .lines()
            .find(|l| l.split_whitespace().nth(2).is_some_and(|f| f.contains("myself")))
            .context("no `myself` in CLUSTER NODES")?;
        Ok(mine
            .split_whitespace()
            .skip(8)
            .filter_map(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                Some((from.parse().ok()?, to.parse().ok()?))
            })
            .collect())
    }

    /// The hash slot of `key`.
    ///
    /// # Errors
    /// When no node answers.
    pub fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        let node = self.nodes.iter().find(|n| n.is_running()).context("no node runs")?;
        Ok(cli(node.port(), &["CLUSTER", "KEYSLOT", key])?.trim().parse()?)
    }

    /// Waits until every running master has a replica whose link is up (a
    /// node that came back rejoins as its old master's successor's replica).
    ///
    /// # Errors
    /// When that takes longer than `limit`.
    pub fn wait_until_replicated(&self, limit: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            let replicated = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                cli(n.port(), &["INFO", "replication"]).is_ok_and(|info| {
                    let field = |name: &str| {
                        info.lines()
                            .find_map(|l| l.trim().strip_prefix(name))
                            .unwrap_or_default()
                            .to_owned()
                    };
                    match field("role:").as_str() {
                        "master" => field("connected_slaves:").parse::<u32>().is_ok_and(|n| n >= 1),
                        _ => field("master_link_status:") == "up",
                    }
                })
            });
            if replicated {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("the cluster's masters have no replica in sync after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!("redis-cli failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn role(port: u16) -> anyhow::Result<String> {
    let out = cli(port, &["ROLE"])?;
    Ok(out.lines().next().unwrap_or_default().trim().to_owned())
}
