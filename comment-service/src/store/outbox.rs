//! The outbox as the relay sees it: one stream per group (an event is
//! written in the same atomic step as its comment, so in the comment's
//! slot), read together. Entries are deleted (`XDEL`) once delivered, or
//! moved to the group's dead letters.
//!
//! A position is `<group tag>/<stream entry id>`. Events of one message
//! are in one stream, in the order they were written; across groups there
//! is no order, and none is needed (each consumer applies an event id once
//! and events of different comments commute).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use chrono::{DateTime, TimeZone as _, Utc};
use redis::{streams::StreamRangeReply, AsyncCommands as _, Script};
use service_kit::{
    events::Event,
    relay::{Backlog, DeadLetter, Outbox, Pending, Rejected},
};

use super::{
    keys::{Group, Keys},
    scripts, Redis,
};

#[derive(Clone)]
pub struct RedisOutbox {
    redis: Redis,
    keys: Keys,
    dead_letter: Script,
    retry: Script,
    /// The group read first on the next pass, so that a busy group cannot
    /// keep the others waiting.
    next: Arc<AtomicUsize>,
}

impl super::Store {
    /// The outbox streams, for the relay.
    #[must_use]
    pub fn outbox(&self) -> RedisOutbox {
        RedisOutbox {
            redis: self.redis.clone(),
            keys: self.keys.clone(),
            dead_letter: Script::new(scripts::DEAD_LETTER),
            retry: Script::new(scripts::RETRY),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// When a stream entry was added: its id starts with the milliseconds.
fn stream_id_time(id: &str) -> Option<DateTime<Utc>> {
    let ms = id.split('-').next()?.parse::<i64>().ok()?;
    Utc.timestamp_millis_opt(ms).single()
}

fn position(group: Group, entry: &str) -> String {
    format!("{}/{entry}", group.tag())
}

/// The group and stream entry id of a position this outbox gave.
fn parse_position(position: &str) -> anyhow::Result<(Group, &str)> {
    let (tag, entry) = position
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("`{position}` is not an outbox position"))?;
    let group = Group::by_tag(tag).ok_or_else(|| anyhow::anyhow!("`{position}` names no group"))?;
    Ok((group, entry))
}

/// `items` by the group of their position, each with its stream entry id.
fn by_group<'a, T>(
    items: &'a [T],
    position: impl Fn(&'a T) -> &'a str,
) -> anyhow::Result<std::collections::BTreeMap<Group, Vec<(&'a str, &'a T)>>> {
    let mut groups: std::collections::BTreeMap<Group, Vec<(&str, &T)>> = std::collections::BTreeMap::new();
    for item in items {
        let (group, entry) = parse_position(position(item))?;
        groups.entry(group).or_default().push((entry, item));
    }
    Ok(groups)
}

impl RedisOutbox {
    /// Runs `each` on every group at once: the answers of the groups that
    /// answered, so that a master being replaced holds back only its own
    /// groups' events; an error only when none answered.
    async fn every_group<T, F, Fut>(&self, each: F) -> anyhow::Result<Vec<(Group, T)>>
    where
        F: Fn(Group, Redis) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let asked = Group::all().map(|group| {
            let answer = each(group, self.redis.clone());
            async move { (group, answer.await) }
        });
        let mut answered = Vec::new();
        let mut failure = None;
        for (group, answer) in futures::future::join_all(asked).await {
            match answer {
                Ok(value) => answered.push((group, value)),
                Err(err) => failure = Some(err),
            }
        }
        match failure {
            Some(err) if answered.is_empty() => Err(err.into()),
            _ => Ok(answered),
        }
    }
}

impl Outbox for RedisOutbox {
    async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
        // How much each group holds, then from each a share of `limit` by
        // its length: a pass reads about `limit` entries however many
        // groups are backed up, and a busy group is not starved.
        let lengths = self
            .every_group(|group, mut redis| {
                let key = self.keys.outbox(group);
                async move { redis.xlen::<_, usize>(&key).await }
            })
            .await?;
        let total: usize = lengths.iter().map(|(_, n)| n).sum();
        if total == 0 {
            return Ok(Vec::new());
        }
        let shares = lengths.into_iter().filter(|(_, n)| *n > 0).map(|(group, n)| {
            let share = (limit * n).div_ceil(total).max(1);
            let (key, mut redis) = (self.keys.outbox(group), self.redis.clone());
            async move {
                let reply: StreamRangeReply = redis.xrange_count(&key, "-", "+", share).await?;
                Ok::<_, redis::RedisError>((group, reply))
            }
        });
        let replies = futures::future::try_join_all(shares).await?;
        let first = self.next.fetch_add(1, Ordering::Relaxed) % replies.len().max(1);
        let mut pending = Vec::new();
        for (group, reply) in replies.iter().cycle().skip(first).take(replies.len()) {
            for entry in &reply.ids {
                if pending.len() == limit {
                    return Ok(pending);
                }
                let event = entry
                    .get::<String>("event")
                    .ok_or_else(|| "the entry has no event".to_owned())
                    .and_then(|json| Event::from_json(&json).map_err(|e| e.to_string()));
                pending.push(Pending {
                    event,
                    position: position(*group, &entry.id),
                });
            }
        }
        Ok(pending)
    }

