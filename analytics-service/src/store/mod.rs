//! The only module that talks to SQLite.
//!
//! # One writer, by design
//!
//! SQLite takes one writer at a time per database file. Rather than let
//! concurrent RecordEvents transactions contend for that lock (and fail with
//! SQLITE_BUSY under load), writes go through one async mutex, so they queue
//! in the service, in order; reads run beside them thanks to WAL mode. One
//! process owns the file: in Kubernetes analytics-service is a single-replica
//! StatefulSet. Scaling writes out would mean partitioning events by key
//! across several files or services, or moving the aggregates to a store
//! with concurrent writers; reads could scale sooner with read replicas of
//! the file (e.g. Litestream).
//!
//! # Reads cannot starve writes
//!
//! Reads (stats, TopMessages, histograms) run on a pool of their own,
//! [`READERS`] read-only connections, so however many heavy reads arrive,
//! RecordEvents and the health probe keep their own connections. A read
//! waits at most [`READ_QUEUE_WAIT`] for a reader (then RESOURCE_EXHAUSTED),
//! and SQLite itself interrupts a query at the caller's deadline, or after
//! [`MAX_READ_TIME`] without one, so an abandoned read stops costing CPU.

mod maintenance;

use std::{str::FromStr as _, time::Duration};

pub use maintenance::Maintenance;

use chrono::{DateTime, TimeZone as _, Utc};
use service_kit::{
    events::RevocationReason,
    revocation::{Revocation, RevocationStore},
    store::StoreStatus,
};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
    Row, Sqlite, Transaction,
};
use tracing::Instrument as _;

use crate::{
    domain::{Bucket, Event, Granularity, MessageId, MessageStats, Payload, UserId, UserStats, Window},
    error::{Error, Result},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Read-only connections for the read RPCs.
const READERS: u32 = 2;
/// How long a read waits for a free reader.
const READ_QUEUE_WAIT: Duration = Duration::from_millis(500);
/// Longest a read runs when its caller set no deadline.
const MAX_READ_TIME: Duration = Duration::from_secs(5);
/// SQLite virtual-machine steps between two deadline checks (a few µs).
const STEPS_PER_CHECK: i32 = 1_000;

#[derive(Clone)]
pub struct Store {
    /// The writer, migrations, the probe and revocations.
    pool: SqlitePool,
    /// The read RPCs.
    reads: SqlitePool,
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    status: StoreStatus,
}

/// A user_stats counter; names are fixed here, never taken from input.
#[derive(Clone, Copy)]
enum UserCounter {
    Messages,
    Comments,
    Followers,
    Following,
    CommentsReceived,
}

impl UserCounter {
    fn column(self) -> &'static str {
        match self {
            Self::Messages => "message_count",
            Self::Comments => "comment_count",
            Self::Followers => "follower_count",
            Self::Following => "following_count",
            Self::CommentsReceived => "comments_received_count",
        }
    }
}

#[derive(Clone, Copy)]
enum ActivityCounter {
    MessagesPosted,
    CommentsAdded,
    UsersRegistered,
    Follows,
}

