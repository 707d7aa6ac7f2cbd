//! analytics-service's side of backup and restore (see
//! `service_kit::maintenance`), on its SQLite file.
//!
//! - **backup**: `VACUUM INTO` a new 0600 file: one transaction's view,
//!   while the service keeps writing.
//! - **load**: a side file beside the live one (`<file>.restore`) gets the
//!   schema from this build's own migrations, up to the backup's version;
//!   then the rows of each table the service knows are copied from the
//!   backup, naming only the columns this schema has. Nothing from the
//!   backup's `sqlite_master` is ever executed (a trigger or view in it is
//!   never created, a table the service does not know is refused), and
//!   `trusted_schema` is off, so no function of the backup's schema runs.
//!   The remaining migrations then run over the loaded rows.
//! - **switch**: the live file is copied aside (`<file>.kept`, `VACUUM
//!   INTO`), then in one transaction every table is emptied and filled from
//!   the side file. The service's open connections see the new rows, as a
//!   file swapped under them would not allow.
//! - **undo** is the same transaction from the kept file.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    str::FromStr as _,
    time::Duration,
};

use anyhow::{bail, Context as _};
use futures::TryStreamExt as _;
use service_kit::{
    files::new_private_file,
    maintenance::{ContentDigest, Contents, Manifest, StoreMaintenance},
};
use sqlx::{
    migrate::Migrate as _,
    sqlite::{SqliteConnectOptions, SqliteConnection},
    Connection as _, Row as _,
};

use super::MIGRATOR;

/// The one data file of a backup.
const FILE: &str = "analytics.db";
const MIGRATIONS: &str = "_sqlx_migrations";

pub struct Maintenance {
    live: PathBuf,
}

impl Maintenance {
    /// Maintenance of the SQLite file `DATABASE_URL` names.
    ///
    /// # Errors
    /// When the URL is not a SQLite URL.
    pub fn new(database_url: &str) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(database_url)?;
        Ok(Self {
            live: options.get_filename().to_path_buf(),
        })
    }

    fn beside(&self, suffix: &str) -> PathBuf {
        let mut name = self.live.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    fn side(&self) -> PathBuf {
        self.beside(".restore")
    }

    fn kept(&self) -> PathBuf {
        self.beside(".kept")
    }
}

async fn open(path: &Path, read_only: bool) -> anyhow::Result<SqliteConnection> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(read_only)
        .busy_timeout(Duration::from_secs(10));
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    // Functions named in an attached schema's views and triggers do not run.
    sqlx::query("PRAGMA trusted_schema = OFF").execute(&mut conn).await?;
    Ok(conn)
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The data tables of `schema` (SQLite's own and the migrations' aside).
async fn tables(conn: &mut SqliteConnection, schema: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT name FROM {schema}.sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '{MIGRATIONS}' ORDER BY name"
    ))
    .fetch_all(&mut *conn)
    .await?)
}

async fn columns(conn: &mut SqliteConnection, schema: &str, table: &str) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT name FROM pragma_table_info(?, ?) ORDER BY cid")
            .bind(table)
            .bind(schema)
            .fetch_all(&mut *conn)
            .await?,
    )
}

async fn has_table(conn: &mut SqliteConnection, schema: &str, table: &str) -> anyhow::Result<bool> {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?"
    ))
    .bind(table)
    .fetch_one(&mut *conn)
    .await?;
    Ok(n > 0)
}

/// The last migration applied and the rows of every table of `schema`.
async fn read(conn: &mut SqliteConnection, schema: &str) -> anyhow::Result<Contents> {
    let schema_version: i64 = sqlx::query_scalar(&format!(
        "SELECT COALESCE(MAX(version), 0) FROM {schema}.{MIGRATIONS} WHERE success"
    ))
    .fetch_one(&mut *conn)
    .await
    .context("reading the migrations applied")?;
    let mut counts = BTreeMap::new();
    for table in tables(conn, schema).await? {
        let n: i64 = sqlx::query(&format!("SELECT count(*) FROM {schema}.{}", quoted(&table)))
            .fetch_one(&mut *conn)
            .await?
            .get(0);
        counts.insert(table, u64::try_from(n).unwrap_or_default());
    }
    Ok(Contents {
        schema_version,
        counts,
        digest: None,
    })
}

