//! message-service's MongoDB database, exported with the driver (Debian has
//! no `mongodump`): every collection read in one snapshot transaction and
//! streamed to `<collection>.bson`, BSON documents back to back (the format
//! `mongodump` writes, readable by `bsondump`), and `collections.json` with
//! each collection's validator and indexes (MongoDB extended JSON).
//! Nothing is held in memory beyond one batch.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _};
use futures::TryStreamExt as _;
use mongodb::{
    bson::{doc, Bson, Document, RawDocumentBuf},
    options::ReadConcern,
    Client, Database, IndexModel,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::Store;

/// Documents inserted per round trip on restore.
const BATCH: usize = 1000;

#[derive(Serialize, Deserialize)]
struct Collection {
    name: String,
    /// The `$jsonSchema` validator, as extended JSON.
    validator: Option<serde_json::Value>,
    /// `listIndexes` output but `_id_`, as extended JSON.
    indexes: Vec<serde_json::Value>,
}

async fn database(store: &Store) -> anyhow::Result<Database> {
    let client = Client::with_uri_str(&store.mongodb).await?;
    Ok(client.database(&store.mongodb_database))
}

async fn version(db: &Database) -> anyhow::Result<i64> {
    let meta = db
        .collection::<Document>("meta")
        .find_one(doc! { "_id": "schema" })
        .await?;
    Ok(meta.and_then(|d| d.get_i32("version").ok()).map_or(0, i64::from))
}

/// Runs `work` on the database, then shuts the client down (its background
/// tasks would otherwise outlive the command's runtime).
async fn with_database<T>(store: &Store, work: impl AsyncFnOnce(&Database) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let db = database(store).await?;
    let result = work(&db).await;
    db.client().clone().shutdown().await;
    result
}

pub async fn inspect(store: &Store) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    with_database(store, async |db| {
        let mut counts = BTreeMap::new();
        for name in db.list_collection_names().await? {
            if !name.starts_with("system.") {
                counts.insert(
                    name.clone(),
                    db.collection::<Document>(&name).count_documents(doc! {}).await?,
                );
            }
        }
        Ok((version(db).await?, counts))
    })
    .await
}

pub async fn backup(store: &Store, dir: &Path) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    with_database(store, async |db| export(db, dir).await).await
}

async fn export(db: &Database, dir: &Path) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let mut specs = Vec::new();
    let mut collections = db.list_collections().await?;
    while let Some(spec) = collections.try_next().await? {
        if spec.name.starts_with("system.") {
            continue;
        }
        let collection = db.collection::<Document>(&spec.name);
        let mut indexes = Vec::new();
        let mut listed = collection.list_indexes().await?;
        while let Some(index) = listed.try_next().await? {
            if index.options.as_ref().and_then(|o| o.name.as_deref()) == Some("_id_") {
                continue;
            }
            indexes.push(Bson::Document(mongodb::bson::to_document(&index)?).into_relaxed_extjson());
        }
        specs.push(Collection {
            validator: spec.options.validator.map(|v| Bson::Document(v).into_relaxed_extjson()),
            name: spec.name,
            indexes,
        });
    }
    // One snapshot for every collection: the outbox and the messages it
    // speaks of agree.
    let mut session = db.client().start_session().await?;
    session
        .start_transaction()
        .read_concern(ReadConcern::snapshot())
        .await
        .context("a snapshot transaction")?;
    let mut counts = BTreeMap::new();
    for spec in &specs {
        let file = tokio::fs::File::create(dir.join(format!("{}.bson", spec.name))).await?;
        let mut out = tokio::io::BufWriter::new(file);
        let mut cursor = db
            .collection::<RawDocumentBuf>(&spec.name)
            .find(doc! {})
            .session(&mut session)
            .await?;
        let mut n = 0u64;
        while let Some(document) = cursor.next(&mut session).await {
            out.write_all(document?.as_bytes()).await?;
            n += 1;
        }
        out.flush().await?;
        counts.insert(spec.name.clone(), n);
    }
    let version = {
        let meta = db
            .collection::<Document>("meta")
            .find_one(doc! { "_id": "schema" })
            .session(&mut session)
            .await?;
        meta.and_then(|d| d.get_i32("version").ok()).map_or(0, i64::from)
    };
    session.abort_transaction().await?;
    tokio::fs::write(dir.join("collections.json"), serde_json::to_vec_pretty(&specs)?).await?;
    Ok((version, counts))
}

pub async fn restore(store: &Store, dir: &Path) -> anyhow::Result<()> {
    with_database(store, async |db| import(db, dir).await).await
}

async fn import(db: &Database, dir: &Path) -> anyhow::Result<()> {
    let specs: Vec<Collection> =
        serde_json::from_slice(&tokio::fs::read(dir.join("collections.json")).await?).context("collections.json")?;
    for name in db.list_collection_names().await? {
        if !name.starts_with("system.") {
            db.collection::<Document>(&name).drop().await?;
        }
    }
    for spec in &specs {
        let mut create = db.create_collection(&spec.name);
        if let Some(validator) = &spec.validator {
            let Bson::Document(validator) = Bson::try_from(validator.clone())? else {
                bail!("the validator of {} is not a document", spec.name);
            };
            create = create.validator(validator);
        }
        create.await?;
        let collection = db.collection::<RawDocumentBuf>(&spec.name);
        let mut input =
            tokio::io::BufReader::new(tokio::fs::File::open(dir.join(format!("{}.bson", spec.name))).await?);
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(document) = next_document(&mut input).await? {
            batch.push(document);
            if batch.len() == BATCH {
                collection.insert_many(std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            collection.insert_many(batch).await?;
        }
        for index in &spec.indexes {
            let Bson::Document(index) = Bson::try_from(index.clone())? else {
                bail!("an index of {} is not a document", spec.name);
            };
            let model: IndexModel = mongodb::bson::from_document(index)?;
            collection.create_index(model).await?;
        }
    }
    Ok(())
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
    // MongoDB's own bound on a document.
    if !(5..=16 * 1024 * 1024).contains(&size) {
        bail!("a document of {size} bytes: the dump is damaged");
    }
    let mut bytes = vec![0; size];
    bytes[..4].copy_from_slice(&length);
    input.read_exact(&mut bytes[4..]).await?;
    Ok(Some(RawDocumentBuf::from_bytes(bytes)?))
}
