//! user-service's side of backup and restore (see
//! `service_kit::maintenance`), on its PostgreSQL database.
//!
//! - **backup**: `pg_dump -Fc` from a snapshot this connection exports, the
//!   counts read in the same snapshot, so dump and manifest agree.
//! - **load**: a side database (`<db>__restore`) gets the schema from this
//!   build's own migrations, up to the backup's version. Only the rows of
//!   the tables (and the positions of the sequences) that schema has are
//!   taken from the dump (`pg_restore --data-only` with a list of exactly
//!   those entries): no function, index, trigger or other definition of
//!   the dump is ever created. The rows are loaded by a role made for this
//!   one load, which may only insert into those tables: not a superuser, no
//!   right to create anything, so a crafted dump cannot run programs
//!   (`COPY … TO PROGRAM`) or plant functions. The remaining migrations
//!   then run over the loaded rows.
//! - **switch**: the live database is renamed `<db>__kept` and the side one
//!   takes its name (the service's idle connections are closed first; a
//!   rename waits for no one). **undo** drops the restored database and
//!   renames the kept one back.
//!
//! The service's own role needs CREATEDB and CREATEROLE for restores.
//! Credentials reach `pg_dump` and `pg_restore` through their environment
//! (`PGPASSWORD`), never their command line, which every local user can
//! read.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    str::FromStr as _,
    time::Duration,
};

use anyhow::{bail, Context as _};
use service_kit::{
    files::{new_private_file, write_private},
    maintenance::{ContentDigest, Contents, Manifest, StoreMaintenance},
};
use sqlx::{
    migrate::Migrate as _,
    postgres::{PgConnectOptions, PgConnection},
    Connection as _, Row as _,
};

use super::MIGRATOR;

/// The one data file of a backup.
const FILE: &str = "users.dump";
const MIGRATIONS: &str = "_sqlx_migrations";

pub struct Maintenance {
    options: PgConnectOptions,
    /// The password of `DATABASE_URL`, for the PostgreSQL tools' environment.
    password: Option<String>,
    /// `PGSSLMODE` and the like, from the URL's TLS settings.
    tls: Vec<(&'static str, String)>,
    live: String,
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `name` of the newest PostgreSQL installed (`/usr/lib/postgresql/<major>/bin`),
/// or on the `PATH`: a `pg_dump` older than the server refuses to dump it.
fn pg_binary(name: &str) -> anyhow::Result<PathBuf> {
    let newest = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|dirs| {
        dirs.filter_map(Result::ok)
            .filter_map(|e| {
                Some((
                    e.file_name().to_str()?.parse::<u32>().ok()?,
                    e.path().join("bin").join(name),
                ))
            })
            .filter(|(_, path)| path.is_file())
            .max_by_key(|(major, _)| *major)
            .map(|(_, path)| path)
    });
    newest
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
        .with_context(|| format!("`{name}` not found: install PostgreSQL's client tools"))
}

impl Maintenance {
    /// Maintenance of the database `DATABASE_URL` names.
    ///
    /// # Errors
    /// When the URL cannot be parsed or names no database, or the side
    /// database's name would be too long for PostgreSQL.
    pub fn new(database_url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(database_url)?;
        let live = options
            .get_database()
            .context("DATABASE_URL names no database")?
            .to_owned();
        if live.len() + "__restore".len() > 63 {
            bail!("the database name `{live}` is too long to have a side database beside it");
        }
        let parsed = url::Url::parse(database_url).ok();
        let password = parsed.as_ref().and_then(|u| {
            u.password()
                .map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned())
        });
        // The TLS settings the URL asks for apply to the tools too.
        let tls = parsed
            .iter()
            .flat_map(|u| u.query_pairs().into_owned().collect::<Vec<_>>())
            .filter_map(|(key, value)| {
                let var = match key.as_str() {
                    "sslmode" => "PGSSLMODE",
                    "sslrootcert" => "PGSSLROOTCERT",
                    "sslcert" => "PGSSLCERT",
                    "sslkey" => "PGSSLKEY",
                    _ => return None,
                };
                Some((var, value))
            })
            .collect();
        Ok(Self {
            options,
            password,
            tls,
            live,
        })
    }

