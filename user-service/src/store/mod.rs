//! The only module that talks to PostgreSQL.
//!
//! Every query here is served by an index: `users` by its primary key or the
//! unique username index, `follows` by its primary key (follower, followee)
//! or `follows_by_followee`. Paging is keyset paging on the other user's id,
//! so a page costs the same wherever it starts.

mod maintenance;

use std::time::Duration;

pub use maintenance::Maintenance;

use chrono::{DateTime, Utc};
use service_kit::{
    events::{Event, Payload, RevocationReason},
    relay::{Backlog, DeadLetter, Outbox, Pending, Rejected},
    revocation::Revocation,
    store::StoreStatus,
};
use sqlx::{
    postgres::{PgPool, PgPoolOptions},
    Postgres, Row, Transaction,
};
use uuid::Uuid;

use crate::{
    domain::{BanReason, NewUser, Page, PageRequest, Role, User, UserId},
    error::{Error, Result},
};

/// What user-service knows about a token holder right now: their account as
/// it is, and the instant before which their tokens are void.
#[derive(Clone, Debug)]
pub struct Standing {
    pub user: User,
    pub tokens_valid_from: Option<DateTime<Utc>>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The columns every user query returns, in [`user_from_row`]'s order.
const USER_COLUMNS: &str = "id, username, display_name, role, banned_at IS NOT NULL AS banned, created_at";

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    status: StoreStatus,
}

