//! comment-service's keys in Redis. Only the service's own keys (its
//! prefix): a Redis may be shared by several tenants, and a restore must not
//! touch theirs, so the server-wide forms (`BGSAVE` and its RDB file, the
//! AOF directory) do not fit. The snapshot is one Lua script that `DUMP`s
//! every key of the prefix with its TTL: Redis runs a script atomically, so
//! it is one moment's view (the server pauses other clients for its length,
//! a few milliseconds per thousand keys). `keys.jsonl` holds one
//! `{"key", "ttl_ms", "dump"}` line per key (base64; `ttl_ms` -1 for none);
//! a restore deletes the prefix's keys and `RESTORE`s each.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use redis::{aio::MultiplexedConnection, AsyncCommands as _, Value};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use super::Store;

const FILE: &str = "keys.jsonl";
/// Keys restored (or deleted) per round trip.
const BATCH: usize = 500;

const SNAPSHOT: &str = r"
local keys = redis.call('KEYS', ARGV[1])
local out = {}
for _, key in ipairs(keys) do
  out[#out + 1] = key
  out[#out + 1] = redis.call('PTTL', key)
  out[#out + 1] = redis.call('DUMP', key)
end
return out
";

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    ttl_ms: i64,
    dump: String,
}

async fn connect(store: &Store) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(store.redis.as_str())?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// `prefix*` with the prefix's glob characters escaped.
fn pattern(prefix: &str) -> String {
    let mut pattern = String::new();
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// What a key holds, by the data model's naming (see comment-service's
/// store): `c:` comments, `m:` a message's comment list, `u:` a user's.
fn kind(key: &[u8], prefix: &str) -> String {
    let rest = key.strip_prefix(prefix.as_bytes()).unwrap_or(key);
    let rest = String::from_utf8_lossy(rest);
    if rest.starts_with("c:") {
        "comments".to_owned()
    } else if rest.starts_with("m:") {
        "message_comment_lists".to_owned()
    } else if rest.starts_with("u:") {
        "user_comment_sets".to_owned()
    } else {
        rest.into_owned()
    }
}

async fn keys(conn: &mut MultiplexedConnection, prefix: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut all = Vec::new();
    let mut iter: redis::AsyncIter<'_, Vec<u8>> = conn
        .scan_options(
            redis::ScanOptions::default()
                .with_pattern(pattern(prefix))
                .with_count(1000),
        )
        .await?;
    while let Some(key) = iter.next_item().await {
        all.push(key?);
    }
    Ok(all)
}

pub async fn inspect(store: &Store) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let mut conn = connect(store).await?;
    let mut counts = BTreeMap::new();
    for key in keys(&mut conn, &store.redis_prefix).await? {
        *counts.entry(kind(&key, &store.redis_prefix)).or_default() += 1;
    }
    let version: Option<i64> = conn.get(format!("{}schema_version", store.redis_prefix)).await?;
    Ok((version.unwrap_or(0), counts))
}

pub async fn backup(store: &Store, dir: &Path) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let mut conn = connect(store).await?;
    let reply: Vec<Value> = redis::Script::new(SNAPSHOT)
        .arg(pattern(&store.redis_prefix))
        .invoke_async(&mut conn)
        .await
        .context("the snapshot script")?;
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(dir.join(FILE)).await?);
    let mut counts = BTreeMap::new();
    let mut version = 0;
    for triple in reply.chunks(3) {
        let [Value::BulkString(key), Value::Int(ttl_ms), Value::BulkString(dump)] = triple else {
            bail!("an unexpected reply from the snapshot script");
        };
        if *ttl_ms == -2 {
            continue; // expired between KEYS and DUMP
        }
        let kind = kind(key, &store.redis_prefix);
        if kind == "schema_version" {
            version = redis::cmd("GET")
                .arg(key.as_slice())
                .query_async::<Option<i64>>(&mut conn)
                .await?
                .unwrap_or(0);
        }
        *counts.entry(kind).or_default() += 1;
        let line = Line {
            key: STANDARD.encode(key),
            ttl_ms: *ttl_ms,
            dump: STANDARD.encode(dump),
        };
        out.write_all(serde_json::to_string(&line)?.as_bytes()).await?;
        out.write_all(b"\n").await?;
    }
    out.flush().await?;
    Ok((version, counts))
}

pub async fn restore(store: &Store, dir: &Path) -> anyhow::Result<()> {
    let mut conn = connect(store).await?;
    for batch in keys(&mut conn, &store.redis_prefix).await?.chunks(BATCH) {
        let _: i64 = redis::cmd("UNLINK").arg(batch).query_async(&mut conn).await?;
    }
    let mut lines = tokio::io::BufReader::new(tokio::fs::File::open(dir.join(FILE)).await?).lines();
    let mut pipe = redis::pipe();
    let mut queued = 0;
    while let Some(text) = lines.next_line().await? {
        let line: Line = serde_json::from_str(&text).context("keys.jsonl")?;
        let key = STANDARD.decode(&line.key)?;
        if !key.starts_with(store.redis_prefix.as_bytes()) {
            bail!("the backup holds a key outside the prefix {}", store.redis_prefix);
        }
        pipe.cmd("RESTORE")
            .arg(key)
            .arg(line.ttl_ms.max(0))
            .arg(STANDARD.decode(&line.dump)?)
            .arg("REPLACE")
            .ignore();
        queued += 1;
        if queued == BATCH {
            pipe.query_async::<()>(&mut conn).await?;
            pipe = redis::pipe();
            queued = 0;
        }
    }
    if queued > 0 {
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_matched_literally_and_keys_are_sorted_by_kind() {
        assert_eq!(pattern("chirp:comments:"), "chirp:comments:*");
        assert_eq!(pattern("t[1]*"), "t\\[1\\]\\**");
        assert_eq!(kind(b"p:c:123", "p:"), "comments");
        assert_eq!(kind(b"p:m:1", "p:"), "message_comment_lists");
        assert_eq!(kind(b"p:outbox", "p:"), "outbox");
    }
}
