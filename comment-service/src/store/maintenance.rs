//! comment-service's side of backup and restore (see
//! `service_kit::maintenance`), on its keys in Redis, on one server or a
//! cluster alike.
//!
//! Only the service's own keys (its prefix): a Redis may be shared, and a
//! restore must not touch another tenant's keys, so the server-wide forms
//! (`BGSAVE` and its RDB file, the AOF) do not fit.
//!
//! Everything is done per hash tag (each of the sixteen groups, and
//! `meta`; see [`super::keys`]), because a script may only touch keys of
//! one slot:
//!
//! - **backup**: the keys are found with `SCAN` on every master; then, per
//!   tag, one script reads every key of the tag, its type, its TTL and its
//!   contents, atomically. Every atomic step of the store writes within
//!   one tag, so each is wholly in the backup or not at all; a tag read
//!   while a comment was being added (a list naming a comment its read did
//!   not include) is read again. `keys.jsonl` holds one line per key: the
//!   key relative to the prefix, `ttl_ms`, `type` and `value` (a string, a
//!   hash's field pairs, a set's members, a sorted set's member and score
//!   pairs, a stream's entries with their ids).
//! - **load**: every key is checked against the data model (only the kinds
//!   of keys the store module's table lists, ids that parse, the type that
//!   kind has) and written under the side prefix `restore/{prefix}` with
//!   ordinary commands (`SET`, `HSET`, `SADD`, `ZADD`, `XADD`); the tag
//!   stays, so a side key is in its live key's slot. A backup is untrusted
//!   input: nothing from it reaches Redis as a serialized payload
//!   (`RESTORE` would parse one, and a crafted one can reach the server's
//!   decoder), only as values of the service's own keys. Each tag gets a
//!   marker once loaded.
//! - **switch**: per tag, one script renames the live keys to the kept
//!   prefix `kept/{prefix}` and the side keys to the live prefix, and
//!   trades the tag's side marker for a kept marker, so a switch that
//!   stopped halfway runs again without touching the tags it did. **undo**
//!   is the same the other way, driven by the kept markers.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{bail, Context as _};
use redis::{AsyncCommands as _, Value};
use serde::{Deserialize, Serialize};
use service_kit::{
    files::new_private_file,
    maintenance::{ContentDigest, Contents, Manifest, StoreMaintenance},
};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use super::{
    keys::{kind, type_of, Group, META, TAGS},
    value, Address, Redis,
};
use crate::domain::{CommentId, MessageId};

const FILE: &str = "keys.jsonl";
/// Keys restored (or deleted) per round trip.
const BATCH: usize = 500;
/// Reads of one tag before a backup gives up on writes racing it.
const ATTEMPTS: usize = 5;
/// The markers of a loaded and of a kept tag (`{side}{tag}~loaded`): no
/// key of the data model ends so.
const LOADED: &str = "~loaded";
const KEPT: &str = "~kept";

/// KEYS: the keys of one tag. Each with its TTL, type and contents, in one
/// atomic step.
const SNAPSHOT: &str = r"
local out = {}
for _, key in ipairs(KEYS) do
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

/// One tag's switch or undo. KEYS[1] the marker that lets it run (deleted
/// at the end, so a second run does nothing), KEYS[2] the marker it leaves
/// (or KEYS[1] again: none), then pairs of a key and where it goes; ARGV, per
/// pair, `rename` or `unlink`. A script that fails halfway is not rolled
/// back, so nothing here can fail on a key: one that went in the meantime
/// (a revocation pruned to nothing) is skipped.
const MOVE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
-- The marker for the next step first and this step's last: a run that
-- stops halfway leaves both, so undo finds the tag and a rerun redoes it.
if KEYS[2] ~= KEYS[1] then redis.call('SET', KEYS[2], '1') end
for i = 3, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if ARGV[(i - 1) / 2] == 'unlink' then
      redis.call('UNLINK', KEYS[i])
    else
      redis.call('RENAME', KEYS[i], KEYS[i + 1])
    end
  end
end
redis.call('DEL', KEYS[1])
return 1
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

pub struct Maintenance {
    redis: Redis,
    prefix: String,
}