impl Store {
    /// A pool that connects on demand, so the service starts (and reports
    /// NOT_SERVING) while PostgreSQL is down.
    ///
    /// # Errors
    /// When the URL cannot be parsed.
    pub fn connect_lazy(url: &str, max_connections: u32, status: StoreStatus) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            // Bounds how long a request waits for a connection while the
            // database is unreachable but not yet known to be.
            .acquire_timeout(Duration::from_secs(2))
            // Connections that died with a restarted server are found and
            // replaced here rather than failing a request.
            .test_before_acquire(true)
            .connect_lazy(url)?;
        Ok(Self { pool, status })
    }

    /// Fails fast while the store monitor says the database is down.
    fn ready(&self) -> Result<&PgPool> {
        if self.status.is_up() {
            Ok(&self.pool)
        } else {
            Err(Error::store_unavailable(None))
        }
    }

    /// Brings the schema up to date. Safe to run from several replicas at
    /// once: sqlx takes an advisory lock.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => classify(e),
            other => Error::internal(anyhow::Error::new(other).context("running migrations")),
        })
    }

    pub async fn ping(&self) -> Result<()> {
        service_kit::store::timed("postgresql", "ping", async move {
            sqlx::query("SELECT 1").execute(&self.pool).await.map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// Stores a new user and its `UserRegistered` event, atomically.
    pub async fn insert_user(&self, user: &NewUser, event: &Event) -> Result<User> {
        service_kit::store::timed("postgresql", "insert_user", async move {
            let mut tx = self.ready()?.begin().await.map_err(classify)?;
            let row = sqlx::query(&format!(
                "INSERT INTO users (id, username, display_name, password_hash, role)
             VALUES ($1, $2, $3, $4, $5) RETURNING {USER_COLUMNS}"
            ))
            .bind(user.id.as_uuid())
            .bind(user.username.as_str())
            .bind(user.display_name.as_str())
            .bind(&user.password_hash)
            .bind(user.role.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db) if db.is_unique_violation() => Error::AlreadyExists("the username is taken"),
                _ => classify(e),
            })?;
            let user = user_from_row(&row)?;
            write_event(&mut tx, event).await?;
            tx.commit().await.map_err(classify)?;
            Ok(user)
        })
        .await
    }

    /// Creates the configured administrator, or makes the existing account
    /// with that name an administrator.
    pub async fn ensure_admin(&self, admin: &NewUser) -> Result<()> {
        service_kit::store::timed("postgresql", "ensure_admin", async move {
            sqlx::query(
                "INSERT INTO users (id, username, display_name, password_hash, role)
             VALUES ($1, $2, $3, $4, 'admin')
             ON CONFLICT (username) DO UPDATE SET role = 'admin' WHERE users.role <> 'admin'",
            )
            .bind(admin.id.as_uuid())
            .bind(admin.username.as_str())
            .bind(admin.display_name.as_str())
            .bind(&admin.password_hash)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// Whether `username` is taken (the unique index answers it), so
    /// Register refuses a taken name before spending a password hash on it.
    pub async fn username_taken(&self, username: &str) -> Result<bool> {
        service_kit::store::timed("postgresql", "username_taken", async move {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE username = $1)")
                .bind(username)
                .fetch_one(self.ready()?)
                .await
                .map_err(classify)
        })
        .await
    }

    /// The user with `username`, their standing and password hash.
    pub async fn credentials(&self, username: &str) -> Result<Option<(Standing, String)>> {
        service_kit::store::timed("postgresql", "credentials", async move {
            let row = sqlx::query(&format!(
                "SELECT {USER_COLUMNS}, tokens_valid_from, password_hash FROM users WHERE username = $1"
            ))
            .bind(username)
            .fetch_optional(self.ready()?)
            .await
            .map_err(classify)?;
            row.map(|row| {
                Ok((
                    standing_from_row(&row)?,
                    row.try_get("password_hash").map_err(internal)?,
                ))
            })
            .transpose()
        })
        .await
    }

    /// The standing of `id` and their password hash, by primary key.
    pub async fn standing(&self, id: UserId) -> Result<Option<(Standing, String)>> {
        service_kit::store::timed("postgresql", "standing", async move {
            let row = sqlx::query(&format!(
                "SELECT {USER_COLUMNS}, tokens_valid_from, password_hash FROM users WHERE id = $1"
            ))
            .bind(id.as_uuid())
            .fetch_optional(self.ready()?)
            .await
            .map_err(classify)?;
            row.map(|row| {
                Ok((
                    standing_from_row(&row)?,
                    row.try_get("password_hash").map_err(internal)?,
                ))
            })
            .transpose()
        })
        .await
    }

    /// Replaces the password hash and voids earlier tokens, writing the
    /// revocation event in the same transaction. `false` when the user is
    /// gone.
    /// Sets a new password hash and voids earlier tokens (see
    /// [`NEXT_CUTOFF`]); the cutoff stored, `None` when no such user.
    pub async fn change_password(
        &self,
        id: UserId,
        hash: &str,
        earliest: DateTime<Utc>,
        revoked: &Revoke<'_>,
    ) -> Result<Option<DateTime<Utc>>> {
        service_kit::store::timed("postgresql", "change_password", async move {
            let mut tx = self.ready()?.begin().await.map_err(classify)?;
            let cutoff: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
                "UPDATE users SET password_hash = $2, tokens_valid_from = {NEXT_CUTOFF} WHERE id = $1
             RETURNING tokens_valid_from"
            ))
            .bind(id.as_uuid())
            .bind(hash)
            .bind(earliest)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
            let Some(cutoff) = cutoff else {
                return Ok(None);
            };
            write_event(&mut tx, &revoked(cutoff)).await?;
            tx.commit().await.map_err(classify)?;
            Ok(Some(cutoff))
        })
        .await
    }

    pub async fn user(&self, id: UserId) -> Result<Option<User>> {
        service_kit::store::timed("postgresql", "user", async move {
            let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
                .bind(id.as_uuid())
                .fetch_optional(self.ready()?)
                .await
                .map_err(classify)?;
            row.as_ref().map(user_from_row).transpose()
        })
        .await
    }

    pub async fn users(&self, ids: &[UserId]) -> Result<Vec<User>> {
        service_kit::store::timed("postgresql", "users", async move {
            let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
            let rows = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ANY($1)"))
                .bind(&ids)
                .fetch_all(self.ready()?)
                .await
                .map_err(classify)?;
            rows.iter().map(user_from_row).collect()
        })
        .await
    }

    /// Adds the edge (and its event, in the same transaction); already
    /// following is success and writes nothing. Fails with NotFound when the
    /// followee does not exist and PermissionDenied when the follower is
    /// banned or gone.
    pub async fn follow(&self, follower: UserId, followee: UserId, event: &Event) -> Result<()> {
        service_kit::store::timed("postgresql", "follow", async move {
            let mut tx = self.ready()?.begin().await.map_err(classify)?;
            let row = sqlx::query(
                "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND banned_at IS NULL) AS follower_ok,
                    EXISTS (SELECT 1 FROM users WHERE id = $2) AS followee_ok",
            )
            .bind(follower.as_uuid())
            .bind(followee.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
            if !row.try_get::<bool, _>("follower_ok").map_err(internal)? {
                return Err(Error::permission_denied("the caller is banned or deleted"));
            }
            if !row.try_get::<bool, _>("followee_ok").map_err(internal)? {
                return Err(Error::not_found("no user has that id"));
            }
            let inserted =
                sqlx::query("INSERT INTO follows (follower_id, followee_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(follower.as_uuid())
                    .bind(followee.as_uuid())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| match &e {
                        // The followee was deleted between the check and the insert.
                        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                            Error::not_found("no user has that id")
                        }
                        _ => classify(e),
                    })?;
            if inserted.rows_affected() == 1 {
                write_event(&mut tx, event).await?;
            }
            tx.commit().await.map_err(classify)
        })
        .await
    }

    /// Removes the edge (and writes its event); not following is success and
    /// writes nothing.
    pub async fn unfollow(&self, follower: UserId, followee: UserId, event: &Event) -> Result<()> {
        service_kit::store::timed("postgresql", "unfollow", async move {
            let mut tx = self.ready()?.begin().await.map_err(classify)?;
            let deleted = sqlx::query("DELETE FROM follows WHERE follower_id = $1 AND followee_id = $2")
                .bind(follower.as_uuid())
                .bind(followee.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            if deleted.rows_affected() == 1 {
                write_event(&mut tx, event).await?;
            }
            tx.commit().await.map_err(classify)
        })
        .await
    }

    /// Users `user` follows, in id order.
    pub async fn following(&self, user: UserId, page: PageRequest) -> Result<Page> {
        service_kit::store::timed("postgresql", "following", async move {
            self.edge_page(user, page, "follower_id", "followee_id").await
        })
        .await
    }

    /// Users following `user`, in id order.
    pub async fn followers(&self, user: UserId, page: PageRequest) -> Result<Page> {
        service_kit::store::timed("postgresql", "followers", async move {
            self.edge_page(user, page, "followee_id", "follower_id").await
        })
        .await
    }

    async fn edge_page(&self, user: UserId, page: PageRequest, by: &str, other: &str) -> Result<Page> {
        let pool = self.ready()?;
        // One row more than asked says whether another page follows.
        let limit = i64::from(page.size()) + 1;
        let rows = sqlx::query(&format!(
            "SELECT u.id, u.username, u.display_name, u.role, u.banned_at IS NOT NULL AS banned, u.created_at
             FROM follows f JOIN users u ON u.id = f.{other}
             WHERE f.{by} = $1 AND ($2::uuid IS NULL OR f.{other} > $2)
             ORDER BY f.{other}
             LIMIT $3"
        ))
        .bind(user.as_uuid())
        .bind(page.after().map(|id| id.as_uuid()))
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(classify)?;
        let mut users = rows.iter().map(user_from_row).collect::<Result<Vec<_>>>()?;
        if users.is_empty() && page.after().is_none() && self.user(user).await?.is_none() {
            return Err(Error::not_found("no user has that id"));
        }
        let more = users.len() > page.size() as usize;
        users.truncate(page.size() as usize);
        let next = if more { users.last().map(|u| u.id) } else { None };
        Ok(Page { users, next })
    }

    /// Sets the role and, when it changed, voids earlier tokens (their role
    /// claim is stale) with the revocation event in the same transaction.
    pub async fn set_role(
        &self,
        id: UserId,
        role: Role,
        earliest: DateTime<Utc>,
        revoked: &Revoke<'_>,
    ) -> Result<Option<User>> {
        service_kit::store::timed("postgresql", "set_role", async move {
            let mut tx = self.ready()?.begin().await.map_err(classify)?;
            let changed = sqlx::query(&format!(
                "UPDATE users SET role = $2, tokens_valid_from = {NEXT_CUTOFF}
             WHERE id = $1 AND role <> $2 RETURNING {USER_COLUMNS}, tokens_valid_from"
            ))
            .bind(id.as_uuid())
            .bind(role.as_str())
            .bind(earliest)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
            if let Some(row) = changed {
                let user = user_from_row(&row)?;
                write_event(&mut tx, &revoked(cutoff_from_row(&row)?)).await?;
                tx.commit().await.map_err(classify)?;
                return Ok(Some(user));
            }
            tx.rollback().await.map_err(classify)?;
            // Already in that role (nothing to revoke), or no such user.
            self.user(id).await
        })
        .await
    }

    /// Bans (`Some(reason)`) or unbans (`None`) `id`, but only if its role is
    /// below `below`: the check and the change are one statement, so a role
    /// change in between cannot slip through. When the ban state changes,
    /// `event` is written in the same transaction; banning a banned user (or
    /// unbanning an unbanned one) changes and writes nothing.
    pub async fn set_banned(
        &self,
        id: UserId,
        ban: Option<&BanReason>,
        below: Role,
        earliest: DateTime<Utc>,
        events: &[Event],
        revoked: &Revoke<'_>,
    ) -> Result<Moderated> {
        service_kit::store::timed("postgresql", "set_banned", async move {
            let lower_roles: Vec<&str> = [Role::User, Role::Moderator, Role::Admin]
                .into_iter()
                .filter(|r| *r < below)
                .map(Role::as_str)
                .collect();
            let sql = if ban.is_some() {
                format!(
                    "UPDATE users SET banned_at = now(), ban_reason = $4, tokens_valid_from = {NEXT_CUTOFF}
                 WHERE id = $1 AND role = ANY($2) AND banned_at IS NULL
                 RETURNING {USER_COLUMNS}, tokens_valid_from"
                )
            } else {
                format!(
                    "UPDATE users SET banned_at = NULL, ban_reason = NULL, tokens_valid_from = {NEXT_CUTOFF}
                 WHERE id = $1 AND role = ANY($2) AND banned_at IS NOT NULL
                 RETURNING {USER_COLUMNS}, tokens_valid_from"
                )
            };
            let mut tx = self.ready()?.begin().await.map_err(classify)?;
            let query = sqlx::query(&sql).bind(id.as_uuid()).bind(&lower_roles).bind(earliest);
            let query = match ban {
                Some(reason) => query.bind(reason.as_str()),
                None => query,
            };
            let changed = query.fetch_optional(&mut *tx).await.map_err(classify)?;
            if let Some(row) = changed {
                let user = user_from_row(&row)?;
                for event in events {
                    write_event(&mut tx, event).await?;
                }
                write_event(&mut tx, &revoked(cutoff_from_row(&row)?)).await?;
                tx.commit().await.map_err(classify)?;
                return Ok(Moderated::Changed(user));
            }
            tx.rollback().await.map_err(classify)?;
            Ok(match self.user(id).await? {
                None => Moderated::NoSuchUser,
                Some(user) if user.role >= below => Moderated::NotAllowed,
                Some(user) => Moderated::Unchanged(user),
            })
        })
        .await
    }

    /// Deletes the user and, by cascade, their follow edges. `false` when no
    /// such user existed.
    pub async fn delete_user(
        &self,
        id: UserId,
        earliest: DateTime<Utc>,
        revoked: &Revoke<'_>,
        events: &[Event],
    ) -> Result<bool> {
        service_kit::store::timed("postgresql", "delete_user", async move {
            let mut tx = self.ready()?.begin().await.map_err(classify)?;
            let stored: Option<Option<DateTime<Utc>>> =
                sqlx::query_scalar("DELETE FROM users WHERE id = $1 RETURNING tokens_valid_from")
                    .bind(id.as_uuid())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(classify)?;
            let Some(stored) = stored else {
                return Ok(false);
            };
            // The same rule as NEXT_CUTOFF: past every token ever issued.
            let cutoff = stored.map_or(earliest, |from| earliest.max(from + chrono::Duration::seconds(1)));
            // The revocation first, so every service refuses the user's tokens
            // before it starts erasing their content.
            write_event(&mut tx, &revoked(cutoff)).await?;
            for event in events {
                write_event(&mut tx, event).await?;
            }
            tx.commit().await.map_err(classify)?;
            Ok(true)
        })
        .await
    }

    /// The outbox as `destination` sees it, for a relay.
    #[must_use]
    pub fn outbox(&self, destination: &'static str) -> PgOutbox {
        PgOutbox {
            pool: self.pool.clone(),
            destination,
        }
    }
}

/// What a ban or unban did.
#[derive(Debug)]
pub enum Moderated {
    Changed(User),
    /// Already in the asked state.
    Unchanged(User),
    /// The user's role is not below the caller's.
    NotAllowed,
    NoSuchUser,
}

/// Where each event goes. Every event feeds analytics; revocations reach
/// every service that verifies tokens; bans and erasures reach the services
/// holding the user's content.
pub fn destinations(payload: &Payload) -> &'static [&'static str] {
    match payload {
        Payload::UserBanned { .. } | Payload::UserDeleted { .. } | Payload::TokensRevoked { .. } => {
            &[ANALYTICS, COMMENTS, MESSAGES]
        }
        Payload::UserUnbanned { .. } => &[ANALYTICS, MESSAGES],
        _ => &[ANALYTICS],
    }
}