impl ActivityCounter {
    fn column(self) -> &'static str {
        match self {
            Self::MessagesPosted => "messages_posted",
            Self::CommentsAdded => "comments_added",
            Self::UsersRegistered => "users_registered",
            Self::Follows => "follows",
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database file in WAL mode.
    ///
    /// # Errors
    /// When the URL cannot be parsed.
    pub fn connect_lazy(url: &str, status: StoreStatus) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a RecordEvents batch is fsynced (in the WAL) before it is
            // acknowledged, because the producer deletes the events from its
            // outbox on the acknowledgement; with NORMAL a power loss could
            // take the last batches after that. One fsync per batch of up to
            // 500 events.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        // Users' activity: the file (and the WAL and index beside it, which
        // SQLite gives the file's mode) is the owner's alone. SQLite would
        // create it with the process's umask.
        let file = options.get_filename();
        if file != std::path::Path::new(":memory:") && !file.exists() {
            match service_kit::files::new_private_file(file) {
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(anyhow::Error::new(err).context(format!("creating {}", file.display()))),
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options.clone());
        let reads = SqlitePoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(READ_QUEUE_WAIT)
            .connect_lazy_with(options.read_only(true).create_if_missing(false));
        Ok(Self {
            pool,
            reads,
            writer: std::sync::Arc::new(tokio::sync::Mutex::new(())),
            status,
        })
    }

    fn ready(&self) -> Result<&SqlitePool> {
        if self.status.is_up() {
            Ok(&self.pool)
        } else {
            Err(Error::store_unavailable(None))
        }
    }

    /// A reader whose queries SQLite interrupts at the request's deadline
    /// (or after [`MAX_READ_TIME`]).
    async fn reader(&self) -> Result<sqlx::pool::PoolConnection<Sqlite>> {
        self.ready()?;
        let mut conn = self.reads.acquire().await.map_err(|err| match err {
            sqlx::Error::PoolTimedOut => Error::overloaded("reads", std::time::Duration::from_secs(1)),
            other => classify(other),
        })?;
        let now = std::time::Instant::now();
        let latest = now + MAX_READ_TIME;
        let deadline = service_kit::context::current()
            .and_then(|c| c.deadline)
            .map_or(latest, |d| d.min(latest));
        conn.lock_handle()
            .await
            .map_err(classify)?
            .set_progress_handler(STEPS_PER_CHECK, move || std::time::Instant::now() < deadline);
        Ok(conn)
    }

    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| Error::internal(anyhow::Error::new(e).context("running migrations")))
    }

    pub async fn ping(&self) -> Result<()> {
        service_kit::store::timed("sqlite", "ping", async move {
            sqlx::query("SELECT 1").execute(&self.pool).await.map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// Stores a batch in one transaction; events already stored are skipped
    /// by their unique id, so redelivery changes nothing. For each event, in
    /// order, whether it was stored now.
    pub async fn record(&self, events: &[Event]) -> Result<Vec<bool>> {
        service_kit::store::timed("sqlite", "record", async move {
            let pool = self.ready()?;
            let _writer = self.writer.lock().await;
            let mut tx = pool.begin().await.map_err(classify)?;
            let mut stored_now = Vec::with_capacity(events.len());
            for event in events {
                let (kind, message_id) = describe(&event.payload);
                let inserted = sqlx::query(
                    "INSERT INTO events (event_id, producer, kind, occurred_at, message_id, payload)
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                )
                .bind(event.id.to_string())
                .bind(&event.producer)
                .bind(kind)
                .bind(event.occurred_at.timestamp_millis())
                .bind(message_id)
                .bind(event.to_json()?)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
                let stored = inserted.rows_affected() > 0;
                stored_now.push(stored);
                if stored {
                    apply(&mut tx, event).instrument(event.apply_span()).await?;
                }
            }
            tx.commit().await.map_err(classify)?;
            Ok(stored_now)
        })
        .await
    }

    pub async fn user_stats(&self, user: UserId) -> Result<UserStats> {
        service_kit::store::timed("sqlite", "user_stats", async move {
            let row = sqlx::query(
                "SELECT message_count, comment_count, follower_count, following_count, comments_received_count
             FROM user_stats WHERE user_id = ?",
            )
            .bind(user.to_string())
            .fetch_optional(&mut *self.reader().await?)
            .await
            .map_err(classify)?;
            let Some(row) = row else {
                return Ok(UserStats::default());
            };
            Ok(UserStats {
                messages: get(&row, "message_count")?,
                comments: get(&row, "comment_count")?,
                followers: get(&row, "follower_count")?,
                following: get(&row, "following_count")?,
                comments_received: get(&row, "comments_received_count")?,
            })
        })
        .await
    }

    pub async fn message_stats(&self, message: MessageId) -> Result<MessageStats> {
        service_kit::store::timed("sqlite", "message_stats", async move {
            let row = sqlx::query("SELECT author_id, comment_count, deleted FROM message_stats WHERE message_id = ?")
                .bind(message.to_string())
                .fetch_optional(&mut *self.reader().await?)
                .await
                .map_err(classify)?;
            let Some(row) = row else {
                return Ok(MessageStats::default());
            };
            Ok(MessageStats {
                author_id: row.try_get("author_id").map_err(internal)?,
                comments: get(&row, "comment_count")?,
                deleted: get::<i64>(&row, "deleted")? != 0,
            })
        })
        .await
    }

    /// Messages with the most comments added in `window`, deleted ones left out.
    pub async fn top_messages(&self, window: Window, limit: u32) -> Result<Vec<(String, i64)>> {
        service_kit::store::timed("sqlite", "top_messages", async move {
            let rows = sqlx::query(
                "SELECT e.message_id, count(*) AS comments
             FROM events e LEFT JOIN message_stats m ON m.message_id = e.message_id
             WHERE e.kind = 'comment_added' AND e.occurred_at >= ? AND e.occurred_at < ?
               AND COALESCE(m.deleted, 0) = 0
             GROUP BY e.message_id
             ORDER BY comments DESC, e.message_id
             LIMIT ?",
            )
            .bind(window.start.timestamp_millis())
            .bind(window.end.timestamp_millis())
            .bind(i64::from(limit))
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|row| Ok((row.try_get("message_id").map_err(internal)?, get(row, "comments")?)))
                .collect()
        })
        .await
    }

    /// Activity per bucket in `window`; empty buckets are left out.
    pub async fn histogram(&self, window: Window, granularity: Granularity) -> Result<Vec<Bucket>> {
        service_kit::store::timed("sqlite", "histogram", async move {
            let width = granularity.minutes();
            let rows = sqlx::query(
                "SELECT (minute / ?1) * ?1 AS bucket, sum(messages_posted) AS messages_posted,
                    sum(comments_added) AS comments_added, sum(users_registered) AS users_registered,
                    sum(follows) AS follows
             FROM activity WHERE minute >= ?2 AND minute < ?3
             GROUP BY bucket ORDER BY bucket",
            )
            .bind(width)
            .bind(window.start.timestamp().div_euclid(60))
            .bind(window.end.timestamp().div_euclid(60) + i64::from(window.end.timestamp().rem_euclid(60) != 0))
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let minute: i64 = get(row, "bucket")?;
                    Ok(Bucket {
                        start: Utc.timestamp_opt(minute * 60, 0).single().unwrap_or_default(),
                        messages_posted: get(row, "messages_posted")?,
                        comments_added: get(row, "comments_added")?,
                        users_registered: get(row, "users_registered")?,
                        follows: get(row, "follows")?,
                    })
                })
                .collect()
        })
        .await
    }
}

