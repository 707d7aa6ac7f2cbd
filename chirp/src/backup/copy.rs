//! Moving backup directories: private on arrival (0700 directories, 0600
//! files), since they hold users' data.

use std::path::Path;

use anyhow::{bail, Context as _};
use service_kit::files::{new_private_dir, new_private_file, private_dirs};

/// Copies the regular files of backup `from` into a new private directory
/// `to` (nothing else: no links, no subdirectories).
///
/// # Errors
/// When `to` exists or a file cannot be copied.
pub fn copy_backup(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        private_dirs(parent)?;
    }
    new_private_dir(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let mut target = new_private_file(&to.join(entry.file_name()))?;
        std::io::copy(&mut std::fs::File::open(entry.path())?, &mut target)?;
        target.sync_all()?;
    }
    Ok(())
}

/// Moves backup `from` to `to`: a rename on the same file system, else a
/// copy and a removal.
///
/// # Errors
/// When `to` exists or the move fails.
pub fn move_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() {
        bail!("{} exists", to.display());
    }
    if let Some(parent) = to.parent() {
        private_dirs(parent)?;
    }
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    copy_backup(from, to)?;
    std::fs::remove_dir_all(from)?;
    Ok(())
}

/// The bytes of the files in `dir`.
///
/// # Errors
/// When it cannot be read.
pub fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}
