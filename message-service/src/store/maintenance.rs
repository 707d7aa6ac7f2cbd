//! message-service's side of backup and restore (see
//! `service_kit::maintenance`), on its MongoDB database. Debian has no
//! `mongodump`, and the driver does the same.
//!
//! - **backup**: every collection of the data model (the store module's
//!   table, nothing else) read in one snapshot transaction, so the outbox
//!   and the messages it speaks of agree, and streamed to
//!   `<collection>.bson`: BSON documents back to back, the format
//!   `mongodump` writes and `bsondump` reads. Nothing is held in memory
//!   beyond one batch.
//! - **load**: a side database (`<db>__restore`) is prepared by the store's
//!   own `prepare` (collections, validator, indexes, schema version), then
//!   filled from the files: the validator checks every message, so a
//!   document the data model refuses fails the load there. Collection names
//!   come from the data model, never from the backup.
//! - **switch**: each collection of the live database is renamed into
//!   `<db>__kept`, and the side's into the live database (`renameCollection`
//!   keeps the validator and the indexes). **undo** renames the kept ones
//!   back.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _};
use mongodb::{
    bson::{doc, Document, RawDocumentBuf},
    options::ReadConcern,
    Client, Database,
};
use service_kit::{
    files::new_private_file,
    maintenance::{ContentDigest, Contents, Manifest, StoreMaintenance},
    store::StoreStatus,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Store, COLLECTION, DEAD_LETTERS, ERASURES, META, OUTBOX, REVOCATIONS, VISIBILITY};

/// Every collection of the data model.
const COLLECTIONS: [&str; 7] = [
    COLLECTION,
    OUTBOX,
    DEAD_LETTERS,
    REVOCATIONS,
    ERASURES,
    VISIBILITY,
    META,
];
/// Documents inserted per round trip on load.
const BATCH: usize = 1000;
/// MongoDB's own bound on a document.
const MAX_DOCUMENT: usize = 16 * 1024 * 1024;

pub struct Maintenance {
    uri: String,
    database: String,
}

fn file_of(collection: &str) -> String {
    format!("{collection}.bson")
}

fn version_in(meta: Option<Document>) -> i64 {
    meta.and_then(|d| d.get_i32("version").ok()).map_or(0, i64::from)
}

impl Maintenance {
    #[must_use]
    pub fn new(uri: &str, database: &str) -> Self {
        Self {
            uri: uri.to_owned(),
            database: database.to_owned(),
        }
    }

    fn side(&self) -> String {
        format!("{}__restore", self.database)
    }

    fn kept_name(&self) -> String {
        format!("{}__kept", self.database)
    }

    /// Runs `work` with a client of its own, then shuts it down (its
    /// background tasks would otherwise outlive the operation).
    async fn with_client<T>(&self, work: impl AsyncFnOnce(&Client) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let client = Client::with_uri_str(&self.uri).await?;
        let result = work(&client).await;
        client.shutdown().await;
        result
    }

    /// Renames `from.c` to `to.c` for every collection `from` holds.
    async fn rename_all(client: &Client, from: &str, to: &str) -> anyhow::Result<()> {
        let present = client.database(from).list_collection_names().await?;
        for name in COLLECTIONS.iter().filter(|c| present.iter().any(|p| p == *c)) {
            client
                .database("admin")
                .run_command(doc! { "renameCollection": format!("{from}.{name}"), "to": format!("{to}.{name}") })
                .await
                .with_context(|| format!("renaming {from}.{name} to {to}.{name}"))?;
        }
        Ok(())
    }
}

async fn counts(db: &Database) -> anyhow::Result<Contents> {
    let mut counts = BTreeMap::new();
    for name in COLLECTIONS {
        counts.insert(
            name.to_owned(),
            db.collection::<Document>(name).count_documents(doc! {}).await?,
        );
    }
    let meta = db
        .collection::<Document>(META)
        .find_one(doc! { "_id": "schema" })
        .await?;
    Ok(Contents {
        schema_version: version_in(meta),
        counts,
        digest: None,
    })
}

/// Every document of every collection, by `_id`, as one digest.
async fn digest(db: &Database) -> anyhow::Result<String> {
    let mut digest = ContentDigest::default();
    for name in COLLECTIONS {
        digest.add(name.as_bytes());
        let mut cursor = db
            .collection::<RawDocumentBuf>(name)
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await?;
        while let Some(document) = futures::TryStreamExt::try_next(&mut cursor).await? {
            digest.add(document.as_bytes());
        }
    }
    Ok(digest.finish())
}

/// The next BSON document of a dump: a little-endian length (which counts
/// itself), then the rest; `None` at the end.
async fn next_document(input: &mut (impl tokio::io::AsyncRead + Unpin)) -> anyhow::Result<Option<RawDocumentBuf>> {
    let mut length = [0u8; 4];
    match input.read_exact(&mut length).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let size = usize::try_from(i32::from_le_bytes(length)).context("a negative document length")?;
    if !(5..=MAX_DOCUMENT).contains(&size) {
        bail!("a document of {size} bytes: the dump is damaged");
    }
    let mut bytes = vec![0; size];
    bytes[..4].copy_from_slice(&length);
    input
        .read_exact(&mut bytes[4..])
        .await
        .context("a document cut short")?;
    let document = RawDocumentBuf::from_bytes(bytes)?;
    // Every element parses: a damaged document is caught here, not half
    // inserted.
    for element in &document {
        element?;
    }
    Ok(Some(document))
}

