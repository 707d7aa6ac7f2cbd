//! Backup and restore, done by the service that owns the store
//! (ARCHITECTURE.md invariant 8): only the owner opens its database, for
//! maintenance as for requests. Tools such as `chirp` ask for these
//! operations through the operator routes of the metrics port and move the
//! files; they never connect to the store.
//!
//! A restore goes in steps, each one refusable without harm:
//!
//! 1. **load** (while the service serves): the backup in the service's
//!    `BACKUP_DIR` is checked against its manifest (this service's, this
//!    format, only the service's own data files, every checksum), then
//!    loaded into a side location of the store (a database, key prefix or
//!    file beside the live one) that the service's own migrations or
//!    `prepare` created, and counted there against the manifest. A backup
//!    that cannot load fails here, and the live data has not been touched.
//! 2. **switch** (only in maintenance, on every replica): the loaded data
//!    becomes the live data in one step of the store (renames, or one
//!    transaction), and the replaced data is kept beside it.
//! 3. **confirm** drops what was kept; **undo** (in maintenance) puts it
//!    back in place of the restored data.
//!
//! Each store says how it does these steps ([`StoreMaintenance`]); the
//! order, the checks and the one-operation-at-a-time rule are here, once.

pub mod command;
mod manifest;
mod routes;

use std::{future::Future, path::PathBuf, sync::Arc};

use manifest::{checksums, verified, FORMAT, MANIFEST};
pub use manifest::{plain_name, ContentDigest, Contents, Manifest};
pub use routes::routes;
use tracing::{info, warn};

use crate::{
    files::{new_private_dir, private_dirs, write_private},
    store::StoreStatus,
};