/// Every row of every table of `main`, in a fixed order, as one digest.
async fn digest(conn: &mut SqliteConnection) -> anyhow::Result<String> {
    let mut digest = ContentDigest::default();
    for table in tables(conn, "main").await? {
        let row = columns(conn, "main", &table)
            .await?
            .iter()
            .map(|c| format!("quote({})", quoted(c)))
            .collect::<Vec<_>>()
            .join(" || ',' || ");
        digest.add(table.as_bytes());
        let sql = format!("SELECT {row} AS r FROM main.{} ORDER BY r", quoted(&table));
        let mut rows = sqlx::query_scalar::<_, String>(&sql).fetch(&mut *conn);
        while let Some(row) = rows.try_next().await? {
            digest.add(row.as_bytes());
        }
    }
    Ok(digest.finish())
}

/// This build's migrations up to `version` that `conn` has not applied
/// yet: up to the backup's version before its rows are loaded, all of them
/// after.
async fn migrate_up(conn: &mut SqliteConnection, version: i64) -> anyhow::Result<()> {
    conn.ensure_migrations_table().await?;
    let applied: Vec<i64> = conn
        .list_applied_migrations()
        .await?
        .iter()
        .map(|m| m.version)
        .collect();
    for migration in MIGRATOR
        .iter()
        .filter(|m| m.version <= version && m.migration_type.is_up_migration() && !applied.contains(&m.version))
    {
        conn.apply(migration).await?;
    }
    Ok(())
}

/// In one transaction: every table of `main` (the migrations' included)
/// emptied and filled from the same table of `from`, column by column as
/// `main` names them.
async fn replace_all(conn: &mut SqliteConnection, from: &str) -> anyhow::Result<()> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let copied = async {
        sqlx::query("PRAGMA defer_foreign_keys = ON")
            .execute(&mut *conn)
            .await?;
        let mut all = tables(conn, "main").await?;
        all.push(MIGRATIONS.to_owned());
        for table in all {
            let cols = columns(conn, "main", &table)
                .await?
                .iter()
                .map(|c| quoted(c))
                .collect::<Vec<_>>()
                .join(", ");
            let t = quoted(&table);
            sqlx::query(&format!("DELETE FROM main.{t}"))
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!("INSERT INTO main.{t} ({cols}) SELECT {cols} FROM {from}.{t}"))
                .execute(&mut *conn)
                .await?;
        }
        if has_table(conn, "main", "sqlite_sequence").await? && has_table(conn, from, "sqlite_sequence").await? {
            sqlx::query("DELETE FROM main.sqlite_sequence")
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!(
                "INSERT INTO main.sqlite_sequence (name, seq) SELECT name, seq FROM {from}.sqlite_sequence"
            ))
            .execute(&mut *conn)
            .await?;
        }
        anyhow::Ok(())
    }
    .await;
    match copied {
        Ok(()) => {
            sqlx::query("COMMIT").execute(&mut *conn).await?;
            Ok(())
        }
        Err(err) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            Err(err)
        }
    }
}

async fn attach(conn: &mut SqliteConnection, path: &Path, name: &str, read_only: bool) -> anyhow::Result<()> {
    // A URI, so the attached file can be opened read-only.
    let mut uri = String::from("file:");
    for byte in path.display().to_string().bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    if read_only {
        uri.push_str("?mode=ro");
    }
    sqlx::query(&format!("ATTACH DATABASE ? AS {name}"))
        .bind(uri)
        .execute(&mut *conn)
        .await
        .with_context(|| format!("attaching {}", path.display()))?;
    Ok(())
}