pub const ANALYTICS: &str = "analytics";
pub const COMMENTS: &str = "comments";
pub const MESSAGES: &str = "messages";

impl Store {
    /// Revocations with a cutoff after `since`, in (cutoff, user) order,
    /// after `after`; at most `limit`.
    pub async fn revocations(
        &self,
        since: DateTime<Utc>,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: u32,
    ) -> Result<Vec<Revocation>> {
        service_kit::store::timed("postgresql", "revocations", async move {
            let (after_cutoff, after_user) = after.unwrap_or((since, Uuid::nil()));
            let rows: Vec<(Uuid, DateTime<Utc>, String)> = sqlx::query_as(
                "SELECT user_id, issued_before, reason FROM revocations
             WHERE issued_before > $1 AND (issued_before, user_id) > ($2, $3)
             ORDER BY issued_before, user_id LIMIT $4",
            )
            .bind(since)
            .bind(after_cutoff)
            .bind(after_user)
            .bind(i64::from(limit))
            .fetch_all(self.ready()?)
            .await
            .map_err(classify)?;
            rows.into_iter()
                .map(|(user_id, issued_before, reason)| {
                    Ok(Revocation {
                        user_id,
                        issued_before,
                        reason: RevocationReason::parse(&reason)
                            .ok_or_else(|| Error::internal(anyhow::anyhow!("stored revocation reason {reason:?}")))?,
                    })
                })
                .collect()
        })
        .await
    }
}