impl StoreMaintenance for Maintenance {
    fn store(&self) -> &'static str {
        "mongodb"
    }

    fn knows_file(name: &str) -> bool {
        COLLECTIONS.iter().any(|c| file_of(c) == name)
    }

    async fn inspect(&self) -> anyhow::Result<Contents> {
        self.with_client(async |client| {
            let db = client.database(&self.database);
            let mut contents = counts(&db).await?;
            contents.digest = Some(digest(&db).await?);
            Ok(contents)
        })
        .await
    }

    async fn backup(&self, dir: &Path) -> anyhow::Result<Contents> {
        self.with_client(async |client| {
            let db = client.database(&self.database);
            let mut session = client.start_session().await?;
            session
                .start_transaction()
                .read_concern(ReadConcern::snapshot())
                .await
                .context("a snapshot transaction")?;
            let mut counts = BTreeMap::new();
            for name in COLLECTIONS {
                let file = tokio::fs::File::from_std(new_private_file(&dir.join(file_of(name)))?);
                let mut out = tokio::io::BufWriter::new(file);
                let mut cursor = db
                    .collection::<RawDocumentBuf>(name)
                    .find(doc! {})
                    .session(&mut session)
                    .await?;
                let mut n = 0u64;
                while let Some(document) = cursor.next(&mut session).await {
                    out.write_all(document?.as_bytes()).await?;
                    n += 1;
                }
                out.flush().await?;
                out.get_ref().sync_all().await?;
                counts.insert(name.to_owned(), n);
            }
            let meta = db
                .collection::<Document>(META)
                .find_one(doc! { "_id": "schema" })
                .session(&mut session)
                .await?;
            session.abort_transaction().await?;
            Ok(Contents {
                schema_version: version_in(meta),
                counts,
                digest: None,
            })
        })
        .await
    }

    async fn load(&self, dir: &Path, manifest: &Manifest) -> anyhow::Result<Contents> {
        let side = self.side();
        self.with_client(async |client| client.database(&side).drop().await.map_err(Into::into))
            .await?;
        let store = Store::connect_lazy(&self.uri, &side, StoreStatus::always_up()).await?;
        store
            .prepare()
            .await
            .map_err(|e| anyhow::anyhow!("preparing the side database: {e}"))?;
        for name in COLLECTIONS {
            let file = file_of(name);
            if !manifest.files.contains_key(&file) {
                continue;
            }
            let collection = store.database.collection::<RawDocumentBuf>(name);
            let mut input = tokio::io::BufReader::new(tokio::fs::File::open(dir.join(&file)).await?);
            let mut batch = Vec::with_capacity(BATCH);
            while let Some(document) = next_document(&mut input).await.with_context(|| file.clone())? {
                // The schema document is the side's own, written by prepare.
                if name == META {
                    continue;
                }
                batch.push(document);
                if batch.len() == BATCH {
                    collection
                        .insert_many(std::mem::take(&mut batch))
                        .await
                        .with_context(|| format!("loading {name}"))?;
                }
            }
            if !batch.is_empty() {
                collection
                    .insert_many(batch)
                    .await
                    .with_context(|| format!("loading {name}"))?;
            }
        }
        let loaded = counts(&store.database).await;
        store.client.clone().shutdown().await;
        let mut loaded = loaded?;
        // Loaded at the version this build prepares; the manifest's is
        // what the backup held (checked no newer).
        loaded.schema_version = manifest.schema_version;
        Ok(loaded)
    }

    async fn discard(&self) -> anyhow::Result<()> {
        self.with_client(async |client| client.database(&self.side()).drop().await.map_err(Into::into))
            .await
    }

    async fn kept(&self) -> anyhow::Result<bool> {
        self.with_client(async |client| {
            Ok(!client
                .database(&self.kept_name())
                .list_collection_names()
                .await?
                .is_empty())
        })
        .await
    }

    async fn switch(&self) -> anyhow::Result<()> {
        self.with_client(async |client| {
            let side = client.database(&self.side()).list_collection_names().await?;
            if !COLLECTIONS.iter().all(|c| side.iter().any(|s| s == c)) {
                bail!("no loaded backup in {}", self.side());
            }
            Self::rename_all(client, &self.database, &self.kept_name()).await?;
            Self::rename_all(client, &self.side(), &self.database).await?;
            client.database(&self.side()).drop().await?;
            Ok(())
        })
        .await
    }

    async fn undo(&self) -> anyhow::Result<()> {
        self.with_client(async |client| {
            // Only what has a kept counterpart goes: after a switch that
            // stopped halfway, a collection never moved aside is still the
            // pre-restore one.
            let live = client.database(&self.database);
            let kept = client.database(&self.kept_name()).list_collection_names().await?;
            for name in COLLECTIONS.iter().filter(|c| kept.iter().any(|k| k == *c)) {
                live.collection::<Document>(name).drop().await?;
            }
            Self::rename_all(client, &self.kept_name(), &self.database).await?;
            client.database(&self.kept_name()).drop().await?;
            Ok(())
        })
        .await
    }

    async fn confirm(&self) -> anyhow::Result<()> {
        self.with_client(async |client| client.database(&self.kept_name()).drop().await.map_err(Into::into))
            .await
    }
}
