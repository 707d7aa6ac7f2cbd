//! A SQLite database file of a test's own.

use std::path::PathBuf;

/// A temporary directory holding one database file; removed on drop.
pub struct SqliteFile {
    dir: tempfile::TempDir,
}

impl SqliteFile {
    /// # Panics
    /// When no temporary directory can be made.
    #[must_use]
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("creating a temporary directory"),
        }
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    /// `sqlite://…?mode=rwc`: created on first connection.
    #[must_use]
    pub fn url(&self) -> String {
        format!("sqlite://{}?mode=rwc", self.path().display())
    }
}

impl Default for SqliteFile {
    fn default() -> Self {
        Self::new()
    }
}