/// Every tag of the data model.
fn tags() -> impl Iterator<Item = &'static str> {
    TAGS.iter().copied().chain([META])
}

/// The tag of `relative` (a key without its prefix), if it has one.
fn tag_of(relative: &str) -> Option<&str> {
    relative.strip_prefix('{')?.split_once('}').map(|(tag, _)| tag)
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

/// `keys` (all under `prefix`) by tag, markers left out.
fn by_tag<'k>(prefix: &str, keys: &'k [String]) -> BTreeMap<&'k str, Vec<&'k str>> {
    let mut tagged: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for key in keys {
        let relative = &key[prefix.len().min(key.len())..];
        if relative.ends_with(LOADED) || relative.ends_with(KEPT) {
            continue;
        }
        if let Some(tag) = tag_of(relative) {
            tagged.entry(tag).or_default().push(key);
        }
    }
    tagged
}

/// Whether a tag's snapshot is whole: every comment id a list or a set
/// names has its comment in the snapshot (a comment added after the keys
/// were listed is missing from it, while its list was not).
fn whole(lines: &[Line]) -> bool {
    let comments: BTreeSet<&str> = lines.iter().filter_map(|l| Some(l.key.split_once("}c:")?.1)).collect();
    lines.iter().all(|line| match (&line.data, kind(&line.key)) {
        (Data::Zset(members), Some(("message_comment_lists", _))) => {
            members.iter().all(|(id, _)| comments.contains(id.as_str()))
        }
        (Data::Set(members), Some(("user_comment_sets", _))) => members.iter().all(|id| comments.contains(id.as_str())),
        _ => true,
    })
}

impl Maintenance {
    /// Maintenance of the keys under `prefix` in the Redis at `address`.
    ///
    /// # Errors
    /// When an URL cannot be parsed.
    pub fn new(address: &Address, prefix: &str) -> anyhow::Result<Self> {
        Ok(Self {
            redis: Redis::for_maintenance(address)?,
            prefix: prefix.to_owned(),
        })
    }

    fn side(&self) -> String {
        format!("restore/{}", self.prefix)
    }

    fn kept_prefix(&self) -> String {
        format!("kept/{}", self.prefix)
    }

