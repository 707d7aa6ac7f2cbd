//! A fresh MongoDB database per test, dropped afterwards.

use crate::process::StoreProcess;

/// A database of the test's own: on `MONGODB_URI` when set, else on a
/// private `secantusd-rs` that lives as long as this value.
pub struct TestMongo {
    uri: String,
    database: String,
    server: Option<StoreProcess>,
}

impl TestMongo {
    /// # Errors
    /// When `MONGODB_URI` is unset and secantusd-rs cannot start.
    pub fn create() -> anyhow::Result<Self> {
        let (uri, server) = match std::env::var("MONGODB_URI") {
            Ok(uri) if !uri.is_empty() => (uri, None),
            _ => {
                let server = StoreProcess::secantus()?;
                (server.url(), Some(server))
            }
        };
        Ok(Self {
            uri,
            database: format!("chirp_test_{}", uuid::Uuid::new_v4().simple()),
            server,
        })
    }

    #[must_use]
    pub fn uri(&self) -> &str {
        &self.uri
    }

    #[must_use]
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A database on a private `secantusd-rs`, whatever `MONGODB_URI` says:
    /// for tests that stop the server.
    ///
    /// # Errors
    /// When secantusd-rs cannot start.
    pub fn private() -> anyhow::Result<Self> {
        let server = StoreProcess::secantus()?;
        Ok(Self {
            uri: server.url(),
            database: format!("chirp_test_{}", uuid::Uuid::new_v4().simple()),
            server: Some(server),
        })
    }

    /// The private server, if this namespace runs one (to stop and start it).
    pub fn server(&mut self) -> Option<&mut StoreProcess> {
        self.server.as_mut()
    }
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        if self.server.is_some() {
            // The server and its files go with it.
            return;
        }
        let uri = self.uri.clone();
        let database = self.database.clone();
        crate::block_on_fresh_runtime(async move {
            if let Ok(client) = mongodb::Client::with_uri_str(&uri).await {
                // With the side and kept databases a restore leaves beside it.
                for name in [
                    database.clone(),
                    format!("{database}__restore"),
                    format!("{database}__kept"),
                ] {
                    let _ = client.database(&name).drop().await;
                }
            }
        });
    }
}