/// Builds the `TokensRevoked` event for the cutoff a change stored.
pub type Revoke<'a> = dyn Fn(DateTime<Utc>) -> Event + Send + Sync + 'a;

/// The new `tokens_valid_from` of a change that voids a user's tokens: at
/// least `$3` (the next whole second), and strictly after the one stored.
/// Token `iat`s are whole seconds and a login right after a revocation is
/// stamped with its cutoff, so without the second rule a token issued
/// between two revocations in the same second would outlive the second one
/// (promote, log in, demote: an admin token that keeps working).
const NEXT_CUTOFF: &str = "greatest($3, tokens_valid_from + interval '1 second')";

fn cutoff_from_row(row: &sqlx::postgres::PgRow) -> Result<DateTime<Utc>> {
    let cutoff: Option<DateTime<Utc>> = row.try_get("tokens_valid_from").map_err(internal)?;
    cutoff.ok_or_else(|| Error::internal(anyhow::anyhow!("tokens_valid_from unset right after setting it")))
}

async fn write_event(tx: &mut Transaction<'_, Postgres>, event: &Event) -> Result<()> {
    if let Payload::TokensRevoked {
        user_id,
        issued_before,
        reason,
    } = &event.payload
    {
        // The catch-up copy (ListRevocations); the later cutoff wins.
        sqlx::query(
            "INSERT INTO revocations (user_id, issued_before, reason) VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE SET issued_before = excluded.issued_before, reason = excluded.reason
             WHERE excluded.issued_before >= revocations.issued_before",
        )
        .bind(user_id)
        .bind(issued_before)
        .bind(reason.as_str())
        .execute(&mut **tx)
        .await
        .map_err(classify)?;
    }
    let json = event.to_json()?;
    for destination in destinations(&event.payload) {
        sqlx::query("INSERT INTO outbox (destination, event_id, event, occurred_at) VALUES ($1, $2, $3, $4)")
            .bind(destination)
            .bind(event.id)
            .bind(&json)
            .bind(event.occurred_at)
            .execute(&mut **tx)
            .await
            .map_err(classify)?;
    }
    Ok(())
}

