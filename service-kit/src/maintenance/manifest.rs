//! What a backup says of itself, and the checks a restore makes of it
//! before anything is loaded: a backup is untrusted input, whoever wrote it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The version of the backup layout this build writes and reads. 2: the
/// data files name only what the service's own schema holds (no schema is
/// carried in the backup).
pub const FORMAT: u32 = 2;

/// The manifest's own file name, beside the data files.
pub const MANIFEST: &str = "manifest.json";

/// The schema version and contents of a store (live, backed up or loaded).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contents {
    /// The data model's version: the last migration applied (PostgreSQL,
    /// SQLite) or the `schema_version` the service writes (MongoDB, Redis).
    pub schema_version: i64,
    /// Rows, documents or keys, by table, collection or key kind.
    pub counts: BTreeMap<String, u64>,
    /// SHA-256 of everything the store holds, in a fixed order (the live
    /// store's, when asked): two readings are equal exactly when nothing
    /// changed in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Builds [`Contents::digest`] from the store's parts, in the order given.
#[derive(Default)]
pub struct ContentDigest(sha2::Sha256);

impl ContentDigest {
    /// Adds one part (a row, a document, a key and its dump), framed by its
    /// length so that parts cannot run into each other.
    pub fn add(&mut self, part: &[u8]) {
        self.0.update((part.len() as u64).to_le_bytes());
        self.0.update(part);
    }

    #[must_use]
    pub fn finish(self) -> String {
        format!("{:x}", self.0.finalize())
    }
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub service: String,
    pub store: String,
    pub format: u32,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    pub schema_version: i64,
    pub counts: BTreeMap<String, u64>,
    /// SHA-256 (hex) of every data file, by name.
    pub files: BTreeMap<String, String>,
}

/// A name a caller gives a backup, or a file a manifest names: one path
/// component of plain characters, so it can never reach outside the
/// directory it is joined to.
///
/// # Errors
/// When it is empty, too long, starts with a dot, or holds anything but
/// ASCII letters, digits, `-`, `_` and `.`.
pub fn plain_name(name: &str) -> anyhow::Result<&str> {
    let plain = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain {
        Ok(name)
    } else {
        bail!("`{name}` is not a plain name (letters, digits, `-`, `_`, `.`; not starting with a dot)")
    }
}

/// The manifest of the backup in `dir`, once it is this service's, in this
/// build's format, names only files `known` accepts, and every file matches
/// its checksum.
///
/// # Errors
/// When any of that does not hold; nothing has been changed then.
pub fn verified(dir: &Path, service: &str, known: impl Fn(&str) -> bool) -> anyhow::Result<Manifest> {
    let text = std::fs::read(dir.join(MANIFEST))
        .with_context(|| format!("{} has no {MANIFEST}: not a chirp backup", dir.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text).context("manifest.json is damaged")?;
    if manifest.service != service {
        bail!("this is a backup of {}, not {service}", manifest.service);
    }
    if manifest.format != FORMAT {
        bail!(
            "backup format {} is not {FORMAT}, the one this build reads",
            manifest.format
        );
    }
    if manifest.files.is_empty() {
        bail!("the manifest lists no files");
    }
    for (name, sum) in &manifest.files {
        plain_name(name).context("the manifest names a file")?;
        if !known(name) {
            bail!("the manifest names `{name}`, which is none of {service}'s data files");
        }
        let path = dir.join(name);
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("{name} is missing from the backup"))?;
        if !meta.file_type().is_file() {
            bail!("{name} is not a regular file");
        }
        if &checksum(&path)? != sum {
            bail!("{name} does not match its checksum: the backup is damaged");
        }
    }
    Ok(manifest)
}

/// SHA-256 of every regular file in `dir` but the manifest, streamed.
///
/// # Errors
/// When the directory or a file cannot be read.
pub fn checksums(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut sums = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST || !entry.file_type()?.is_file() {
            continue;
        }
        sums.insert(name, checksum(&entry.path())?);
    }
    Ok(sums)
}

fn checksum(path: &Path) -> anyhow::Result<String> {
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// `root/name` for a plain `name`.
///
/// # Errors
/// When `name` is not plain.
pub fn inside(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    Ok(root.join(plain_name(name)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_accepted() {
        for good in [
            "user-service-20261201T101010.123Z",
            "users.dump",
            "outbox_dead_letters.bson",
        ] {
            assert!(plain_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", "..", ".hidden", "a\\b", "a b", "é", &"x".repeat(129)] {
            assert!(plain_name(bad).is_err(), "{bad}");
        }
    }

    fn backup_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut sums = BTreeMap::new();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
            sums.insert((*name).to_owned(), checksum(&dir.path().join(name)).unwrap());
        }
        let manifest = Manifest {
            service: "s".into(),
            store: "x".into(),
            format: FORMAT,
            created_at: String::new(),
            schema_version: 1,
            counts: BTreeMap::new(),
            files: sums,
        };
        std::fs::write(dir.path().join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        dir
    }

    #[test]
    fn a_backup_is_verified_against_its_manifest_and_the_services_own_files() {
        let dir = backup_with(&[("data.bin", "x")]);
        assert!(verified(dir.path(), "s", |n| n == "data.bin").is_ok());
        let refused =
            |dir: &Path, service, known: fn(&str) -> bool| format!("{:#}", verified(dir, service, known).unwrap_err());
        assert!(refused(dir.path(), "t", |_| true).contains("backup of s"));
        assert!(refused(dir.path(), "s", |_| false).contains("none of s's data files"));
        std::fs::write(dir.path().join("data.bin"), "y").unwrap();
        assert!(refused(dir.path(), "s", |_| true).contains("checksum"));
    }

    #[test]
    fn a_manifest_naming_a_path_outside_the_backup_is_refused() {
        let dir = backup_with(&[]);
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x"), "x").unwrap();
        let mut manifest: Manifest =
            serde_json::from_slice(&std::fs::read(dir.path().join(MANIFEST)).unwrap()).unwrap();
        let escape = format!("../{}/x", outside.path().file_name().unwrap().to_string_lossy());
        manifest
            .files
            .insert(escape, checksum(&outside.path().join("x")).unwrap());
        std::fs::write(dir.path().join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        let err = format!("{:#}", verified(dir.path(), "s", |_| true).unwrap_err());
        assert!(err.contains("not a plain name"), "{err}");
    }
}
