//! A Redis key prefix per test; its keys are deleted afterwards.

pub struct KeyPrefix {
    url: String,
    prefix: String,
}

impl KeyPrefix {
    /// A prefix `test:<uuid>:` on the shared server: `TEST_REDIS_URL`, else
    /// the one on 127.0.0.1:6379, else a private one for this test process
    /// ([`crate::process::StoreProcess::shared_url`]).
    #[must_use]
    pub fn new() -> Self {
        Self::on(&crate::process::StoreProcess::shared_url(
            crate::process::SharedKind::Redis,
        ))
    }

    /// A prefix on the server at `url`.
    #[must_use]
    pub fn on(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        }
    }

    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
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
        let url = self.url.clone();
        // With the side and kept keys a restore leaves beside them.
        let patterns = ["", "restore/", "kept/"].map(|side| format!("{side}{}*", self.prefix));
        crate::block_on_fresh_runtime(async move {
            let Ok(client) = redis::Client::open(url) else { return };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return;
            };
            for pattern in &patterns {
                delete_matching(&mut conn, pattern).await;
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
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
