//! On a cluster, a write is acknowledged once its master's replica has it
//! too: the write and `WAIT 1` go to the master in one pipeline, so a
//! master killed after answering loses nothing its replica is promoted
//! without. A single server has no replica to wait for, and waits for
//! nothing.
//!
//! While a master has no replica that keeps up (the replica is down, or
//! was promoted and its old master has not returned), `WAIT` would cost its
//! whole timeout on every write; after one such answer the writes of that
//! tag skip `WAIT` for a second, so a lost replica costs one short pause
//! per tag and second, and its writes are held by the master alone until a
//! replica is back (as they would be by a single server).

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use redis::{Cmd, FromRedisValue};

use super::{keys::GROUPS, scripts::Lua, Redis};

/// How long a write waits for the replica. Replication on a healthy
/// cluster takes well under a millisecond; this bounds the pause when the
/// replica has just gone.
const WAIT_TIMEOUT: Duration = Duration::from_millis(50);
/// How long the writes of a tag skip `WAIT` after a replica did not answer.
const BEHIND_FOR: Duration = Duration::from_secs(1);

/// Which tag a write is in: a group's index, or [`META`].
pub type Slot = usize;
pub const META: Slot = GROUPS;

pub struct Replication {
    /// Per tag: until when (Unix ms) writes skip `WAIT`.
    behind_until: [AtomicI64; GROUPS + 1],
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Replication {
    pub fn new() -> Self {
        Self {
            behind_until: std::array::from_fn(|_| AtomicI64::new(0)),
        }
    }

    fn waits(&self, slot: Slot) -> bool {
        now_ms() >= self.behind_until[slot].load(Ordering::Relaxed)
    }

    fn record(&self, slot: Slot, replicas: i64) {
        if replicas < 1 {
            let until = now_ms() + i64::try_from(BEHIND_FOR.as_millis()).unwrap_or(i64::MAX);
            self.behind_until[slot].store(until, Ordering::Relaxed);
            tracing::warn!(
                slot,
                "a write was not replicated within {WAIT_TIMEOUT:?}: the master alone holds this tag's writes for now"
            );
        }
    }
}

/// Runs `cmd`, a write, on `redis`; with `replication`, waits for the
/// replica after it on the same master.
///
/// # Errors
/// When the write fails (a replica that does not answer is no error).
pub async fn write<T: FromRedisValue>(
    redis: &mut Redis,
    replication: Option<&Replication>,
    slot: Slot,
    cmd: Cmd,
) -> redis::RedisResult<T> {
    match replication {
        Some(replication) if replication.waits(slot) => {
            let mut pipe = redis::pipe();
            pipe.add_command(cmd)
                .cmd("WAIT")
                .arg(1)
                .arg(u64::try_from(WAIT_TIMEOUT.as_millis()).unwrap_or(u64::MAX));
            let (value, replicas): (T, i64) = pipe.query_async(redis).await?;
            replication.record(slot, replicas);
            Ok(value)
        }
        _ => cmd.query_async(redis).await,
    }
}

/// `script` with `keys` and `args`, as [`write`]: by its hash, and on
/// `NOSCRIPT` whole (`EVAL`, routed by its keys like the write), rather than
/// loaded on every node first: after a failover a node may not have it,
/// and loading it everywhere would fail while any node is gone.
///
/// # Errors
/// When the script fails.
pub async fn eval<T: FromRedisValue>(
    redis: &mut Redis,
    replication: Option<&Replication>,
    slot: Slot,
    script: &Lua,
    keys: &[String],
    args: &[String],
) -> redis::RedisResult<T> {
    let cmd = |verb: &str, what: &str| {
        let mut cmd = redis::cmd(verb);
        cmd.arg(what).arg(keys.len()).arg(keys).arg(args);
        cmd
    };
    match write(redis, replication, slot, cmd("EVALSHA", script.script.get_hash())).await {
        Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            write(redis, replication, slot, cmd("EVAL", script.body)).await
        }
        answer => answer,
    }
}
