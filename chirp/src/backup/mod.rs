//! `chirp backup` and `chirp restore`: each service's store, backed up and
//! replaced on its own while the rest of the mesh keeps serving.
//!
//! A backup is a directory `<service>-<UTC time>` holding the store's data
//! in the store's own consistent form and `manifest.json`: the service, the
//! store, the schema version of the data, the counts of what it holds and a
//! SHA-256 of every file.
//!
//! | service | store | how | files |
//! |---|---|---|---|
//! | user-service | PostgreSQL | `pg_dump -Fc` from an exported snapshot, the counts read in the same snapshot | `users.dump` |
//! | message-service | MongoDB | every collection read in one snapshot transaction, streamed to BSON (documents back to back, as `mongodump` writes them), with each collection's options (validator) and indexes | `<collection>.bson`, `collections.json` |
//! | comment-service | Redis | the service's keys (its prefix only: one Redis may hold other tenants) dumped in one atomic script, `DUMP` payloads with their TTLs | `keys.jsonl` |
//! | analytics-service | SQLite | `VACUUM INTO`, a transactionally consistent copy | `analytics.db` |
//!
//! A restore checks every file against the manifest and the schema version
//! against the live store (a backup newer than the service's data is refused)
//! before it touches anything; then puts the service in maintenance (its
//! store counts as down: NOT_SERVING, its RPCs fail fast, its relays wait,
//! and its peers degrade as they do when that store is stopped), replaces
//! the store's contents, and ends maintenance, after which the service
//! prepares its store again (migrations run over the restored data) and
//! serves. The outbox is part of the store: events that were waiting at the
//! backup moment are sent again (consumers deduplicate by event id), and
//! events written after it are gone with the writes that made them.

mod mongo;
mod postgres;
mod redis_keys;
mod sqlite;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{
    control,
    layout::{Part, Ports},
    status,
};

/// The version of the backup layout this build writes and reads.
const FORMAT: u32 = 1;

/// What a backup says of itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub service: String,
    pub store: String,
    pub format: u32,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    /// The data model's version: the last migration applied (PostgreSQL,
    /// SQLite) or the `schema_version` the service wrote (MongoDB, Redis).
    pub schema_version: i64,
    /// Rows, documents or keys, by table, collection or key kind.
    pub counts: BTreeMap<String, u64>,
    /// SHA-256 (hex) of every data file, by name.
    pub files: BTreeMap<String, String>,
}

/// Where a service's store is, as the running `chirp up` has it.
pub struct Store {
    pub ports: Ports,
    pub postgres: String,
    pub mongodb: String,
    pub mongodb_database: String,
    pub redis: String,
    pub redis_prefix: String,
    pub sqlite: PathBuf,
}

impl Store {
    /// The stores of the `chirp up` running with `data_dir` (external ones
    /// where `DATABASE_URL`, `MONGODB_URI`, `REDIS_URL` say, as for `chirp
    /// up`).
    async fn of_running(data_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self::at(control::ports(data_dir).await?, data_dir))
    }

    /// The stores a backup reads: the running mesh's, or, with no mesh
    /// running, the ones the URLs name (`DATABASE_URL`, `MONGODB_URI`,
    /// `REDIS_URL`, `ANALYTICS_DATABASE_PATH`), as for a store run
    /// elsewhere. A restore always needs the mesh: it switches the
    /// service's maintenance.
    async fn to_back_up(data_dir: &Path) -> anyhow::Result<Self> {
        match Self::of_running(data_dir).await {
            Ok(store) => Ok(store),
            Err(err) => {
                let given = ["DATABASE_URL", "MONGODB_URI", "REDIS_URL", "ANALYTICS_DATABASE_PATH"]
                    .iter()
                    .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()));
                if !given {
                    return Err(err.context("no running mesh, and no store URL given"));
                }
                Ok(Self::at(
                    Ports {
                        base: crate::layout::DEFAULT_PORT_BASE,
                    },
                    data_dir,
                ))
            }
        }
    }

    fn at(ports: Ports, data_dir: &Path) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            ports,
            postgres: var("DATABASE_URL")
                .unwrap_or_else(|| format!("postgres://postgres@127.0.0.1:{}/chirp_users", ports.of(Part::Postgres))),
            mongodb: var("MONGODB_URI")
                .unwrap_or_else(|| format!("mongodb://127.0.0.1:{}/?directConnection=true", ports.of(Part::Mongodb))),
            mongodb_database: var("MONGODB_DATABASE").unwrap_or_else(|| "chirp_messages".to_owned()),
            redis: var("REDIS_URL").unwrap_or_else(|| format!("redis://127.0.0.1:{}", ports.of(Part::Redis))),
            redis_prefix: var("REDIS_KEY_PREFIX").unwrap_or_else(|| "chirp:comments:".to_owned()),
            sqlite: var("ANALYTICS_DATABASE_PATH").map_or_else(|| data_dir.join("analytics.db"), PathBuf::from),
        }
    }

    /// The live store's schema version and counts.
    async fn inspect(&self, service: Part) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
        match service {
            Part::UserService => postgres::inspect(self).await,
            Part::MessageService => mongo::inspect(self).await,
            Part::CommentService => redis_keys::inspect(self).await,
            _ => sqlite::inspect(&self.sqlite).await,
        }
    }
}

