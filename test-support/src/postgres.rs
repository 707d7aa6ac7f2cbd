//! A fresh PostgreSQL database per test, dropped afterwards.

use sqlx::{Connection, Executor, PgConnection};

/// A database of the test's own on a server (the shared one by default).
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `chirp_test_<uuid>` on the shared server: `TEST_POSTGRES_URL`,
    /// else the one on 127.0.0.1:5432, else a private one for this test
    /// process ([`crate::process::StoreProcess::shared_url`]).
    ///
    /// # Errors
    /// When the server cannot be reached.
    pub async fn create() -> anyhow::Result<Self> {
        let admin = tokio::task::spawn_blocking(|| {
            crate::process::StoreProcess::shared_url(crate::process::SharedKind::Postgres)
        })
        .await?;
        Self::create_on(&admin).await
    }

    /// Creates a database on the server `admin_url` points to (a
    /// [`crate::process::StoreProcess::postgres`], say).
    ///
    /// # Errors
    /// When the server cannot be reached.
    pub async fn create_on(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("chirp_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(admin_url).await?;
        conn.execute(format!(r#"CREATE DATABASE "{name}""#).as_str()).await?;
        conn.close().await?;
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(base, _)| base);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        crate::block_on_fresh_runtime(async move {
            if let Ok(mut conn) = PgConnection::connect(&admin).await {
                // With the side and kept databases a restore leaves beside it.
                for database in [name.clone(), format!("{name}__restore"), format!("{name}__kept")] {
                    let _ = conn
                        .execute(format!(r#"DROP DATABASE IF EXISTS "{database}" WITH (FORCE)"#).as_str())
                        .await;
                }
                let _ = conn.close().await;
            }
        });
    }
}