fn remove(path: &Path) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// `VACUUM INTO` a new 0600 file at `to` (SQLite accepts an empty file
/// there, and keeps its mode).
async fn copy_into(conn: &mut SqliteConnection, to: &Path) -> anyhow::Result<()> {
    new_private_file(to).with_context(|| format!("creating {}", to.display()))?;
    sqlx::query("VACUUM main INTO ?")
        .bind(to.display().to_string())
        .execute(&mut *conn)
        .await
        .context("VACUUM INTO")?;
    Ok(())
}

impl StoreMaintenance for Maintenance {
    fn store(&self) -> &'static str {
        "sqlite"
    }

    fn knows_file(name: &str) -> bool {
        name == FILE
    }

    async fn inspect(&self) -> anyhow::Result<Contents> {
        let mut conn = open(&self.live, true).await?;
        let mut contents = read(&mut conn, "main").await?;
        contents.digest = Some(digest(&mut conn).await?);
        Ok(contents)
    }

    async fn backup(&self, dir: &Path) -> anyhow::Result<Contents> {
        let target = dir.join(FILE);
        copy_into(&mut open(&self.live, true).await?, &target).await?;
        read(&mut open(&target, true).await?, "main").await
    }

    async fn load(&self, dir: &Path, manifest: &Manifest) -> anyhow::Result<Contents> {
        let side = self.side();
        remove(&side)?;
        new_private_file(&side)?;
        let mut conn = open(&side, false).await?;
        if !MIGRATOR.version_exists(manifest.schema_version) {
            bail!(
                "schema version {} is none of this build's migrations",
                manifest.schema_version
            );
        }
        migrate_up(&mut conn, manifest.schema_version).await?;
        attach(&mut conn, &dir.join(FILE), "backup", true).await?;
        let own = tables(&mut conn, "main").await?;
        if let Some(unknown) = tables(&mut conn, "backup")
            .await?
            .into_iter()
            .find(|t| !own.contains(t))
        {
            bail!(
                "the backup holds a table `{unknown}` that schema version {} does not have",
                manifest.schema_version
            );
        }
        sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await?;
        for table in &own {
            let cols = columns(&mut conn, "main", table).await?;
            if !has_table(&mut conn, "backup", table).await? || columns(&mut conn, "backup", table).await? != cols {
                bail!(
                    "the backup's `{table}` is not the table schema version {} has",
                    manifest.schema_version
                );
            }
            let cols = cols.iter().map(|c| quoted(c)).collect::<Vec<_>>().join(", ");
            let t = quoted(table);
            sqlx::query(&format!("INSERT INTO main.{t} ({cols}) SELECT {cols} FROM backup.{t}"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("loading {table}"))?;
        }
        sqlx::query("COMMIT").execute(&mut conn).await?;
        sqlx::query("DETACH DATABASE backup").execute(&mut conn).await?;
        let loaded = read(&mut conn, "main").await?;
        migrate_up(&mut conn, i64::MAX)
            .await
            .context("migrating the loaded data")?;
        conn.close().await?;
        Ok(loaded)
    }

    async fn discard(&self) -> anyhow::Result<()> {
        remove(&self.side())
    }

    async fn kept(&self) -> anyhow::Result<bool> {
        Ok(self.kept().exists())
    }

    async fn switch(&self) -> anyhow::Result<()> {
        let side = self.side();
        if !side.exists() {
            bail!("no loaded backup at {}", side.display());
        }
        let mut conn = open(&self.live, false).await?;
        copy_into(&mut conn, &self.kept()).await?;
        attach(&mut conn, &side, "side", true).await?;
        replace_all(&mut conn, "side").await?;
        sqlx::query("DETACH DATABASE side").execute(&mut conn).await?;
        conn.close().await?;
        remove(&side)
    }

    async fn undo(&self) -> anyhow::Result<()> {
        let mut conn = open(&self.live, false).await?;
        attach(&mut conn, &self.kept(), "kept", true).await?;
        replace_all(&mut conn, "kept").await?;
        sqlx::query("DETACH DATABASE kept").execute(&mut conn).await?;
        conn.close().await?;
        remove(&self.kept())
    }

    async fn confirm(&self) -> anyhow::Result<()> {
        remove(&self.kept())
    }
}