fn store_name(service: Part) -> &'static str {
    match service {
        Part::UserService => "postgresql",
        Part::MessageService => "mongodb",
        Part::CommentService => "redis",
        _ => "sqlite",
    }
}

/// `user-service` … or `all`.
fn services(which: &str) -> anyhow::Result<Vec<Part>> {
    if which == "all" {
        return Ok(Part::SERVICES.to_vec());
    }
    Part::parse(which)
        .filter(|p| p.is_service())
        .map(|p| vec![p])
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`{which}`: a service (user-service, message-service, comment-service, analytics-service) or all"
            )
        })
}

/// `chirp backup <service|all> [--to DIR]`.
///
/// # Errors
/// When no mesh runs, or a store cannot be read or the files written.
pub async fn backup(data_dir: &Path, which: &str, to: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let store = Store::to_back_up(data_dir).await?;
    let to = to.map_or_else(|| data_dir.join("backups"), Path::to_path_buf);
    let mut taken = Vec::new();
    for service in services(which)? {
        let start = Instant::now();
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let dir = to.join(format!("{}-{stamp}", service.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (schema_version, counts) = match service {
            Part::UserService => postgres::backup(&store, &dir).await,
            Part::MessageService => mongo::backup(&store, &dir).await,
            Part::CommentService => redis_keys::backup(&store, &dir).await,
            _ => sqlite::backup(&store.sqlite, &dir).await,
        }
        .with_context(|| format!("backing up {}", service.name()))?;
        let manifest = Manifest {
            service: service.name().to_owned(),
            store: store_name(service).to_owned(),
            format: FORMAT,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            schema_version,
            counts,
            files: checksums(&dir)?,
        };
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&manifest)?)?;
        let bytes = dir_size(&dir)?;
        let took = start.elapsed();
        if !json {
            println!(
                "{} backed up to {} in {:.2} s ({} bytes): {}",
                service.name(),
                dir.display(),
                took.as_secs_f64(),
                bytes,
                counts_text(&manifest.counts)
            );
        }
        taken.push(serde_json::json!({
            "service": service.name(), "dir": dir, "seconds": took.as_secs_f64(),
            "bytes": bytes, "manifest": manifest,
        }));
    }
    if json {
        println!("{}", serde_json::Value::Array(taken));
    }
    Ok(())
}