/// How one store backs up, loads beside the live data, switches, and
/// undoes. Implemented in each service's `store::maintenance`, the only
/// code that knows the store's layout.
pub trait StoreMaintenance: Send + Sync + 'static {
    /// `postgresql`, `mongodb`, `redis` or `sqlite`.
    fn store(&self) -> &'static str;
    /// Whether `name` is one of the data files this store's backups hold.
    fn knows_file(name: &str) -> bool;
    /// The live data's schema version and counts.
    fn inspect(&self) -> impl Future<Output = anyhow::Result<Contents>> + Send;
    /// Writes the data files of one consistent moment into `dir` (a new
    /// private directory) and says what they hold.
    fn backup(&self, dir: &std::path::Path) -> impl Future<Output = anyhow::Result<Contents>> + Send;
    /// Loads a verified backup into the side location (emptied first) and
    /// says what it holds there, as the manifest counts it. Never touches
    /// the live data.
    fn load(&self, dir: &std::path::Path, manifest: &Manifest)
        -> impl Future<Output = anyhow::Result<Contents>> + Send;
    /// Drops the side location.
    fn discard(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Whether the data a switch replaced is kept, waiting for confirm or
    /// undo.
    fn kept(&self) -> impl Future<Output = anyhow::Result<bool>> + Send;
    /// The loaded data becomes live; the live data is kept.
    fn switch(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// The kept data becomes live again; the restored data is dropped.
    fn undo(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// The kept data is dropped.
    fn confirm(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The request cannot be met as things are (a damaged backup, no
    /// maintenance, another operation running); nothing was changed.
    #[error("{0:#}")]
    Refused(anyhow::Error),
    /// The store failed midway.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

type Outcome<T> = Result<T, Refusal>;

/// A backup loaded beside the live data, waiting for the switch.
struct Loaded {
    manifest: Manifest,
    before: Contents,
}

/// The owner's maintenance operations on its store, one at a time.
pub struct Maintainer<S> {
    service: &'static str,
    store: S,
    /// Where backups are written and read (`BACKUP_DIR`); without it the
    /// service takes no backups.
    backup_dir: Option<PathBuf>,
    status: StoreStatus,
    loaded: tokio::sync::Mutex<Option<Loaded>>,
}

fn refused(text: impl Into<String>) -> Refusal {
    Refusal::Refused(anyhow::anyhow!(text.into()))
}

impl<S: StoreMaintenance> Maintainer<S> {
    #[must_use]
    pub fn new(service: &'static str, store: S, backup_dir: Option<PathBuf>, status: StoreStatus) -> Arc<Self> {
        Arc::new(Self {
            service,
            store,
            backup_dir,
            status,
            loaded: tokio::sync::Mutex::new(None),
        })
    }

    /// The operation lock: a second operation while one runs is refused,
    /// not queued (it would act on a state the first is changing).
    fn exclusive(&self) -> Outcome<tokio::sync::MutexGuard<'_, Option<Loaded>>> {
        self.loaded
            .try_lock()
            .map_err(|_| refused("another backup or restore step is running; try again when it ends"))
    }

    fn dir_of(&self, name: &str) -> Outcome<PathBuf> {
        let root = self
            .backup_dir
            .as_ref()
            .ok_or_else(|| refused(format!("{} has no BACKUP_DIR: it takes no backups", self.service)))?;
        manifest::inside(root, name).map_err(Refusal::Refused)
    }

    /// The live data's schema version and counts.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn inspect(&self) -> Outcome<Contents> {
        self.store.inspect().await.map_err(Refusal::Failed)
    }

    /// Writes backup `name` into `BACKUP_DIR/name`.
    ///
    /// # Errors
    /// When the name is not plain or taken, or the store cannot be read
    /// (the partial directory is removed then).
    pub async fn backup(&self, name: &str) -> Outcome<Manifest> {
        let _one = self.exclusive()?;
        let dir = self.dir_of(name)?;
        if let Some(root) = &self.backup_dir {
            private_dirs(root).map_err(|e| Refusal::Failed(e.into()))?;
        }
        new_private_dir(&dir).map_err(|e| refused(format!("backup {name}: {e}")))?;
        let written = async {
            let contents = self.store.backup(&dir).await?;
            let files = checksums(&dir)?;
            let manifest = Manifest {
                service: self.service.to_owned(),
                store: self.store.store().to_owned(),
                format: FORMAT,
                created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                schema_version: contents.schema_version,
                counts: contents.counts,
                files,
            };
            write_private(&dir.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
            anyhow::Ok(manifest)
        }
        .await;
        match written {
            Ok(manifest) => {
                info!(backup = name, "backup written");
                Ok(manifest)
            }
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(Refusal::Failed(
                    err.context(format!("backing up into {}", dir.display())),
                ))
            }
        }
    }

    /// Step 1: verifies backup `name` and loads it beside the live data.
    /// Returns what the live store holds and what was loaded.
    ///
    /// # Errors
    /// When the backup is not this service's or not whole, newer than this
    /// build, does not load, or loads to other counts than its manifest
    /// says; or a previous restore still waits for confirm or undo. The
    /// live data is unchanged in every case.
    pub async fn load(&self, name: &str) -> Outcome<(Contents, Manifest)> {
        let mut loaded = self.exclusive()?;
        let dir = self.dir_of(name)?;
        let store = &self.store;
        let manifest = {
            let (dir, service) = (dir.clone(), self.service);
            // Checksums read every byte: off the async workers.
            tokio::task::spawn_blocking(move || verified(&dir, service, S::knows_file))
                .await
                .map_err(|e| Refusal::Failed(e.into()))?
                .map_err(|e| Refusal::Refused(e.context("nothing was changed")))?
        };
        if store.kept().await.map_err(Refusal::Failed)? {
            return Err(refused(
                "a previous restore keeps the data it replaced: confirm or undo it first; nothing was changed",
            ));
        }
        let before = store.inspect().await.map_err(Refusal::Failed)?;
        if manifest.schema_version > before.schema_version {
            return Err(refused(format!(
                "the backup holds schema version {} and {} runs {}: restore it with a build that knows it; nothing was changed",
                manifest.schema_version, self.service, before.schema_version
            )));
        }
        let result = store.load(&dir, &manifest).await;
        let in_side = match result {
            Ok(contents) => contents,
            Err(err) => {
                self.discard_quietly().await;
                return Err(Refusal::Refused(
                    err.context("the backup does not load; nothing live was changed"),
                ));
            }
        };
        if in_side.counts != manifest.counts || in_side.schema_version != manifest.schema_version {
            self.discard_quietly().await;
            return Err(refused(format!(
                "the backup loaded to schema version {} with {:?}, its manifest says {} with {:?}; nothing live was changed",
                in_side.schema_version, in_side.counts, manifest.schema_version, manifest.counts
            )));
        }
        info!(backup = name, "backup loaded beside the live data");
        *loaded = Some(Loaded {
            manifest: manifest.clone(),
            before: before.clone(),
        });
        Ok((before, manifest))
    }

    async fn discard_quietly(&self) {
        if let Err(err) = self.store.discard().await {
            warn!(error = format!("{err:#}"), "dropping a partly loaded backup failed");
        }
    }

    /// Drops a loaded backup without switching to it.
    ///
    /// # Errors
    /// When the side location cannot be dropped.
    pub async fn discard(&self) -> Outcome<()> {
        let mut loaded = self.exclusive()?;
        self.store.discard().await.map_err(Refusal::Failed)?;
        *loaded = None;
        Ok(())
    }

    fn in_maintenance(&self, step: &str) -> Outcome<()> {
        if self.status.in_maintenance() {
            Ok(())
        } else {
            Err(refused(format!(
                "{step} replaces live data: put every replica of {} in maintenance first",
                self.service
            )))
        }
    }

    /// Step 2: the loaded backup becomes the live data. Returns what was
    /// live before and what is live now.
    ///
    /// # Errors
    /// When the service is not in maintenance or nothing is loaded
    /// (refused), or the store fails midway.
    pub async fn switch(&self) -> Outcome<(Contents, Contents, Manifest)> {
        let mut loaded = self.exclusive()?;
        self.in_maintenance("the switch")?;
        let Some(Loaded { manifest, before }) = loaded.as_ref() else {
            return Err(refused("no backup is loaded: load one first"));
        };
        let (manifest, before) = (manifest.clone(), before.clone());
        // Kept as loaded until the switch succeeds: a switch that failed can
        // be run again, or undone.
        self.store.switch().await.map_err(Refusal::Failed)?;
        *loaded = None;
        let after = self.store.inspect().await.map_err(Refusal::Failed)?;
        info!(
            created_at = manifest.created_at,
            "restored; the replaced data is kept until confirmed"
        );
        Ok((before, after, manifest))
    }

    /// Puts back the data the last switch replaced.
    ///
    /// # Errors
    /// When the service is not in maintenance or nothing is kept
    /// (refused), or the store fails midway.
    pub async fn undo(&self) -> Outcome<Contents> {
        let _one = self.exclusive()?;
        self.in_maintenance("undo")?;
        if !self.store.kept().await.map_err(Refusal::Failed)? {
            return Err(refused("no restore waits for confirmation: nothing to undo"));
        }
        self.store.undo().await.map_err(Refusal::Failed)?;
        info!("restore undone: the replaced data is live again");
        self.store.inspect().await.map_err(Refusal::Failed)
    }

    /// Drops the data the last switch replaced.
    ///
    /// # Errors
    /// When nothing is kept (refused) or it cannot be dropped.
    pub async fn confirm(&self) -> Outcome<()> {
        let _one = self.exclusive()?;
        if !self.store.kept().await.map_err(Refusal::Failed)? {
            return Err(refused("no restore waits for confirmation"));
        }
        self.store.confirm().await.map_err(Refusal::Failed)?;
        info!("restore confirmed: the replaced data is dropped");
        Ok(())
    }
}