/// The event's kind and the message it is about, as stored in `events`.
fn describe(payload: &Payload) -> (&'static str, Option<String>) {
    match payload {
        Payload::UserRegistered { .. } => ("user_registered", None),
        Payload::UserFollowed { .. } => ("user_followed", None),
        Payload::UserUnfollowed { .. } => ("user_unfollowed", None),
        Payload::UserBanned { .. } => ("user_banned", None),
        Payload::UserUnbanned { .. } => ("user_unbanned", None),
        Payload::UserDeleted { .. } => ("user_deleted", None),
        Payload::TokensRevoked { .. } => ("tokens_revoked", None),
        Payload::MessagePosted { message_id, .. } => ("message_posted", Some(message_id.to_string())),
        Payload::MessageDeleted { message_id, .. } => ("message_deleted", Some(message_id.to_string())),
        Payload::MessageHidden { message_id, .. } => ("message_hidden", Some(message_id.to_string())),
        Payload::CommentAdded { message_id, .. } => ("comment_added", Some(message_id.to_string())),
        Payload::CommentDeleted { message_id, .. } => ("comment_deleted", Some(message_id.to_string())),
    }
}

/// Updates the aggregates for one newly stored event. Every update is an
/// upsert that adds, so the result does not depend on the order events from
/// different producers arrive in.
async fn apply(tx: &mut Transaction<'_, Sqlite>, event: &Event) -> Result<()> {
    use ActivityCounter as A;
    use UserCounter as U;
    let minute = event.occurred_at.timestamp().div_euclid(60);
    match &event.payload {
        Payload::UserRegistered { .. } => activity(tx, minute, A::UsersRegistered).await,
        Payload::UserFollowed {
            follower_id,
            followee_id,
        } => {
            user(tx, &follower_id.to_string(), U::Following, 1).await?;
            user(tx, &followee_id.to_string(), U::Followers, 1).await?;
            activity(tx, minute, A::Follows).await
        }
        Payload::UserUnfollowed {
            follower_id,
            followee_id,
        } => {
            user(tx, &follower_id.to_string(), U::Following, -1).await?;
            user(tx, &followee_id.to_string(), U::Followers, -1).await
        }
        Payload::MessagePosted { message_id, author_id } => {
            user(tx, &author_id.to_string(), U::Messages, 1).await?;
            message(tx, &message_id.to_string(), Some(&author_id.to_string()), 0, false).await?;
            activity(tx, minute, A::MessagesPosted).await
        }
        Payload::MessageDeleted { message_id, author_id } => {
            user(tx, &author_id.to_string(), U::Messages, -1).await?;
            message(tx, &message_id.to_string(), Some(&author_id.to_string()), 0, true).await
        }
        Payload::CommentAdded {
            message_id,
            author_id,
            message_author_id,
            ..
        } => {
            user(tx, &author_id.to_string(), U::Comments, 1).await?;
            user(tx, &message_author_id.to_string(), U::CommentsReceived, 1).await?;
            message(
                tx,
                &message_id.to_string(),
                Some(&message_author_id.to_string()),
                1,
                false,
            )
            .await?;
            activity(tx, minute, A::CommentsAdded).await
        }
        Payload::CommentDeleted {
            message_id,
            author_id,
            message_author_id,
            ..
        } => {
            user(tx, &author_id.to_string(), U::Comments, -1).await?;
            user(tx, &message_author_id.to_string(), U::CommentsReceived, -1).await?;
            message(
                tx,
                &message_id.to_string(),
                Some(&message_author_id.to_string()),
                -1,
                false,
            )
            .await
        }
        Payload::UserDeleted { user_id } => {
            let user = user_id.to_string();
            sqlx::query("DELETE FROM user_stats WHERE user_id = ?")
                .bind(&user)
                .execute(&mut **tx)
                .await
                .map_err(classify)?;
            sqlx::query("INSERT INTO erased_users (user_id) VALUES (?) ON CONFLICT DO NOTHING")
                .bind(&user)
                .execute(&mut **tx)
                .await
                .map_err(classify)?;
            Ok(())
        }
        Payload::TokensRevoked {
            user_id,
            issued_before,
            reason,
        } => {
            sqlx::query(
                "INSERT INTO revocations (user_id, issued_before, reason) VALUES (?, ?, ?)
                 ON CONFLICT (user_id) DO UPDATE SET issued_before = excluded.issued_before, reason = excluded.reason
                 WHERE excluded.issued_before >= revocations.issued_before",
            )
            .bind(user_id.to_string())
            .bind(issued_before.timestamp())
            .bind(reason.as_str())
            .execute(&mut **tx)
            .await
            .map_err(classify)?;
            Ok(())
        }
        // Recorded for the record; no counter follows them.
        Payload::UserBanned { .. } | Payload::UserUnbanned { .. } | Payload::MessageHidden { .. } => Ok(()),
    }
}