    async fn keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.redis.scan_all(&pattern(prefix)).await?)
    }

    async fn unlink_all(&self, prefix: &str) -> anyhow::Result<()> {
        // One key per UNLINK: keys of different slots cannot share one.
        let keys = self.keys(prefix).await?;
        for (_, tagged) in by_tag_all(prefix, &keys) {
            for batch in tagged.chunks(BATCH) {
                let mut conn = self.redis.clone();
                let _: i64 = redis::cmd("UNLINK").arg(batch).query_async(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// Per tag: the keys under `to` go to `set_aside` (or are dropped), the
    /// keys under `from` go to `to`, when the tag's marker `{from}{tag}~go`
    /// is there; then the marker `{set_aside}{tag}~left` is left.
    async fn move_keys(
        &self,
        from: &str,
        to: &str,
        set_aside: Option<&str>,
        (go, left): (&str, Option<&str>),
    ) -> anyhow::Result<()> {
        let dropped = self.keys(to).await?;
        let moved = self.keys(from).await?;
        let (dropped, moved) = (by_tag(to, &dropped), by_tag(from, &moved));
        let moving = redis::Script::new(MOVE);
        for tag in tags() {
            let mut script = moving.prepare_invoke();
            let marker = format!("{from}{{{tag}}}{go}");
            script.key(&marker);
            match (set_aside, left) {
                (Some(aside), Some(left)) => script.key(format!("{aside}{{{tag}}}{left}")),
                _ => script.key(&marker),
            };
            for key in dropped.get(tag).into_iter().flatten() {
                match set_aside {
                    Some(aside) => script
                        .key(*key)
                        .key(format!("{aside}{}", &key[to.len()..]))
                        .arg("rename"),
                    None => script.key(*key).key(*key).arg("unlink"),
                };
            }
            for key in moved.get(tag).into_iter().flatten() {
                script
                    .key(*key)
                    .key(format!("{to}{}", &key[from.len()..]))
                    .arg("rename");
            }
            let mut conn = self.redis.clone();
            let _: i64 = script
                .invoke_async(&mut conn)
                .await
                .with_context(|| format!("renaming the keys of {{{tag}}}"))?;
        }
        Ok(())
    }

    /// What `keys` (every key under `prefix`) hold, by kind.
    async fn contents(&self, prefix: &str, keys: &[String]) -> anyhow::Result<Contents> {
        let mut counts = BTreeMap::new();
        for key in keys {
            let relative = key.strip_prefix(prefix).unwrap_or(key);
            if relative.ends_with(LOADED) || relative.ends_with(KEPT) {
                continue;
            }
            let kind = kind(relative).map_or(relative, |(kind, _)| kind);
            *counts.entry(kind.to_owned()).or_default() += 1;
        }
        let mut conn = self.redis.clone();
        let version: Option<i64> = conn.get(format!("{prefix}{{{META}}}schema_version")).await?;
        Ok(Contents {
            schema_version: version.unwrap_or(0),
            counts,
            digest: None,
        })
    }

    /// `keys` and their `DUMP`s, by key, as one digest.
    async fn digest(&self, all: &[String]) -> anyhow::Result<String> {
        let mut dumps: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for (_, tagged) in by_tag_all(&self.prefix, all) {
            for batch in tagged.chunks(BATCH) {
                let mut pipe = redis::pipe();
                for key in batch {
                    pipe.cmd("DUMP").arg(*key);
                }
                let mut conn = self.redis.clone();
                let answers: Vec<Option<Vec<u8>>> = pipe.query_async(&mut conn).await?;
                for (key, dump) in batch.iter().zip(answers) {
                    dumps.insert(key, dump.unwrap_or_default());
                }
            }
        }
        let mut digest = ContentDigest::default();
        for (key, dump) in dumps {
            digest.add(key.as_bytes());
            digest.add(&dump);
        }
        Ok(digest.finish())
    }

    /// One tag's keys as one moment's lines, read again while writes race.
    async fn snapshot(&self, tag: &str, mut keys: Vec<String>) -> anyhow::Result<Vec<Line>> {
        let snapshot = redis::Script::new(SNAPSHOT);
        for _ in 0..ATTEMPTS {
            let mut script = snapshot.prepare_invoke();
            for key in &keys {
                script.key(key.as_str());
            }
            let mut conn = self.redis.clone();
            let reply: Vec<Value> = if keys.is_empty() {
                Vec::new()
            } else {
                script.invoke_async(&mut conn).await.context("the snapshot script")?
            };
            let lines = self.lines(&reply)?;
            if whole(&lines) {
                return Ok(lines);
            }
            let pattern = pattern(&format!("{}{{{tag}}}", self.prefix));
            keys = self.redis.scan_all(&pattern).await?;
        }
        bail!("the keys of {{{tag}}} kept changing while they were read; try again")
    }

    /// The snapshot script's reply as lines of the backup.
    fn lines(&self, reply: &[Value]) -> anyhow::Result<Vec<Line>> {
        let mut lines = Vec::with_capacity(reply.len());
        for key in reply {
            let [Value::BulkString(key), Value::Int(ttl_ms), redis_type, value] = items(key)? else {
                bail!("an unexpected reply from the snapshot script");
            };
            let redis_type = text(redis_type)?;
            if *ttl_ms == -2 || redis_type == "none" {
                continue; // gone since it was listed
            }
            let key = String::from_utf8_lossy(key);
            let relative = key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned();
            if kind(&relative).is_none() {
                tracing::warn!(key = %key, "a key the data model does not know: left out of the backup");
                continue;
            }
            let data = Data::read(&redis_type, value).with_context(|| format!("reading {key}"))?;
            lines.push(Line {
                key: relative,
                ttl_ms: *ttl_ms,
                data,
            });
        }
        Ok(lines)
    }

    /// The tag markers of a loaded backup.
    async fn mark_loaded(&self) -> anyhow::Result<()> {
        for tag in tags() {
            let mut conn = self.redis.clone();
            let () = conn.set(format!("{}{{{tag}}}{LOADED}", self.side()), 1).await?;
        }
        Ok(())
    }
}

/// `keys` (all under `prefix`) by tag, markers included; a key without a
/// tag is a group of its own (it shares a slot with no other).
fn by_tag_all<'k>(prefix: &str, keys: &'k [String]) -> BTreeMap<&'k str, Vec<&'k str>> {
    let mut tagged: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for key in keys {
        let relative = &key[prefix.len().min(key.len())..];
        let group = if tag_of(relative).is_some() {
            &relative[..relative.find('}').map_or(0, |end| end + 1)]
        } else {
            key.as_str()
        };
        tagged.entry(group).or_default().push(key);
    }
    tagged
}

/// Checks what the layout says of a key beyond its kind and type: a
/// comment is one the store can read, in its own group, which is its
/// message's; a message's list is in the message's group.
fn placed(line: &Line, kind: &str, tag: &str) -> anyhow::Result<()> {
    let id = |prefix: &str| {
        line.key
            .split_once(prefix)
            .and_then(|(_, raw)| uuid::Uuid::parse_str(raw).ok())
            .context("an id")
    };
    let in_group = |group: Group| group.tag() == tag;
    match (kind, &line.data) {
        ("comments", Data::String(stored)) => {
            let id = CommentId::from(id("}c:")?);
            let comment = value::decode(id, stored)
                .map_err(|_| anyhow::anyhow!("`{}` holds a value that is not a comment of the data model", line.key))?;
            if !in_group(Group::of_comment(id)) || !in_group(Group::of_message(comment.message_id)) {
                bail!("`{}` is not in its message's group", line.key);
            }
        }
        ("message_comment_lists", Data::Zset(members)) => {
            if !in_group(Group::of_message(MessageId::from(id("}m:")?))) {
                bail!("`{}` is not in its message's group", line.key);
            }
            // Paging reads the ids in order at one score.
            for (member, score) in members {
                comment_in(member, tag)?;
                if score != "0" {
                    bail!("`{}` holds a score other than 0", line.key);
                }
            }
        }
        ("user_comment_sets", Data::Set(members)) => {
            for member in members {
                comment_in(member, tag)?;
            }
        }
        ("hidden" | "purge:users" | "purge:messages", Data::Set(members)) => {
            for member in members {
                canonical(member)?;
            }
        }
        ("revocations", Data::Hash(fields)) => {
            for (user, value) in fields {
                canonical(user)?;
                let well_formed = value.split_once(':').is_some_and(|(cutoff, reason)| {
                    cutoff.parse::<i64>().is_ok() && service_kit::events::RevocationReason::parse(reason).is_some()
                });
                if !well_formed {
                    bail!("a revocation of {user} that is not `<cutoff>:<reason>`");
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// An id as the store writes it: a UUID in its hyphenated form.
fn canonical(raw: &str) -> anyhow::Result<uuid::Uuid> {
    uuid::Uuid::try_parse(raw)
        .ok()
        .filter(|id| id.hyphenated().to_string() == raw)
        .with_context(|| format!("`{raw}` is not an id as the store writes one"))
}

/// A comment id of the group whose tag is `tag`.
fn comment_in(raw: &str, tag: &str) -> anyhow::Result<()> {
    let id = CommentId::from(canonical(raw)?);
    if Group::of_comment(id).tag() != tag {
        bail!("the comment id {raw} is not of this group");
    }
    Ok(())
}

impl StoreMaintenance for Maintenance {
    fn store(&self) -> &'static str {
        "redis"
    }

    fn knows_file(name: &str) -> bool {
        name == FILE
    }

    async fn inspect(&self) -> anyhow::Result<Contents> {
        let all = self.keys(&self.prefix).await?;
        let mut contents = self.contents(&self.prefix, &all).await?;
        contents.digest = Some(self.digest(&all).await?);
        Ok(contents)
    }

    async fn backup(&self, dir: &Path) -> anyhow::Result<Contents> {
        let all = self.keys(&self.prefix).await?;
        let tagged = by_tag(&self.prefix, &all);
        let file = tokio::fs::File::from_std(new_private_file(&dir.join(FILE))?);
        let mut out = tokio::io::BufWriter::new(file);
        let mut counts = BTreeMap::new();
        let mut schema_version = 0;
        // `meta` first: a purge that finishes while the groups are read is
        // then still recorded in the backup, and a restore finishes it,
        // rather than bringing back comments with no purge pending.
        let mut tagged: Vec<(&str, Vec<&str>)> = tagged.into_iter().collect();
        tagged.sort_by_key(|(tag, _)| *tag != META);
        for (tag, keys) in tagged {
            if !tags().any(|t| t == tag) {
                continue;
            }
            let keys = keys.into_iter().map(str::to_owned).collect();
            for line in self.snapshot(tag, keys).await? {
                let Some((kind_of_key, _)) = kind(&line.key) else {
                    continue;
                };
                if let Data::String(version) = &line.data {
                    if kind_of_key == "schema_version" {
                        schema_version = version.parse().context("the schema version")?;
                    }
                }
                *counts.entry(kind_of_key.to_owned()).or_default() += 1;
                out.write_all(serde_json::to_string(&line)?.as_bytes()).await?;
                out.write_all(b"\n").await?;
            }
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
        let side = self.side();
        self.unlink_all(&side).await?;
        let mut lines = tokio::io::BufReader::new(tokio::fs::File::open(dir.join(FILE)).await?).lines();
        // A pipeline stays within one tag (one slot on a cluster).
        let mut pipe = redis::pipe();
        let mut queued = 0;
        let mut queued_tag = String::new();
        let mut number = 0;
        let flush = |pipe: redis::Pipeline| {
            let mut conn = self.redis.clone();
            async move {
                pipe.query_async::<()>(&mut conn)
                    .await
                    .context("writing the loaded keys")
            }
        };
        while let Some(text) = lines.next_line().await? {
            number += 1;
            let line: Line = serde_json::from_str(&text).with_context(|| format!("{FILE} line {number}"))?;
            let Some((kind, tag)) = kind(&line.key) else {
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
            placed(&line, kind, tag).with_context(|| format!("{FILE} line {number}"))?;
            if queued > 0 && (queued == BATCH || tag != queued_tag) {
                flush(std::mem::replace(&mut pipe, redis::pipe())).await?;
                queued = 0;
            }
            tag.clone_into(&mut queued_tag);
            let key = format!("{side}{}", line.key);
            line.data.write(&mut pipe, &key);
            if line.ttl_ms > 0 {
                pipe.cmd("PEXPIRE").arg(&key).arg(line.ttl_ms).ignore();
            }
            queued += 1;
        }
        if queued > 0 {
            flush(pipe).await?;
        }
        let loaded = self.keys(&side).await?;
        let contents = self.contents(&side, &loaded).await?;
        self.mark_loaded().await?;
        Ok(contents)
    }

    async fn discard(&self) -> anyhow::Result<()> {
        self.unlink_all(&self.side()).await
    }

    async fn kept(&self) -> anyhow::Result<bool> {
        Ok(!self.keys(&self.kept_prefix()).await?.is_empty())
    }

    async fn switch(&self) -> anyhow::Result<()> {
        let kept = self.kept_prefix();
        self.move_keys(&self.side(), &self.prefix, Some(&kept), (LOADED, Some(KEPT)))
            .await
    }

    async fn undo(&self) -> anyhow::Result<()> {
        self.move_keys(&self.kept_prefix(), &self.prefix, None, (KEPT, None))
            .await?;
        // What the undo leaves under the kept prefix: nothing of the data.
        self.unlink_all(&self.kept_prefix()).await
    }

    async fn confirm(&self) -> anyhow::Result<()> {
        self.unlink_all(&self.kept_prefix()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_matched_literally_and_keys_go_by_tag() {
        assert_eq!(pattern("chirp:comments:"), "chirp:comments:*");
        assert_eq!(pattern("t[1]*"), "t\\[1\\]\\**");
        let keys = [
            "p:{g4.1}c:x",
            "p:{g4.1}m:y",
            "p:{meta}revocations",
            "p:{g4.1}~loaded",
            "p:stray",
        ]
        .map(String::from);
        let tagged = by_tag("p:", &keys);
        assert_eq!(tagged["g4.1"], ["p:{g4.1}c:x", "p:{g4.1}m:y"]);
        assert_eq!(tagged["meta"], ["p:{meta}revocations"]);
        assert_eq!(tagged.len(), 2);
    }
}
