//! The same maintenance as a one-shot subcommand of the service's own
//! binary, with the service's own configuration: `<service> backup` for a
//! scheduled job (a Kubernetes CronJob runs the service's image with its
//! ConfigMap and Secrets), and `<service> restore` for a service whose
//! replicas are stopped (there is no running replica to ask). The steps and
//! checks are the [`Maintainer`]'s, as on the operator routes; only the
//! owner's code opens the store either way.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::info;

use super::{manifest::MANIFEST, Maintainer, Refusal, StoreMaintenance};
use crate::store::StoreStatus;

/// `<service> backup|restore …`.
#[derive(Debug, clap::Parser)]
#[command(about = "Back up or restore this service's own store, then exit")]
pub enum Command {
    /// Write a backup into BACKUP_DIR and print its manifest.
    Backup {
        /// The backup's name (default `<service>-<UTC time>`).
        name: Option<String>,
        /// Then keep only this many of the service's backups in
        /// BACKUP_DIR, the newest.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        keep: Option<u16>,
    },
    /// Load backup NAME from BACKUP_DIR, verify it, and make it the live
    /// data; the replaced data is kept until `restore --confirm`.
    Restore {
        /// A backup in BACKUP_DIR.
        #[arg(required_unless_present_any = ["undo", "confirm"])]
        name: Option<String>,
        /// Put back the data the last restore replaced.
        #[arg(long, conflicts_with_all = ["name", "confirm"])]
        undo: bool,
        /// Drop the data the last restore replaced.
        #[arg(long, conflicts_with = "name")]
        confirm: bool,
        /// Says that no replica of the service runs: a restore replaces
        /// data that a running replica would keep writing.
        #[arg(long, required_unless_present = "confirm")]
        replicas_stopped: bool,
    },
}

/// Whether `argv[1]` names one of these subcommands.
#[must_use]
pub fn requested() -> bool {
    matches!(std::env::args().nth(1).as_deref(), Some("backup" | "restore"))
}

/// The default name of a backup taken now: `<service>-<UTC time>`, which
/// sorts in the order backups were taken.
#[must_use]
pub fn backup_name(service: &str) -> String {
    format!("{service}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"))
}

/// Runs `command` on `store`; prints what it did as JSON on stdout.
///
/// # Errors
/// When the step is refused or fails (nothing is changed by a refusal).
pub async fn run<S: StoreMaintenance>(
    service: &'static str,
    store: S,
    backup_dir: Option<PathBuf>,
    command: Command,
) -> anyhow::Result<()> {
    let status = StoreStatus::new();
    let maintainer = Maintainer::new(service, store, backup_dir.clone(), status.clone());
    let report = match command {
        Command::Backup { name, keep } => {
            let name = name.unwrap_or_else(|| backup_name(service));
            let manifest = maintainer.backup(&name).await.map_err(explained)?;
            let mut report = serde_json::json!({ "backup": name, "manifest": manifest });
            if let (Some(keep), Some(dir)) = (keep, &backup_dir) {
                report["removed"] = serde_json::json!(keep_newest(dir, service, usize::from(keep))?);
            }
            report
        }
        Command::Restore {
            name,
            undo,
            confirm,
            replicas_stopped,
        } => {
            if confirm {
                maintainer.confirm().await.map_err(explained)?;
                serde_json::json!({ "confirmed": true })
            } else {
                // This process is the only writer left (`--replicas-stopped`):
                // it holds the maintenance the switch requires.
                status.set_maintenance(replicas_stopped);
                if undo {
                    serde_json::json!({ "undone": maintainer.undo().await.map_err(explained)? })
                } else {
                    let name = name.context("a backup name is required")?;
                    let (before, _) = maintainer.load(&name).await.map_err(explained)?;
                    let (_, after, manifest) = maintainer.switch().await.map_err(explained)?;
                    serde_json::json!({ "restored": name, "before": before, "after": after, "manifest": manifest })
                }
            }
        }
    };
    info!(service, "maintenance step done");
    println!("{report}");
    Ok(())
}

fn explained(refusal: Refusal) -> anyhow::Error {
    match refusal {
        Refusal::Refused(err) => err.context("refused"),
        Refusal::Failed(err) => err.context("failed"),
    }
}

/// Removes all but the `keep` newest backups of `service` in `dir` (the
/// directories named as [`backup_name`] names them, `<service>-<UTC
/// time>`, that hold a manifest); returns their names. Anything else in the
/// directory, a backup given another name included, is left alone.
fn keep_newest(dir: &Path, service: &str, keep: usize) -> anyhow::Result<Vec<String>> {
    let prefix = format!("{service}-");
    let mut backups: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().join(MANIFEST).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            name.strip_prefix(&prefix)
                .is_some_and(|stamp| chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ").is_ok())
        })
        .collect();
    backups.sort_unstable();
    let old = backups.len().saturating_sub(keep);
    let removed: Vec<String> = backups.drain(..old).collect();
    for name in &removed {
        std::fs::remove_dir_all(dir.join(name)).with_context(|| format!("removing the old backup {name}"))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_removes_the_oldest_backups_of_this_service_only() {
        let root = tempfile::tempdir().unwrap();
        for name in [
            "svc-20261101T000000.000Z",
            "svc-20261102T000000.000Z",
            "svc-20261103T000000.000Z",
            "other-20261101T000000.000Z",
        ] {
            std::fs::create_dir(root.path().join(name)).unwrap();
            std::fs::write(root.path().join(name).join(MANIFEST), "{}").unwrap();
        }
        // Not a backup: no manifest.
        std::fs::create_dir(root.path().join("svc-20261001T000000.000Z")).unwrap();
        // A backup named by hand: not rotated.
        std::fs::create_dir(root.path().join("svc-pre-upgrade")).unwrap();
        std::fs::write(root.path().join("svc-pre-upgrade").join(MANIFEST), "{}").unwrap();

        let removed = keep_newest(root.path(), "svc", 2).unwrap();

        assert_eq!(removed, ["svc-20261101T000000.000Z"]);
        let mut left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "other-20261101T000000.000Z",
                "svc-20261001T000000.000Z",
                "svc-20261102T000000.000Z",
                "svc-20261103T000000.000Z",
                "svc-pre-upgrade"
            ]
        );
    }
}