async fn user(tx: &mut Transaction<'_, Sqlite>, user: &str, counter: UserCounter, delta: i64) -> Result<()> {
    let column = counter.column();
    // An erased user's aggregates stay gone, whatever arrives about them.
    sqlx::query(&format!(
        "INSERT INTO user_stats (user_id, {column})
         SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM erased_users WHERE user_id = ?1)
         ON CONFLICT (user_id) DO UPDATE SET {column} = {column} + excluded.{column}"
    ))
    .bind(user)
    .bind(delta)
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    Ok(())
}

async fn message(
    tx: &mut Transaction<'_, Sqlite>,
    message: &str,
    author: Option<&str>,
    comments: i64,
    deleted: bool,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO message_stats (message_id, author_id, comment_count, deleted) VALUES (?, ?, ?, ?)
         ON CONFLICT (message_id) DO UPDATE SET
             author_id = COALESCE(message_stats.author_id, excluded.author_id),
             comment_count = message_stats.comment_count + excluded.comment_count,
             deleted = max(message_stats.deleted, excluded.deleted)",
    )
    .bind(message)
    .bind(author)
    .bind(comments)
    .bind(i64::from(deleted))
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    Ok(())
}

async fn activity(tx: &mut Transaction<'_, Sqlite>, minute: i64, counter: ActivityCounter) -> Result<()> {
    let column = counter.column();
    sqlx::query(&format!(
        "INSERT INTO activity (minute, {column}) VALUES (?, 1)
         ON CONFLICT (minute) DO UPDATE SET {column} = {column} + 1"
    ))
    .bind(minute)
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    Ok(())
}

