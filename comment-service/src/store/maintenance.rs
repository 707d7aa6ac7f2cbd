//! comment-service's side of backup and restore (see
//! `service_kit::maintenance`), on its keys in Redis.
//!
//! Only the service's own keys (its prefix): a Redis may be shared, and a
//! restore must not touch another tenant's keys, so the server-wide forms
//! (`BGSAVE` and its RDB file, the AOF) do not fit.
//!
//! - **backup**: one Lua script reads every key of the prefix, its type,
//!   its TTL and its contents; Redis runs a script atomically, so it is one
//!   moment's view (other clients wait for its length, a few milliseconds
//!   per thousand keys). `keys.jsonl` holds one line per key: the key
//!   relative to the prefix, `ttl_ms`, `type` and `value` (a string, a
//!   hash's field pairs, a set's members, a sorted set's member and score
//!   pairs, a stream's entries with their ids).
//! - **load**: every key is checked against the data model (only the kinds
//!   of keys the store module's table lists, ids that parse, the type that
//!   kind has) and written under the side prefix `restore/{prefix}` with
//!   ordinary commands (`SET`, `HSET`, `SADD`, `ZADD`, `XADD`). A backup is
//!   untrusted input: nothing from it reaches Redis as a serialized payload
//!   (`RESTORE` would parse one, and a crafted one can reach the server's
//!   decoder), only as values of the service's own keys.
//! - **switch**: one script renames the live keys to the kept prefix
//!   `kept/{prefix}` and the side keys to the live prefix: atomic, whatever
//!   else the server is doing. **undo** is the same script back.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _};
use redis::{aio::MultiplexedConnection, AsyncCommands as _, Value};
use serde::{Deserialize, Serialize};
use service_kit::{
    files::new_private_file,
    maintenance::{ContentDigest, Contents, Manifest, StoreMaintenance},
};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

const FILE: &str = "keys.jsonl";
/// Keys restored (or deleted) per round trip.
const BATCH: usize = 500;
/// Keys of the data model that are not per id (see the store module).
const SINGLE_KEYS: [&str; 8] = [
    "schema_version",
    "outbox",
    "outbox:dead",
    "revocations",
    "purge:users",
    "purge:messages",
    "purge:traces",
    "hidden",
];

