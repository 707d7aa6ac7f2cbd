//! analytics-service's SQLite file: `VACUUM INTO` a copy; restored inside
//! the live file, in one transaction, so the service's open connections see
//! the new contents (a file swapped under them would leave them on the old
//! one).

use std::{collections::BTreeMap, path::Path, str::FromStr as _, time::Duration};

use anyhow::Context as _;
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteConnection},
    Connection as _, Row as _,
};

const FILE: &str = "analytics.db";

async fn open(path: &Path, read_only: bool) -> anyhow::Result<SqliteConnection> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .read_only(read_only)
        .busy_timeout(Duration::from_secs(10));
    SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("opening {}", path.display()))
}

/// The last migration applied and the rows of every table of `schema`
/// (`main`, or an attached database).
async fn read(conn: &mut SqliteConnection, schema: &str) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let version: i64 = sqlx::query_scalar(&format!(
        "SELECT COALESCE(MAX(version), 0) FROM {schema}._sqlx_migrations WHERE success"
    ))
    .fetch_one(&mut *conn)
    .await
    .context("reading the migrations applied")?;
    let mut counts = BTreeMap::new();
    for table in tables(conn, schema).await? {
        let sql = format!("SELECT count(*) FROM {schema}.\"{}\"", table.replace('"', "\"\""));
        let n: i64 = sqlx::query(&sql).fetch_one(&mut *conn).await?.get(0);
        counts.insert(table, u64::try_from(n).unwrap_or_default());
    }
    Ok((version, counts))
}

/// The data tables of `schema` (SQLite's own and the migrations' aside).
async fn tables(conn: &mut SqliteConnection, schema: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT name FROM {schema}.sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY name"
    ))
    .fetch_all(&mut *conn)
    .await?)
}

pub async fn inspect(path: &Path) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    read(&mut open(path, true).await?, "main").await
}

pub async fn backup(path: &Path, dir: &Path) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let target = dir.join(FILE);
    let mut conn = open(path, true).await?;
    sqlx::query("VACUUM INTO ?")
        .bind(target.display().to_string())
        .execute(&mut conn)
        .await
        .context("VACUUM INTO")?;
    // The copy is one transaction's view: count what it holds.
    read(&mut open(&target, true).await?, "main").await
}

pub async fn restore(path: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut conn = open(path, false).await?;
    sqlx::query("ATTACH DATABASE ? AS backup")
        .bind(dir.join(FILE).display().to_string())
        .execute(&mut conn)
        .await?;
    let result = replace(&mut conn).await;
    if result.is_err() {
        let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
    }
    let _ = sqlx::query("DETACH DATABASE backup").execute(&mut conn).await;
    result
}

/// Everything in `main` dropped and made again from `backup`, schema and
/// rows, migrations table included, in one transaction.
async fn replace(conn: &mut SqliteConnection) -> anyhow::Result<()> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let live: Vec<(String, String)> = sqlx::query_as(
        "SELECT type, name FROM main.sqlite_master WHERE name NOT LIKE 'sqlite_%' \
         AND type IN ('table', 'view', 'trigger')",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (kind, name) in live {
        let sql = format!(
            "DROP {} IF EXISTS main.\"{}\"",
            kind.to_uppercase(),
            name.replace('"', "\"\"")
        );
        sqlx::query(&sql).execute(&mut *conn).await?;
    }
    // Tables first, then what refers to them.
    let schema: Vec<String> = sqlx::query_scalar(
        "SELECT sql FROM backup.sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' \
         ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, rowid",
    )
    .fetch_all(&mut *conn)
    .await?;
    for sql in schema {
        sqlx::query(&sql).execute(&mut *conn).await?;
    }
    let mut all = tables(conn, "backup").await?;
    all.push("_sqlx_migrations".to_owned());
    for table in all {
        let name = table.replace('"', "\"\"");
        sqlx::query(&format!("INSERT INTO main.\"{name}\" SELECT * FROM backup.\"{name}\""))
            .execute(&mut *conn)
            .await?;
    }
    let has_sequence: i64 =
        sqlx::query_scalar("SELECT count(*) FROM backup.sqlite_master WHERE name = 'sqlite_sequence'")
            .fetch_one(&mut *conn)
            .await?;
    if has_sequence > 0 {
        sqlx::query("DELETE FROM main.sqlite_sequence")
            .execute(&mut *conn)
            .await?;
        sqlx::query("INSERT INTO main.sqlite_sequence SELECT * FROM backup.sqlite_sequence")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(())
}