fn get<T>(row: &sqlx::sqlite::SqliteRow, column: &str) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(column).map_err(internal)
}

fn internal(err: sqlx::Error) -> Error {
    Error::internal(anyhow::Error::new(err).context("reading an analytics row"))
}

fn classify(err: sqlx::Error) -> Error {
    match err {
        // SQLITE_INTERRUPT: the progress handler stopped a read at its deadline.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("9") => Error::DeadlineExceeded,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            Error::store_unavailable(Some(anyhow::Error::new(err)))
        }
        other => Error::internal(anyhow::Error::new(other).context("querying SQLite")),
    }
}

impl RevocationStore for Store {
    async fn active(&self, since: DateTime<Utc>) -> anyhow::Result<Vec<Revocation>> {
        let rows = sqlx::query("SELECT user_id, issued_before, reason FROM revocations WHERE issued_before > ?")
            .bind(since.timestamp())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let user: String = row.try_get("user_id").ok()?;
                let cutoff: i64 = row.try_get("issued_before").ok()?;
                let reason: String = row.try_get("reason").ok()?;
                Some(Revocation {
                    user_id: uuid::Uuid::try_parse(&user).ok()?,
                    issued_before: Utc.timestamp_opt(cutoff, 0).single()?,
                    reason: RevocationReason::parse(&reason)?,
                })
            })
            .collect())
    }

    async fn prune(&self, before: DateTime<Utc>) -> anyhow::Result<()> {
        let _writer = self.writer.lock().await;
        sqlx::query("DELETE FROM revocations WHERE issued_before < ?")
            .bind(before.timestamp())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// What the store monitor prepares and pings: the database, and the
/// revocations it holds, so the service turns SERVING only when it knows
/// them.
pub struct Prepared {
    pub store: Store,
    pub revocations: std::sync::Arc<service_kit::revocation::Revocations>,
}

impl service_kit::store::Probe for Prepared {
    async fn prepare(&self) -> anyhow::Result<()> {
        self.store.migrate().await?;
        self.revocations.refresh(&self.store).await
    }

    async fn ping(&self) -> anyhow::Result<()> {
        Ok(self.store.ping().await?)
    }
}