/// One destination's rows of the outbox table.
#[derive(Clone)]
pub struct PgOutbox {
    pool: PgPool,
    destination: &'static str,
}

impl Outbox for PgOutbox {
    async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let rows = sqlx::query("SELECT id, event FROM outbox WHERE destination = $1 ORDER BY id LIMIT $2")
            .bind(self.destination)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id")?;
                let event: String = row.try_get("event")?;
                Ok(Pending {
                    position: id.to_string(),
                    event: Event::from_json(&event).map_err(|e| e.to_string()),
                })
            })
            .collect()
    }

    async fn mark_delivered(&self, delivered: &[Pending]) -> anyhow::Result<()> {
        let ids: Vec<i64> = delivered.iter().filter_map(|p| p.position.parse().ok()).collect();
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn dead_letter(&self, rejected: &[Rejected]) -> anyhow::Result<()> {
        let (ids, reasons): (Vec<i64>, Vec<&str>) = rejected
            .iter()
            .filter_map(|r| Some((r.position.parse::<i64>().ok()?, r.reason.as_str())))
            .unzip();
        // One statement: the rows leave the outbox and arrive here together.
        sqlx::query(
            "WITH reasons AS (SELECT * FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)),
                  moved AS (DELETE FROM outbox WHERE id IN (SELECT id FROM reasons) RETURNING *)
             INSERT INTO outbox_dead_letters (id, destination, event_id, event, occurred_at, reason)
             SELECT moved.id, moved.destination, moved.event_id, moved.event, moved.occurred_at, reasons.reason
             FROM moved JOIN reasons USING (id)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&reasons)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, event_id, reason, failed_at FROM outbox_dead_letters
             WHERE destination = $1 ORDER BY id LIMIT $2",
        )
        .bind(self.destination)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id")?;
                let event_id: Uuid = row.try_get("event_id")?;
                Ok(DeadLetter {
                    position: id.to_string(),
                    event_id: Some(event_id.to_string()),
                    reason: row.try_get("reason")?,
                    failed_at: row.try_get("failed_at")?,
                })
            })
            .collect()
    }

    async fn retry_dead_letters(&self, limit: usize) -> anyhow::Result<u64> {
        let moved = sqlx::query(
            "WITH moved AS (
                 DELETE FROM outbox_dead_letters WHERE id IN (
                     SELECT id FROM outbox_dead_letters WHERE destination = $1 ORDER BY id LIMIT $2)
                 RETURNING id, destination, event_id, event, occurred_at)
             INSERT INTO outbox (id, destination, event_id, event, occurred_at)
             SELECT id, destination, event_id, event, occurred_at FROM moved
             ON CONFLICT DO NOTHING",
        )
        .bind(self.destination)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(moved.rows_affected())
    }

    async fn backlog(&self) -> anyhow::Result<Backlog> {
        let row = sqlx::query(
            "SELECT count(*) AS depth, min(occurred_at) AS oldest,
                    (SELECT count(*) FROM outbox_dead_letters WHERE destination = $1) AS dead_letters
             FROM outbox WHERE destination = $1",
        )
        .bind(self.destination)
        .fetch_one(&self.pool)
        .await?;
        let count =
            |name: &str| -> anyhow::Result<u64> { Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0)) };
        Ok(Backlog {
            depth: count("depth")?,
            oldest: row.try_get("oldest")?,
            dead_letters: count("dead_letters")?,
        })
    }
}

