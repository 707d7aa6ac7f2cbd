//! A Redis key prefix per test, on one server or on a cluster; its keys
//! are deleted afterwards.

/// Where a test's keys are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Node(String),
    /// Seed URLs of a Redis Cluster.
    Cluster(Vec<String>),
}

/// Whether the tests run on a Redis Cluster: `CHIRP_TEST_REDIS=cluster`
/// (CI runs comment-service's suite both ways).
#[must_use]
pub fn on_cluster() -> bool {
    std::env::var("CHIRP_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

pub struct KeyPrefix {
    target: Target,
    prefix: String,
}

impl KeyPrefix {
    /// A prefix `test:<uuid>:` on the shared server: `TEST_REDIS_URL`, else
    /// the one on 127.0.0.1:6379, else a private one for this test process
    /// ([`crate::process::StoreProcess::shared_url`]); with
    /// `CHIRP_TEST_REDIS=cluster`, on the shared cluster
    /// ([`crate::redis_cluster::RedisCluster::shared_urls`]).
    #[must_use]
    pub fn new() -> Self {
        if on_cluster() {
            Self::on_cluster(crate::redis_cluster::RedisCluster::shared_urls())
        } else {
            Self::on(&crate::process::StoreProcess::shared_url(
                crate::process::SharedKind::Redis,
            ))
        }
    }

    /// A prefix on the server at `url`.
    #[must_use]
    pub fn on(url: &str) -> Self {
        Self::at(Target::Node(url.to_owned()))
    }

    /// A prefix on the cluster seeded by `urls`.
    #[must_use]
    pub fn on_cluster(urls: Vec<String>) -> Self {
        Self::at(Target::Cluster(urls))
    }

    fn at(target: Target) -> Self {
        Self {
            target,
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        }
    }

    #[must_use]
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The server's URL, or the cluster's first seed.
    #[must_use]
    pub fn url(&self) -> &str {
        match &self.target {
            Target::Node(url) => url,
            Target::Cluster(urls) => urls.first().map_or("", String::as_str),
        }
    }

    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeyPrefix {
    fn drop(&mut self) {
        // Every node of a cluster: a replica refuses the deletes, its master
        // does them.
        let urls = match &self.target {
            Target::Node(url) => vec![url.clone()],
            Target::Cluster(urls) => urls.clone(),
        };
        // With the side and kept keys a restore leaves beside them.
        let patterns = ["", "restore/", "kept/"].map(|side| format!("{side}{}*", self.prefix));
        crate::block_on_fresh_runtime(async move {
            for url in urls {
                let Ok(client) = redis::Client::open(url) else { continue };
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    continue;
                };
                for pattern in &patterns {
                    delete_matching(&mut conn, pattern).await;
                }
            }
        });
    }
}

async fn delete_matching(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) {
    let mut cursor: u64 = 0;
    loop {
        let scanned: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await;
        let Ok((next, keys)) = scanned else { return };
        if !keys.is_empty() {
            // One key per command: on a cluster node, keys of several slots
            // cannot share one.
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key).ignore();
            }
            let _: redis::RedisResult<()> = pipe.query_async(conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