/// `chirp restore <service> <backup>`.
///
/// # Errors
/// When the backup is not this service's, is damaged or newer than the
/// live data (nothing is changed then), or the replacement fails (the
/// service is then left in maintenance, and the error says so).
pub async fn restore(data_dir: &Path, which: &str, from: &Path, json: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    let [service] = services(which)?[..] else {
        bail!("restore one service at a time");
    };
    let manifest = verified(from, service)?;
    let store = Store::of_running(data_dir).await?;
    let (live_version, before) = store.inspect(service).await.context("reading the live store")?;
    if manifest.schema_version > live_version {
        bail!(
            "the backup holds schema version {} and {} runs {live_version}: restore it with a build that knows it; nothing was changed",
            manifest.schema_version,
            service.name()
        );
    }
    maintenance(data_dir, store.ports, service, true).await?;
    wait_health(store.ports, service, false).await?;
    let replaced = match service {
        Part::UserService => postgres::restore(&store, from).await,
        Part::MessageService => mongo::restore(&store, from).await,
        Part::CommentService => redis_keys::restore(&store, from).await,
        _ => sqlite::restore(&store.sqlite, from).await,
    };
    if let Err(err) = replaced {
        return Err(err.context(format!(
            "restoring {service}: it stays in maintenance (NOT_SERVING); fix the cause and run the restore again, \
             or `chirp maintenance {service} off` to serve what the store holds now",
            service = service.name()
        )));
    }
    maintenance(data_dir, store.ports, service, false).await?;
    wait_health(store.ports, service, true).await?;
    let (_, after) = store.inspect(service).await?;
    let took = start.elapsed();
    if json {
        println!(
            "{}",
            serde_json::json!({"service": service.name(), "seconds": took.as_secs_f64(),
                               "before": before, "after": after, "backup": manifest.counts})
        );
    } else {
        println!(
            "{} restored from {} in {:.2} s\n  before:    {}\n  backup:    {}\n  after:     {}",
            service.name(),
            from.display(),
            took.as_secs_f64(),
            counts_text(&before),
            counts_text(&manifest.counts),
            counts_text(&after)
        );
        println!(
            "  events: what waited in the outbox at {} is sent again (consumers deduplicate by event id); \
             events written since then are gone with the writes that made them, and what other services \
             applied from them stays applied",
            manifest.created_at
        );
    }
    Ok(())
}

/// `chirp maintenance <service> on|off`: by hand, for a restore that
/// stopped halfway or for work of one's own on a store.
///
/// # Errors
/// When the service cannot be asked.
pub async fn switch(data_dir: &Path, which: &str, on: bool) -> anyhow::Result<()> {
    let [service] = services(which)?[..] else {
        bail!("one service at a time");
    };
    maintenance(data_dir, control::ports(data_dir).await?, service, on).await?;
    println!("{} maintenance {}", service.name(), if on { "on" } else { "off" });
    Ok(())
}

/// The manifest of the backup in `dir`, once every file matches it.
fn verified(dir: &Path, service: Part) -> anyhow::Result<Manifest> {
    let text = std::fs::read(dir.join("manifest.json"))
        .with_context(|| format!("{} has no manifest.json: not a chirp backup", dir.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text).context("manifest.json is damaged")?;
    if manifest.service != service.name() {
        bail!(
            "{} is a backup of {}, not {}",
            dir.display(),
            manifest.service,
            service.name()
        );
    }
    if manifest.format != FORMAT {
        bail!(
            "backup format {} is not {FORMAT}, the one this build reads",
            manifest.format
        );
    }
    let actual = checksums(dir)?;
    for (name, sum) in &manifest.files {
        match actual.get(name) {
            Some(found) if found == sum => {}
            Some(_) => bail!("{name} does not match its checksum: the backup is damaged; nothing was changed"),
            None => bail!("{name} is missing from the backup; nothing was changed"),
        }
    }
    if manifest.files.is_empty() {
        bail!("the manifest lists no files; nothing was changed");
    }
    Ok(manifest)
}

/// SHA-256 of every file in `dir` but the manifest, streamed.
fn checksums(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut sums = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "manifest.json" || !entry.file_type()?.is_file() {
            continue;
        }
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut std::fs::File::open(entry.path())?, &mut hasher)?;
        sums.insert(name, format!("{:x}", hasher.finalize()));
    }
    Ok(sums)
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}

fn counts_text(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn maintenance(data_dir: &Path, ports: Ports, service: Part, on: bool) -> anyhow::Result<()> {
    let path = if on { "/maintenance/on" } else { "/maintenance/off" };
    status::operator_call(data_dir, ports, service, "POST", path).await?;
    Ok(())
}

/// Waits (up to a minute) for the service's API to say `serving`.
async fn wait_health(ports: Ports, service: Part, serving: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while status::health(ports, service).await != Some(serving) {
        if Instant::now() > deadline {
            bail!(
                "{} is not {} after a minute",
                service.name(),
                if serving { "SERVING" } else { "NOT_SERVING" }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