    fn side(&self) -> String {
        format!("{}__restore", self.live)
    }

    fn kept_name(&self) -> String {
        format!("{}__kept", self.live)
    }

    async fn connect(&self, database: &str) -> anyhow::Result<PgConnection> {
        PgConnection::connect_with(&self.options.clone().database(database))
            .await
            .with_context(|| format!("connecting to {database}"))
    }

    /// The server's own database, for creating, renaming and dropping
    /// others.
    async fn admin(&self) -> anyhow::Result<PgConnection> {
        self.connect("postgres").await
    }

    /// A PostgreSQL tool, told where to connect by its environment.
    fn tool(&self, name: &str, user: &str, password: Option<&str>) -> anyhow::Result<tokio::process::Command> {
        let mut command = tokio::process::Command::new(pg_binary(name)?);
        command
            .env_clear()
            .env("PGHOST", self.options.get_host())
            .env("PGPORT", self.options.get_port().to_string())
            .env("PGUSER", user)
            .env("PGCONNECT_TIMEOUT", "10")
            .envs(self.tls.iter().map(|(k, v)| (*k, v.as_str())))
            .kill_on_drop(true);
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        Ok(command)
    }

    async fn exists(&self, admin: &mut PgConnection, database: &str) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(database)
            .fetch_one(&mut *admin)
            .await?;
        Ok(n > 0)
    }

    /// Renames `from` to `to` once nobody is connected to `from`: the
    /// service's idle pool connections are closed (in maintenance it opens
    /// no new ones), and a connection that slips in is closed again.
    async fn rename(&self, admin: &mut PgConnection, from: &str, to: &str) -> anyhow::Result<()> {
        let mut attempts = 0;
        loop {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(from)
            .execute(&mut *admin)
            .await?;
            let renamed = sqlx::query(&format!("ALTER DATABASE {} RENAME TO {}", quoted(from), quoted(to)))
                .execute(&mut *admin)
                .await;
            match renamed {
                Ok(_) => return Ok(()),
                // 55006: object_in_use, a connection came back in between.
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55006") && attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => return Err(anyhow::Error::new(err).context(format!("renaming {from} to {to}"))),
            }
        }
    }

    /// Loads the dump's rows into `side` as a role that may do nothing else.
    async fn load_rows(&self, side: &mut PgConnection, side_name: &str, dump: &Path) -> anyhow::Result<()> {
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> $1")
                .bind(MIGRATIONS)
                .fetch_all(&mut *side)
                .await?;
        let sequences: Vec<String> =
            sqlx::query_scalar("SELECT sequencename::text FROM pg_sequences WHERE schemaname = 'public'")
                .fetch_all(&mut *side)
                .await?;
        let listing = self
            .tool("pg_restore", "", None)?
            .arg("--list")
            .arg(dump)
            .output()
            .await?;
        if !listing.status.success() {
            bail!(
                "pg_restore cannot read the dump: {}",
                String::from_utf8_lossy(&listing.stderr).trim()
            );
        }
        let mut wanted = String::new();
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some((kind, schema, name)) = (match words.as_slice() {
                [_, _, _, "TABLE", "DATA", schema, name, ..] => Some(("table", *schema, *name)),
                [_, _, _, "SEQUENCE", "SET", schema, name, ..] => Some(("sequence", *schema, *name)),
                _ => None,
            }) else {
                continue;
            };
            if schema != "public" {
                bail!("the dump holds {kind} {schema}.{name}, outside the service's schema");
            }
            let known = match kind {
                "table" => name == MIGRATIONS || tables.iter().any(|t| t == name),
                _ => sequences.iter().any(|s| s == name),
            };
            if !known {
                bail!("the dump holds {kind} `{name}`, which the service's schema does not have");
            }
            if name != MIGRATIONS {
                wanted.push_str(line);
                wanted.push('\n');
            }
        }
        let scratch = tempfile::tempdir()?;
        let list = scratch.path().join("entries.list");
        write_private(&list, wanted.as_bytes())?;

        let role = format!("chirp_restore_{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        let mut admin = self.admin().await?;
        sqlx::query(&format!(
            "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS \
             CONNECTION LIMIT 1 PASSWORD '{password}'",
            quoted(&role)
        ))
        .execute(&mut admin)
        .await
        .context("creating the loading role (the service's role needs CREATEROLE)")?;
        let loaded = async {
            let role = quoted(&role);
            let db = quoted(side_name);
            // Insert into the service's tables, set its sequences, nothing
            // else: not the migrations' table (a crafted dump could claim
            // migrations that never ran), no schema, no temporary objects.
            let mut grants = vec![
                format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"),
                format!("GRANT CONNECT ON DATABASE {db} TO {role}"),
                "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
                format!("GRANT USAGE ON SCHEMA public TO {role}"),
            ];
            grants.extend(
                tables
                    .iter()
                    .map(|t| format!("GRANT INSERT ON public.{} TO {role}", quoted(t))),
            );
            grants.extend(
                sequences
                    .iter()
                    .map(|q| format!("GRANT USAGE, UPDATE ON SEQUENCE public.{} TO {role}", quoted(q))),
            );
            for grant in grants {
                sqlx::query(&grant)
                    .execute(&mut *side)
                    .await
                    .with_context(|| grant.clone())?;
            }
            let output = self
                .tool("pg_restore", role.trim_matches('"'), Some(&password))?
                .args([
                    "--data-only",
                    "--single-transaction",
                    "--exit-on-error",
                    "--no-owner",
                    "--no-privileges",
                ])
                .arg("--use-list")
                .arg(&list)
                .arg("--dbname")
                .arg(side_name)
                .arg(dump)
                .output()
                .await?;
            if !output.status.success() {
                bail!("pg_restore failed: {}", String::from_utf8_lossy(&output.stderr).trim());
            }
            anyhow::Ok(())
        }
        .await;
        let dropped = async {
            sqlx::query(&format!("DROP OWNED BY {}", quoted(&role)))
                .execute(&mut *side)
                .await?;
            sqlx::query(&format!("DROP ROLE {}", quoted(&role)))
                .execute(&mut admin)
                .await?;
            // The database becomes the live one: PUBLIC gets back what
            // PostgreSQL gives it on any database (roles of one's own, a
            // reporting role, still connect).
            sqlx::query(&format!(
                "GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC",
                quoted(side_name)
            ))
            .execute(&mut admin)
            .await?;
            anyhow::Ok(())
        }
        .await;
        loaded?;
        dropped.context("dropping the loading role")
    }
}