fn user_from_row(row: &sqlx::postgres::PgRow) -> Result<User> {
    let id: Uuid = row.try_get("id").map_err(internal)?;
    let role: String = row.try_get("role").map_err(internal)?;
    let created_at: DateTime<Utc> = row.try_get("created_at").map_err(internal)?;
    Ok(User {
        id: id.into(),
        username: row.try_get("username").map_err(internal)?,
        display_name: row.try_get("display_name").map_err(internal)?,
        role: Role::parse(&role).ok_or_else(|| Error::internal(anyhow::anyhow!("unknown role {role:?} in users")))?,
        banned: row.try_get("banned").map_err(internal)?,
        created_at,
    })
}

fn standing_from_row(row: &sqlx::postgres::PgRow) -> Result<Standing> {
    Ok(Standing {
        user: user_from_row(row)?,
        tokens_valid_from: row.try_get("tokens_valid_from").map_err(internal)?,
    })
}

fn internal(err: sqlx::Error) -> Error {
    Error::internal(anyhow::Error::new(err).context("reading a users row"))
}

/// Tells "the database is unreachable" (UNAVAILABLE, retry later) from
/// everything else (a bug: INTERNAL).
fn classify(err: sqlx::Error) -> Error {
    let unavailable = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08 is connection exceptions; 57P01-57P03 are the server
        // shutting down or starting up.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03")),
        _ => false,
    };
    if unavailable {
        Error::store_unavailable(Some(anyhow::Error::new(err)))
    } else {
        Error::internal(anyhow::Error::new(err).context("querying PostgreSQL"))
    }
}
