//! Files that hold user data or secrets, created with their final mode in
//! one step: a file made with the default mode and narrowed afterwards is
//! readable by every local user for the moment in between (and for good if
//! the process dies there).

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
};

/// Mode of a directory only its owner may enter.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of a file only its owner may read.
pub const PRIVATE_FILE: u32 = 0o600;

/// Creates `path` and any missing parents as 0700 directories; an existing
/// directory is left as it is.
///
/// # Errors
/// When a directory cannot be created.
pub fn private_dirs(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(path)
}

/// Creates `path` as a new 0700 directory; fails if it exists.
///
/// # Errors
/// When it exists or cannot be created.
pub fn new_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(PRIVATE_DIR).create(path)
}

/// Creates `path` as a new, empty 0600 file, open for writing; fails if it
/// exists, so nothing is ever written through a link someone left there.
///
/// # Errors
/// When it exists or cannot be created.
pub fn new_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)
}

/// Writes `contents` to a new 0600 file at `path`.
///
/// # Errors
/// When it exists or cannot be written.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut file = new_private_file(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Replaces (or creates) `path` with a 0600 file holding `contents`: the
/// new file is written beside it and renamed over it, so no reader sees it
/// half written and it is never readable by others.
///
/// # Errors
/// When it cannot be written.
pub fn replace_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut scratch = path.as_os_str().to_owned();
    scratch.push(format!(".{}.tmp", std::process::id()));
    let scratch = std::path::PathBuf::from(scratch);
    let _ = std::fs::remove_file(&scratch);
    write_private(&scratch, contents)?;
    std::fs::rename(&scratch, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_files_and_directories_are_born_with_their_final_mode() {
        let root = tempfile::tempdir().unwrap();
        let nested = root.path().join("a").join("b");
        private_dirs(&nested).unwrap();
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        let fresh = root.path().join("c");
        new_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert!(new_private_dir(&fresh).is_err(), "an existing directory is refused");
        let file = fresh.join("secret");
        write_private(&file, b"x").unwrap();
        assert_eq!(mode(&file), 0o600);
        assert!(
            write_private(&file, b"y").is_err(),
            "an existing file is never overwritten"
        );
        replace_private(&file, b"z").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"z");
        assert_eq!(mode(&file), 0o600);
    }
}