/// ARGV[1] the `prefix*` pattern. Every key of the prefix with its TTL,
/// type and contents, in one atomic step.
const SNAPSHOT: &str = r"
local keys = redis.call('KEYS', ARGV[1])
local out = {}
for _, key in ipairs(keys) do
  local kind = redis.call('TYPE', key)['ok']
  local value = {}
  if kind == 'string' then value = redis.call('GET', key)
  elseif kind == 'hash' then value = redis.call('HGETALL', key)
  elseif kind == 'set' then value = redis.call('SMEMBERS', key)
  elseif kind == 'zset' then value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'stream' then value = redis.call('XRANGE', key, '-', '+')
  end
  out[#out + 1] = {key, redis.call('PTTL', key), kind, value}
end
return out
";

/// KEYS: the keys to drop, then the keys to rename; ARGV[1] how many to
/// drop, ARGV[2] the prefix being renamed from, ARGV[3] the one renamed
/// to, ARGV[4] (or empty) the prefix the dropped keys are renamed to
/// instead. One atomic step. A script that fails halfway is not rolled
/// back, so nothing here can fail on a key: one that went in the meantime
/// (a revocation pruned to nothing) is skipped.
const MOVE: &str = r"
local drop = tonumber(ARGV[1])
for i = 1, drop do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if ARGV[4] ~= '' then
      redis.call('RENAME', KEYS[i], ARGV[4] .. string.sub(KEYS[i], #ARGV[3] + 1))
    else
      redis.call('UNLINK', KEYS[i])
    end
  end
end
for i = drop + 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], ARGV[3] .. string.sub(KEYS[i], #ARGV[2] + 1))
  end
end
return #KEYS
";

/// One key of a backup.
#[derive(Serialize, Deserialize)]
struct Line {
    /// Relative to the prefix.
    key: String,
    ttl_ms: i64,
    #[serde(flatten)]
    data: Data,
}

/// What a key holds, by Redis type.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
enum Data {
    String(String),
    Hash(Vec<(String, String)>),
    Set(Vec<String>),
    /// Members and their scores (as Redis writes them).
    Zset(Vec<(String, String)>),
    /// Entry ids and their fields, oldest first.
    Stream(Vec<(String, Vec<(String, String)>)>),
}

impl Data {
    fn type_name(&self) -> &'static str {
        match self {
            Self::String(_) => "string",
            Self::Hash(_) => "hash",
            Self::Set(_) => "set",
            Self::Zset(_) => "zset",
            Self::Stream(_) => "stream",
        }
    }

    /// What the snapshot script read of a key of type `kind`.
    fn read(kind: &str, value: &Value) -> anyhow::Result<Self> {
        Ok(match kind {
            "string" => Self::String(text(value)?),
            "hash" => Self::Hash(pairs(value)?),
            "set" => Self::Set(items(value)?.iter().map(text).collect::<anyhow::Result<_>>()?),
            "zset" => Self::Zset(pairs(value)?),
            "stream" => Self::Stream(
                items(value)?
                    .iter()
                    .map(|entry| match items(entry)? {
                        [id, fields] => Ok((text(id)?, pairs(fields)?)),
                        _ => bail!("a stream entry that is not an id and its fields"),
                    })
                    .collect::<anyhow::Result<_>>()?,
            ),
            other => bail!("a key of type {other}, which the data model has none of"),
        })
    }

    /// Checks the values a crafted backup could get wrong before any of
    /// them is written: scores are numbers, stream ids are ids.
    fn check(&self) -> anyhow::Result<()> {
        match self {
            Self::Zset(members) => {
                for (_, score) in members {
                    if !score.parse::<f64>().is_ok_and(f64::is_finite) {
                        bail!("the score `{score}` is not a number");
                    }
                }
            }
            Self::Stream(entries) => {
                let id = |id: &str| {
                    id.split_once('-')
                        .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
                };
                if let Some((bad, _)) = entries.iter().find(|(i, _)| !id(i)) {
                    bail!("`{bad}` is not a stream entry id");
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The commands that write it under `key`, a bounded number of values
    /// each.
    fn write(&self, pipe: &mut redis::Pipeline, key: &str) {
        match self {
            Self::String(value) => {
                pipe.cmd("SET").arg(key).arg(value).ignore();
            }
            Self::Hash(fields) => {
                for chunk in fields.chunks(BATCH) {
                    let cmd = pipe.cmd("HSET").arg(key);
                    for (field, value) in chunk {
                        cmd.arg(field).arg(value);
                    }
                    cmd.ignore();
                }
            }
            Self::Set(members) => {
                for chunk in members.chunks(BATCH) {
                    pipe.cmd("SADD").arg(key).arg(chunk).ignore();
                }
            }
            Self::Zset(members) => {
                for chunk in members.chunks(BATCH) {
                    let cmd = pipe.cmd("ZADD").arg(key);
                    for (member, score) in chunk {
                        cmd.arg(score).arg(member);
                    }
                    cmd.ignore();
                }
            }
            Self::Stream(entries) if entries.is_empty() => {
                // An empty stream still exists (the outbox once drained):
                // one entry added and trimmed away at once.
                pipe.cmd("XADD")
                    .arg(key)
                    .arg("MAXLEN")
                    .arg(0)
                    .arg("*")
                    .arg("empty")
                    .arg("")
                    .ignore();
            }
            Self::Stream(entries) => {
                for (id, fields) in entries {
                    let cmd = pipe.cmd("XADD").arg(key).arg(id);
                    for (field, value) in fields {
                        cmd.arg(field).arg(value);
                    }
                    cmd.ignore();
                }
            }
        }
    }
}

fn text(value: &Value) -> anyhow::Result<String> {
    match value {
        Value::BulkString(bytes) => Ok(String::from_utf8(bytes.clone()).context("a value that is not UTF-8")?),
        Value::SimpleString(text) => Ok(text.clone()),
        Value::Int(n) => Ok(n.to_string()),
        other => bail!("an unexpected value {other:?}"),
    }
}

fn items(value: &Value) -> anyhow::Result<&[Value]> {
    match value {
        Value::Array(items) => Ok(items),
        other => bail!("an unexpected value {other:?}"),
    }
}

fn pairs(value: &Value) -> anyhow::Result<Vec<(String, String)>> {
    let items = items(value)?;
    if items.len() % 2 != 0 {
        bail!("an odd number of values for pairs");
    }
    items
        .chunks(2)
        .map(|pair| Ok((text(&pair[0])?, text(&pair[1])?)))
        .collect()
}

/// The Redis type each kind of key has (see the store module's table).
fn type_of(kind: &str) -> &'static str {
    match kind {
        "comments" | "revocations" | "purge:traces" => "hash",
        "message_comment_lists" => "zset",
        "schema_version" => "string",
        "outbox" | "outbox:dead" => "stream",
        _ => "set",
    }
}

pub struct Maintenance {
    client: redis::Client,
    prefix: String,
}

/// What a key (relative to the prefix) holds, by the data model; `None`
/// for a key the data model has no place for.
fn kind(key: &str) -> Option<&str> {
    let id = |rest: &str| uuid::Uuid::parse_str(rest).is_ok();
    if let Some(rest) = key.strip_prefix("c:") {
        id(rest).then_some("comments")
    } else if let Some(rest) = key.strip_prefix("m:") {
        id(rest).then_some("message_comment_lists")
    } else if let Some(rest) = key.strip_prefix("u:") {
        id(rest).then_some("user_comment_sets")
    } else {
        SINGLE_KEYS.iter().find(|k| **k == key).copied()
    }
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

impl Maintenance {
    /// Maintenance of the keys under `prefix` in the Redis at `url`.
    ///
    /// # Errors
    /// When the URL cannot be parsed.
    pub fn new(url: &str, prefix: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            prefix: prefix.to_owned(),
        })
    }

    fn side(&self) -> String {
        format!("restore/{}", self.prefix)
    }

    fn kept_prefix(&self) -> String {
        format!("kept/{}", self.prefix)
    }

    /// A connection of its own, with no response timeout: a snapshot or a
    /// switch of many keys is one long command.
    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        Ok(self.client.get_multiplexed_async_connection().await?)
    }

    async fn unlink_all(&self, conn: &mut MultiplexedConnection, prefix: &str) -> anyhow::Result<()> {
        for batch in keys(conn, prefix).await?.chunks(BATCH) {
            let _: i64 = redis::cmd("UNLINK").arg(batch).query_async(conn).await?;
        }
        Ok(())
    }

    /// Drops (or renames to `set_aside`) the keys under `to`, and renames
    /// the keys under `from` to `to`, in one script.
    async fn move_keys(&self, from: &str, to: &str, set_aside: Option<&str>) -> anyhow::Result<()> {
        let mut conn = self.connect().await?;
        let dropped = keys(&mut conn, to).await?;
        let moved = keys(&mut conn, from).await?;
        let moving = redis::Script::new(MOVE);
        let mut script = moving.prepare_invoke();
        for key in dropped.iter().chain(&moved) {
            script.key(key.as_str());
        }
        script.arg(dropped.len()).arg(from).arg(to).arg(set_aside.unwrap_or(""));
        let _: i64 = script.invoke_async(&mut conn).await.context("renaming the keys")?;
        Ok(())
    }

    /// What `keys` (every key under `prefix`) hold, by kind.
    async fn contents(
        &self,
        conn: &mut MultiplexedConnection,
        prefix: &str,
        keys: &[String],
    ) -> anyhow::Result<Contents> {
        let mut counts = BTreeMap::new();
        for key in keys {
            let relative = key.strip_prefix(prefix).unwrap_or(key);
            let kind = kind(relative).unwrap_or(relative);
            *counts.entry(kind.to_owned()).or_default() += 1;
        }
        let version: Option<i64> = conn.get(format!("{prefix}schema_version")).await?;
        Ok(Contents {
            schema_version: version.unwrap_or(0),
            counts,
            digest: None,
        })
    }

    /// `keys` and their `DUMP`s, by key, as one digest.
    async fn digest(&self, conn: &mut MultiplexedConnection, mut all: Vec<String>) -> anyhow::Result<String> {
        all.sort();
        let mut digest = ContentDigest::default();
        for batch in all.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for key in batch {
                pipe.cmd("DUMP").arg(key);
            }
            let dumps: Vec<Option<Vec<u8>>> = pipe.query_async(conn).await?;
            for (key, dump) in batch.iter().zip(dumps) {
                digest.add(key.as_bytes());
                digest.add(&dump.unwrap_or_default());
            }
        }
        Ok(digest.finish())
    }
}

async fn keys(conn: &mut MultiplexedConnection, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut all = Vec::new();
    let mut iter: redis::AsyncIter<'_, String> = conn
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

impl StoreMaintenance for Maintenance {
    fn store(&self) -> &'static str {
        "redis"
    }

    fn knows_file(name: &str) -> bool {
        name == FILE
    }

    async fn inspect(&self) -> anyhow::Result<Contents> {
        let mut conn = self.connect().await?;
        let all = keys(&mut conn, &self.prefix).await?;
        let mut contents = self.contents(&mut conn, &self.prefix, &all).await?;
        contents.digest = Some(self.digest(&mut conn, all).await?);
        Ok(contents)
    }

    async fn backup(&self, dir: &Path) -> anyhow::Result<Contents> {
        let mut conn = self.connect().await?;
        let reply: Vec<Value> = redis::Script::new(SNAPSHOT)
            .arg(pattern(&self.prefix))
            .invoke_async(&mut conn)
            .await
            .context("the snapshot script")?;
        let file = tokio::fs::File::from_std(new_private_file(&dir.join(FILE))?);
        let mut out = tokio::io::BufWriter::new(file);
        let mut counts = BTreeMap::new();
        let mut schema_version = 0;
        for key in &reply {
            let [Value::BulkString(key), Value::Int(ttl_ms), redis_type, value] = items(key)? else {
                bail!("an unexpected reply from the snapshot script");
            };
            let redis_type = text(redis_type)?;
            if *ttl_ms == -2 || redis_type == "none" {
                continue; // expired while the script ran
            }
            let key = String::from_utf8_lossy(key);
            let relative = key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned();
            let Some(kind_of_key) = kind(&relative) else {
                tracing::warn!(key = %key, "a key the data model does not know: left out of the backup");
                continue;
            };
            let data = Data::read(&redis_type, value).with_context(|| format!("reading {key}"))?;
            if let Data::String(version) = &data {
                if kind_of_key == "schema_version" {
                    schema_version = version.parse().context("the schema version")?;
                }
            }
            *counts.entry(kind_of_key.to_owned()).or_default() += 1;
            let line = Line {
                key: relative,
                ttl_ms: *ttl_ms,
                data,
            };
            out.write_all(serde_json::to_string(&line)?.as_bytes()).await?;
            out.write_all(b"\n").await?;
        }
        out.flush().await?;
        out.get_ref().sync_all().await?;
        Ok(Contents {
            schema_version,
            counts,
            digest: None,
        })
    }

    async fn load(&self, dir: &Path, _manifest: &Manifest) -> anyhow::Result<Contents> {
        let mut conn = self.connect().await?;
        let side = self.side();
        self.unlink_all(&mut conn, &side).await?;
        let mut lines = tokio::io::BufReader::new(tokio::fs::File::open(dir.join(FILE)).await?).lines();
        let mut pipe = redis::pipe();
        let mut queued = 0;
        let mut number = 0;
        while let Some(text) = lines.next_line().await? {
            number += 1;
            let line: Line = serde_json::from_str(&text).with_context(|| format!("{FILE} line {number}"))?;
            let Some(kind) = kind(&line.key) else {
                bail!(
                    "{FILE} line {number}: `{}` is no key of comment-service's data model",
                    line.key
                );
            };
            if line.data.type_name() != type_of(kind) {
                bail!(
                    "{FILE} line {number}: `{}` is a {} in the backup, a {} in the data model",
                    line.key,
                    line.data.type_name(),
                    type_of(kind)
                );
            }
            line.data.check().with_context(|| format!("{FILE} line {number}"))?;
            let key = format!("{side}{}", line.key);
            line.data.write(&mut pipe, &key);
            if line.ttl_ms > 0 {
                pipe.cmd("PEXPIRE").arg(&key).arg(line.ttl_ms).ignore();
            }
            queued += 1;
            if queued == BATCH {
                pipe.query_async::<()>(&mut conn)
                    .await
                    .context("writing the loaded keys")?;
                pipe = redis::pipe();
                queued = 0;
            }
        }
        if queued > 0 {
            pipe.query_async::<()>(&mut conn)
                .await
                .context("writing the loaded keys")?;
        }
        let loaded = keys(&mut conn, &side).await?;
        self.contents(&mut conn, &side, &loaded).await
    }

    async fn discard(&self) -> anyhow::Result<()> {
        let mut conn = self.connect().await?;
        self.unlink_all(&mut conn, &self.side()).await
    }

    async fn kept(&self) -> anyhow::Result<bool> {
        let mut conn = self.connect().await?;
        Ok(!keys(&mut conn, &self.kept_prefix()).await?.is_empty())
    }

    async fn switch(&self) -> anyhow::Result<()> {
        self.move_keys(&self.side(), &self.prefix, Some(&self.kept_prefix()))
            .await
    }

    async fn undo(&self) -> anyhow::Result<()> {
        self.move_keys(&self.kept_prefix(), &self.prefix, None).await
    }

    async fn confirm(&self) -> anyhow::Result<()> {
        let mut conn = self.connect().await?;
        self.unlink_all(&mut conn, &self.kept_prefix()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_data_models_keys_are_known_and_the_prefix_is_matched_literally() {
        assert_eq!(pattern("chirp:comments:"), "chirp:comments:*");
        assert_eq!(pattern("t[1]*"), "t\\[1\\]\\**");
        let id = uuid::Uuid::now_v7();
        assert_eq!(kind(&format!("c:{id}")), Some("comments"));
        assert_eq!(kind(&format!("m:{id}")), Some("message_comment_lists"));
        assert_eq!(kind("outbox:dead"), Some("outbox:dead"));
        for unknown in ["c:../x", "c:", "other", "../outbox", "m:1"] {
            assert_eq!(kind(unknown), None, "{unknown}");
        }
    }
}
