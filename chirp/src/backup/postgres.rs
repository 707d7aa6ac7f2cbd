//! user-service's PostgreSQL database: `pg_dump -Fc` and `pg_restore`.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _};
use sqlx::{Connection as _, PgConnection, Row as _};
use test_support::process::pg_binary;

use super::Store;

const FILE: &str = "users.dump";

/// The URL of the same server with another database.
fn with_database(url: &str, database: &str) -> anyhow::Result<(String, String)> {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, current) = base.rsplit_once('/').context("DATABASE_URL has no database")?;
    if current.is_empty() || server.ends_with('/') {
        bail!("DATABASE_URL has no database");
    }
    let other = format!(
        "{server}/{database}{}",
        query.map(|q| format!("?{q}")).unwrap_or_default()
    );
    Ok((other, current.to_owned()))
}

/// The last migration applied and the rows of every table.
async fn read(conn: &mut PgConnection) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let version: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut *conn)
        .await
        .context("reading the migrations applied")?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = BTreeMap::new();
    for table in tables {
        // A name from the catalogue, quoted as an identifier.
        let sql = format!("SELECT count(*) FROM \"{}\"", table.replace('"', "\"\""));
        let n: i64 = sqlx::query(&sql).fetch_one(&mut *conn).await?.get(0);
        counts.insert(table, u64::try_from(n).unwrap_or_default());
    }
    Ok((version, counts))
}

pub async fn inspect(store: &Store) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let mut conn = PgConnection::connect(&store.postgres).await?;
    read(&mut conn).await
}

/// Counts read and dump taken in one snapshot: the transaction exports it
/// and `pg_dump --snapshot` reads from it.
pub async fn backup(store: &Store, dir: &Path) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let mut conn = PgConnection::connect(&store.postgres).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut conn)
        .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut conn)
        .await?;
    let read = read(&mut conn).await?;
    let output = tokio::process::Command::new(pg_binary("pg_dump")?)
        .arg("--format=custom")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--no-owner")
        .arg("--file")
        .arg(dir.join(FILE))
        .arg(format!("--dbname={}", store.postgres))
        .output()
        .await?;
    sqlx::query("COMMIT").execute(&mut conn).await?;
    if !output.status.success() {
        bail!("pg_dump failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(read)
}

/// Drops the database (and the service's idle connections to it), creates
/// it empty and restores the dump into it in one transaction.
pub async fn restore(store: &Store, dir: &Path) -> anyhow::Result<()> {
    let (maintenance_url, database) = with_database(&store.postgres, "postgres")?;
    let mut conn = PgConnection::connect(&maintenance_url).await?;
    let quoted = format!("\"{}\"", database.replace('"', "\"\""));
    sqlx::query(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {quoted}"))
        .execute(&mut conn)
        .await?;
    let output = tokio::process::Command::new(pg_binary("pg_restore")?)
        .args(["--single-transaction", "--exit-on-error", "--no-owner"])
        .arg(format!("--dbname={}", store.postgres))
        .arg(dir.join(FILE))
        .output()
        .await?;
    if !output.status.success() {
        bail!("pg_restore failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maintenance_database_is_the_same_url_with_another_name() {
        let (url, db) = with_database(
            "postgres://postgres@127.0.0.1:5432/chirp_users?sslmode=disable",
            "postgres",
        )
        .unwrap();
        assert_eq!(url, "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable");
        assert_eq!(db, "chirp_users");
        assert!(with_database("postgres://postgres@127.0.0.1:5432/", "postgres").is_err());
    }
}