    async fn mark_delivered(&self, delivered: &[Pending]) -> anyhow::Result<()> {
        let groups = by_group(delivered, |p| p.position.as_str())?;
        let asked = groups.into_iter().map(|(group, entries)| {
            let mut redis = self.redis.clone();
            let key = self.keys.outbox(group);
            let ids: Vec<&str> = entries.iter().map(|(entry, _)| *entry).collect();
            async move {
                let _: i64 = redis.xdel(&key, &ids).await?;
                Ok::<_, redis::RedisError>(())
            }
        });
        futures::future::try_join_all(asked).await?;
        Ok(())
    }

    async fn dead_letter(&self, rejected: &[Rejected]) -> anyhow::Result<()> {
        for (group, entries) in by_group(rejected, |r| r.position.as_str())? {
            let mut redis = self.redis.clone();
            let mut invocation = self.dead_letter.key(self.keys.outbox(group));
            invocation.key(self.keys.dead_letters(group));
            for (entry, r) in entries {
                invocation.arg(entry).arg(&r.reason);
            }
            let _: i64 = invocation.invoke_async(&mut redis).await?;
        }
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let replies = self
            .every_group(|group, mut redis| {
                let key = self.keys.dead_letters(group);
                async move {
                    redis
                        .xrange_count::<_, _, _, _, StreamRangeReply>(&key, "-", "+", limit)
                        .await
                }
            })
            .await?;
        let mut letters: Vec<DeadLetter> = replies
            .into_iter()
            .flat_map(|(group, reply)| {
                reply.ids.into_iter().map(move |entry| DeadLetter {
                    position: entry
                        .get::<String>("position")
                        .map(|p| position(group, &p))
                        .unwrap_or_default(),
                    event_id: entry
                        .get::<String>("event")
                        .and_then(|json| Event::from_json(&json).ok())
                        .map(|event| event.id.to_string()),
                    reason: entry.get("reason").unwrap_or_default(),
                    failed_at: stream_id_time(&entry.id).unwrap_or_default(),
                })
            })
            .collect();
        letters.sort_by_key(|l| l.failed_at);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn retry_dead_letters(&self, limit: usize) -> anyhow::Result<u64> {
        let mut moved = 0u64;
        for group in Group::all() {
            let left = (limit as u64).saturating_sub(moved);
            if left == 0 {
                break;
            }
            let mut redis = self.redis.clone();
            let n: u64 = self
                .retry
                .key(self.keys.outbox(group))
                .key(self.keys.dead_letters(group))
                .arg(left)
                .invoke_async(&mut redis)
                .await?;
            moved += n;
        }
        Ok(moved)
    }

    async fn backlog(&self) -> anyhow::Result<Backlog> {
        let parts = self
            .every_group(|group, mut redis| {
                let (key, dead) = (self.keys.outbox(group), self.keys.dead_letters(group));
                async move {
                    let answer: (u64, StreamRangeReply, u64) = redis::pipe()
                        .xlen(&key)
                        .xrange_count(&key, "-", "+", 1)
                        .xlen(&dead)
                        .query_async(&mut redis)
                        .await?;
                    Ok(answer)
                }
            })
            .await?;
        let mut backlog = Backlog::default();
        for (_, (depth, first, dead_letters)) in parts {
            backlog.depth += depth;
            backlog.dead_letters += dead_letters;
            let oldest = first.ids.first().and_then(|e| stream_id_time(&e.id));
            backlog.oldest = match (backlog.oldest, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(backlog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_names_its_group_and_entry() {
        let group = Group::all().nth(5).unwrap();
        let at = position(group, "1700000000000-3");
        assert_eq!(parse_position(&at).unwrap(), (group, "1700000000000-3"));
        assert!(parse_position("1700000000000-3").is_err());
        assert!(parse_position("g99/1-0").is_err());
    }
}
