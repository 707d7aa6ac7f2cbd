//! One handle on comment-service's Redis, a single server or a cluster.
//!
//! Both are made lazily (the service starts, NOT_SERVING, while Redis is
//! down) and reconnect by themselves: the connection manager after a
//! restart of the server; the cluster client after a failover, following
//! `MOVED`/`ASK` and refreshing its slot map. The store's code is the same
//! for both: every multi-key command, pipeline and script stays within one
//! hash slot (see [`super::keys`]), which a single server satisfies
//! trivially.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo},
    Cmd, Pipeline, RedisFuture, Value,
};

/// Where comment-service's Redis is: `REDIS_URL` or `REDIS_CLUSTER_URLS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// One server (or a primary with replicas behind one address).
    Node(String),
    /// Seed nodes of a Redis Cluster; the client learns the rest.
    Cluster(Vec<String>),
}

/// A command that waits longer than this for its answer fails (so a
/// server that stops answering mid-connection cannot hold a request).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// The same for maintenance's long scripts.
const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to a single server or a cluster, cheap to clone.
#[derive(Clone)]
pub enum Redis {
    Node(ConnectionManager),
    /// With when (Unix ms, 0: never) the cluster was first seen not
    /// serving every slot, in this episode.
    Cluster(ClusterConnection, Arc<AtomicI64>),
}

/// How long a cluster may leave slots unserved before the store counts as
/// down: long enough for a replica to take over from a lost master (about
/// two node timeouts), so that during a failover the calls to the other
/// masters go on and only those to the lost master's slots fail.
const FAILOVER_GRACE: Duration = Duration::from_secs(5);

impl Redis {
    /// A lazy connection to `address`, with the store's timeouts.
    ///
    /// # Errors
    /// When an URL cannot be parsed.
    pub fn connect_lazy(address: &Address) -> anyhow::Result<Self> {
        Self::lazy(address, RESPONSE_TIMEOUT)
    }

    /// A lazy connection with a long response timeout: a backup's
    /// snapshot or a restore's switch is one long script, but a node that
    /// stops answering must not hold the maintenance lock for ever.
    ///
    /// # Errors
    /// When an URL cannot be parsed.
    pub fn for_maintenance(address: &Address) -> anyhow::Result<Self> {
        Self::lazy(address, MAINTENANCE_TIMEOUT)
    }

    fn lazy(address: &Address, response_timeout: Duration) -> anyhow::Result<Self> {
        Ok(match address {
            Address::Node(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(1);
                Self::Node(ConnectionManager::new_lazy_with_config(
                    redis::Client::open(url.as_str())?,
                    config,
                )?)
            }
            Address::Cluster(seeds) => {
                let builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                    .connection_timeout(CONNECTION_TIMEOUT)
                    .response_timeout(response_timeout)
                    // A command is retried (after MOVED, ASK, or a node
                    // lost) a few times within about a second, which
                    // covers a replica's promotion once it is announced;
                    // the caller's deadline bounds the rest.
                    .retries(3)
                    .min_retry_wait(50)
                    .max_retry_wait(400);
                Self::Cluster(
                    builder
                        .build()?
                        .get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new()),
                    Arc::new(AtomicI64::new(0)),
                )
            }
        })
    }

    /// Whether the store can serve: a single server answers `PING`; a
    /// cluster says every slot is served (`CLUSTER INFO`), so a cluster
    /// that lost a slot range counts as down, once that has lasted longer
    /// than a failover takes ([`FAILOVER_GRACE`]). The nodes are meant to
    /// run with `cluster-require-full-coverage no`, so that meanwhile the
    /// other masters keep answering for their slots.
    ///
    /// # Errors
    /// When it cannot.
    pub async fn probe(&self) -> redis::RedisResult<()> {
        let mut conn = self.clone();
        match self {
            Self::Node(_) => {
                let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            }
            Self::Cluster(_, failing_since) => {
                // Asked of a node at random: one that is gone (a master
                // being replaced) does not make the cluster down, so a
                // few are asked before the probe fails.
                let mut answer = redis::cmd("CLUSTER").arg("INFO").query_async::<String>(&mut conn).await;
                for _ in 0..2 {
                    match &answer {
                        Err(err) if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() => {
                            answer = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await;
                        }
                        _ => break,
                    }
                }
                let info = answer?;
                if serves_every_slot(&info) {
                    failing_since.store(0, Ordering::Relaxed);
                } else {
                    let now = chrono::Utc::now().timestamp_millis();
                    let since = match failing_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
                        Ok(_) => now,
                        Err(since) => since,
                    };
                    if now - since > i64::try_from(FAILOVER_GRACE.as_millis()).unwrap_or(i64::MAX) {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "the cluster has not served every slot for longer than a failover takes",
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Redis {
    /// Every key matching `pattern`, from every master (SCAN, so the
    /// server keeps serving meanwhile).
    ///
    /// # Errors
    /// When a node cannot be read.
    pub async fn scan_all(&self, pattern: &str) -> redis::RedisResult<Vec<String>> {
        let mut keys = Vec::new();
        match self {
            Self::Node(conn) => {
                let mut conn = conn.clone();
                let mut cursor = 0u64;
                loop {
                    let (next, batch): (u64, Vec<String>) = scan(cursor, pattern).query_async(&mut conn).await?;
                    keys.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Self::Cluster(conn, _) => {
                let mut conn = conn.clone();
                // A master being replaced would be skipped, and its keys
                // missed (a backup without them would still verify).
                let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await?;
                if !serves_every_slot(&info) {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                        "the cluster does not serve every slot now; try again once it does",
                    )));
                }
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await?;
                for (host, port) in masters(&nodes) {
                    let mut cursor = 0u64;
                    loop {
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        });
                        let reply = conn.route_command(scan(cursor, pattern), route).await?;
                        let (next, batch): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                        keys.extend(batch);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }
}

/// Whether `CLUSTER INFO` says the cluster is up and every one of its
/// 16384 slots is assigned to a master that is not failing.
fn serves_every_slot(info: &str) -> bool {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_default()
    };
    field("cluster_state") == "ok" && field("cluster_slots_ok") == "16384"
}

fn scan(cursor: u64, pattern: &str) -> Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
    cmd
}

/// The masters that serve slots, from `CLUSTER NODES`: `<id> <ip:port@bus>
/// <flags> <master> <ping> <pong> <epoch> <link> <slot>…`.
fn masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serving = flags.split(',').any(|f| f == "master")
                && !flags.split(',').any(|f| f == "fail" || f == "fail?")
                && fields.len() > 8;
            if !serving {
                return None;
            }
            let address = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn, _) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn, _) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(conn) => conn.get_db(),
            Self::Cluster(conn, _) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_serves_when_every_slot_is_ok() {
        let ok = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n";
        let lost = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\ncluster_slots_pfail:5461\r\n";
        let down = "cluster_state:fail\r\ncluster_slots_ok:16384\r\n";
        assert!(serves_every_slot(ok));
        assert!(!serves_every_slot(lost));
        assert!(!serves_every_slot(down));
    }

    #[test]
    fn the_masters_serving_slots_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 1 1 connected
e5 10.0.0.5:7005@17005,redis-5 master - 0 1 5 connected 10923-16383
f6 127.0.0.1:7006@17006 master - 0 1 6 connected
";
        assert_eq!(
            masters(nodes),
            [
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7002),
                ("10.0.0.5".to_owned(), 7005)
            ]
        );
    }
}