/// Drops `database` if it exists, closing whatever is connected to it.
async fn drop_database(admin: &mut PgConnection, database: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quoted(database)))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

/// The last migration applied and the rows of every table.
async fn read(conn: &mut PgConnection) -> anyhow::Result<Contents> {
    let schema_version: i64 = sqlx::query_scalar(&format!(
        "SELECT COALESCE(MAX(version), 0) FROM {MIGRATIONS} WHERE success"
    ))
    .fetch_one(&mut *conn)
    .await
    .context("reading the migrations applied")?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> $1 ORDER BY 1",
    )
    .bind(MIGRATIONS)
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = BTreeMap::new();
    for table in tables {
        let n: i64 = sqlx::query(&format!("SELECT count(*) FROM {}", quoted(&table)))
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

/// Every row of every table, in a fixed order, as one digest.
async fn digest(conn: &mut PgConnection, tables: impl Iterator<Item = &String>) -> anyhow::Result<String> {
    let mut digest = ContentDigest::default();
    for table in tables {
        let rows: String = sqlx::query_scalar(&format!(
            "SELECT md5(COALESCE(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {} t",
            quoted(table)
        ))
        .fetch_one(&mut *conn)
        .await?;
        digest.add(table.as_bytes());
        digest.add(rows.as_bytes());
    }
    Ok(digest.finish())
}

/// This build's migrations up to `version` that `conn` has not applied
/// yet: up to the backup's version before its rows are loaded, all of them
/// after.
async fn migrate_up(conn: &mut PgConnection, version: i64) -> anyhow::Result<()> {
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

impl StoreMaintenance for Maintenance {
    fn store(&self) -> &'static str {
        "postgresql"
    }

    fn knows_file(name: &str) -> bool {
        name == FILE
    }

    async fn inspect(&self) -> anyhow::Result<Contents> {
        let mut conn = self.connect(&self.live).await?;
        let mut contents = read(&mut conn).await?;
        contents.digest = Some(digest(&mut conn, contents.counts.keys()).await?);
        Ok(contents)
    }

    async fn backup(&self, dir: &Path) -> anyhow::Result<Contents> {
        let mut conn = self.connect(&self.live).await?;
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut conn)
            .await?;
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut conn)
            .await?;
        let contents = read(&mut conn).await?;
        let file = dir.join(FILE);
        // pg_dump truncates the file it is given and keeps its mode.
        drop(new_private_file(&file)?);
        let user = self.options.get_username().to_owned();
        let output = self
            .tool("pg_dump", &user, self.password.as_deref())?
            .args(["--format=custom", "--no-owner", "--no-privileges"])
            .arg(format!("--snapshot={snapshot}"))
            .arg("--file")
            .arg(&file)
            .arg("--dbname")
            .arg(&self.live)
            .output()
            .await?;
        sqlx::query("COMMIT").execute(&mut conn).await?;
        if !output.status.success() {
            bail!("pg_dump failed: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(contents)
    }

    async fn load(&self, dir: &Path, manifest: &Manifest) -> anyhow::Result<Contents> {
        let side = self.side();
        let mut admin = self.admin().await?;
        drop_database(&mut admin, &side).await?;
        sqlx::query(&format!("CREATE DATABASE {}", quoted(&side)))
            .execute(&mut admin)
            .await
            .context("creating the side database (the service's role needs CREATEDB)")?;
        let mut conn = self.connect(&side).await?;
        if !MIGRATOR.version_exists(manifest.schema_version) {
            bail!(
                "schema version {} is none of this build's migrations",
                manifest.schema_version
            );
        }
        migrate_up(&mut conn, manifest.schema_version).await?;
        self.load_rows(&mut conn, &side, &dir.join(FILE)).await?;
        // The migrations recorded are exactly this build's, up to the
        // backup's version: what the loading role could not touch.
        let applied: Vec<(i64, Vec<u8>)> = conn
            .list_applied_migrations()
            .await?
            .into_iter()
            .map(|m| (m.version, m.checksum.into_owned()))
            .collect();
        let expected: Vec<(i64, Vec<u8>)> = MIGRATOR
            .iter()
            .filter(|m| m.version <= manifest.schema_version && m.migration_type.is_up_migration())
            .map(|m| (m.version, m.checksum.to_vec()))
            .collect();
        if applied != expected {
            bail!(
                "the side database's migrations are not this build's up to version {}",
                manifest.schema_version
            );
        }
        let loaded = read(&mut conn).await?;
        migrate_up(&mut conn, i64::MAX)
            .await
            .context("migrating the loaded data")?;
        conn.close().await?;
        Ok(loaded)
    }

    async fn discard(&self) -> anyhow::Result<()> {
        drop_database(&mut self.admin().await?, &self.side()).await
    }

    async fn kept(&self) -> anyhow::Result<bool> {
        self.exists(&mut self.admin().await?, &self.kept_name()).await
    }

    async fn switch(&self) -> anyhow::Result<()> {
        let mut admin = self.admin().await?;
        if !self.exists(&mut admin, &self.side()).await? {
            bail!("no loaded backup in {}", self.side());
        }
        self.rename(&mut admin, &self.live, &self.kept_name()).await?;
        self.rename(&mut admin, &self.side(), &self.live).await
    }

    async fn undo(&self) -> anyhow::Result<()> {
        let mut admin = self.admin().await?;
        drop_database(&mut admin, &self.live).await?;
        self.rename(&mut admin, &self.kept_name(), &self.live).await
    }

    async fn confirm(&self) -> anyhow::Result<()> {
        drop_database(&mut self.admin().await?, &self.kept_name()).await
    }
}
