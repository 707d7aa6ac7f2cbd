//! The only module that talks to MongoDB.
//!
//! One collection, `messages`, serves API v1 and v2 alike:
//!
//! ```text
//! { _id: "<uuidv7>", author_id: "<uuid>", body: "…", created_at: Date, hidden: false }
//! ```
//!
//! Every query is served by the index `{author_id: 1, created_at: -1, _id: -1}`
//! (a user's messages, and a timeline's `$in` over the authors followed,
//! newest first with ties broken by id) or by `_id`.
//!
//! Beside it:
//!
//! | collection | holds | index |
//! |---|---|---|
//! | `outbox` | events waiting for delivery, `_id` = `{destination}:{event_id}` | `{destination, _id}` |
//! | `outbox_dead_letters` | outbox entries set aside (rejected by their destination, or unreadable), as stored plus `reason` and `failed_at` | `{destination, _id}` |
//! | `revocations` | the latest `TokensRevoked` per user (`_id` = user id) | `{issued_before}` |
//! | `erasures` | users whose messages are still being erased (`_id` = user id) | `_id` |
//! | `visibility` | users whose messages are still being hidden or shown (`_id` = user id, `hidden`: the wanted state) | `_id` |
//! | `meta` | `{_id: "schema", version}`: the data model's version, written at start-up | `_id` |

mod maintenance;

use std::time::Duration;

pub use maintenance::Maintenance;

use chrono::{DateTime, TimeZone as _, Utc};
use futures::TryStreamExt as _;
use mongodb::{
    bson::{doc, Bson, DateTime as BsonDateTime, Document},
    error::ErrorKind,
    options::{ClientOptions, IndexOptions},
    Client, ClientSession, Collection, Database, IndexModel,
};
use serde::{Deserialize, Serialize};
use service_kit::{
    events::{Event, Payload, RevocationReason},
    relay::{Backlog, DeadLetter, Outbox, Pending, Rejected},
    revocation::{Revocation, RevocationStore},
    store::StoreStatus,
};

use crate::{
    domain::{Body, Message, MessageId, Page, PageRequest, UserId},
    error::{Error, Result},
};

const COLLECTION: &str = "messages";
const OUTBOX: &str = "outbox";
const DEAD_LETTERS: &str = "outbox_dead_letters";
const REVOCATIONS: &str = "revocations";
const ERASURES: &str = "erasures";
const VISIBILITY: &str = "visibility";
/// One document, `{_id: "schema", version}`: the data model's version,
/// written at start-up; a build refuses data written by a newer one (and
/// `chirp restore` refuses a backup newer than the data it replaces).
const META: &str = "meta";
const SCHEMA_VERSION: i32 = 1;
/// Messages hidden or shown per transaction, with their events: bounded
/// work per step however many messages the user wrote.
const VISIBILITY_CHUNK: i64 = 500;
/// Every event feeds analytics.
pub const ANALYTICS: &str = "analytics";
/// Deletions and hidings reach comment-service, which deletes the message's
/// comments or stops listing them.
pub const COMMENTS: &str = "comments";
/// Messages erased per transaction: bounded work per step, well within a
/// transaction's limits, however many messages the user wrote.
const ERASE_CHUNK: i64 = 200;

/// Where an event goes.
fn destinations(payload: &Payload) -> &'static [&'static str] {
    match payload {
        Payload::MessageDeleted { .. } | Payload::MessageHidden { .. } => &[ANALYTICS, COMMENTS],
        _ => &[ANALYTICS],
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RevocationDoc {
    #[serde(rename = "_id")]
    user_id: String,
    issued_before: BsonDateTime,
    reason: String,
}

/// A user whose messages should all end up with `hidden`.
#[derive(Debug, Serialize, Deserialize)]
struct VisibilityDoc {
    #[serde(rename = "_id")]
    user_id: String,
    hidden: bool,
    requested_at: BsonDateTime,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErasureDoc {
    #[serde(rename = "_id")]
    user_id: String,
    requested_at: BsonDateTime,
}
const TIMELINE_INDEX: &str = "author_time_id";

/// A message as stored: references only (ARCHITECTURE.md invariant 2).
#[derive(Debug, Serialize, Deserialize)]
struct MessageDoc {
    #[serde(rename = "_id")]
    id: String,
    author_id: String,
    body: String,
    created_at: BsonDateTime,
    hidden: bool,
}

/// An event waiting in the outbox collection. Its `_id` is the event id (a
/// UUIDv7, so `_id` order is write order).
#[derive(Debug, Serialize, Deserialize)]
struct OutboxDoc {
    #[serde(rename = "_id")]
    id: String,
    destination: String,
    event: String,
    occurred_at: BsonDateTime,
}

impl OutboxDoc {
    /// One entry per destination of `event`.
    fn for_event(event: &Event) -> Result<Vec<Self>> {
        let json = event.to_json()?;
        Ok(destinations(&event.payload)
            .iter()
            .map(|destination| Self {
                // UUIDv7 text after a fixed prefix: `_id` order within a
                // destination is write order.
                id: format!("{destination}:{}", event.id),
                destination: (*destination).to_owned(),
                event: json.clone(),
                occurred_at: BsonDateTime::from_millis(event.occurred_at.timestamp_millis()),
            })
            .collect())
    }
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    database: Database,
    messages: Collection<MessageDoc>,
    outbox: Collection<OutboxDoc>,
    revocations: Collection<RevocationDoc>,
    erasures: Collection<ErasureDoc>,
    visibility: Collection<VisibilityDoc>,
    status: StoreStatus,
}

impl Store {
    /// A client that connects on demand, so the service starts (and reports
    /// NOT_SERVING) while MongoDB is down.
    ///
    /// # Errors
    /// When the URI cannot be parsed.
    pub async fn connect_lazy(uri: &str, database: &str, status: StoreStatus) -> anyhow::Result<Self> {
        let mut options = ClientOptions::parse(uri).await?;
        options.app_name = Some("message-service".to_owned());
        // Acknowledge a write only once a majority has it in the journal on
        // disk: an acknowledged post (and its outbox event) then survives a
        // crash of the server, not only a clean shutdown. (MongoDB's own
        // default may acknowledge before the journal is flushed.)
        options.write_concern = Some(
            mongodb::options::WriteConcern::builder()
                .w(mongodb::options::Acknowledgment::Majority)
                .journal(true)
                .build(),
        );
        // Without these a request would wait the driver's default 30 s for a
        // server that is gone.
        options.server_selection_timeout = Some(Duration::from_secs(1));
        options.connect_timeout = Some(Duration::from_secs(1));
        let client = Client::with_options(options)?;
        let database = client.database(database);
        Ok(Self {
            messages: database.collection(COLLECTION),
            outbox: database.collection(OUTBOX),
            revocations: database.collection(REVOCATIONS),
            erasures: database.collection(ERASURES),
            visibility: database.collection(VISIBILITY),
            database,
            client,
            status,
        })
    }

    fn ready(&self) -> Result<&Collection<MessageDoc>> {
        if self.status.is_up() {
            Ok(&self.messages)
        } else {
            Err(Error::store_unavailable(None))
        }
    }

    /// Creates the collection with its validator, and the indexes. Idempotent:
    /// runs whenever the store comes up for the first time in this process.
    pub async fn prepare(&self) -> Result<()> {
        let validator = doc! {
            "$jsonSchema": {
                "bsonType": "object",
                "required": ["_id", "author_id", "body", "created_at", "hidden"],
                // References, not copies: no field beyond these can creep in.
                "additionalProperties": false,
                "properties": {
                    "_id": { "bsonType": "string" },
                    "author_id": { "bsonType": "string" },
                    "body": { "bsonType": "string", "minLength": 1, "maxLength": 280 },
                    "created_at": { "bsonType": "date" },
                    "hidden": { "bsonType": "bool" },
                },
            }
        };
        let existing = self.database.list_collection_names().await.map_err(classify)?;
        if existing.iter().any(|name| name == COLLECTION) {
            self.database
                .run_command(doc! { "collMod": COLLECTION, "validator": validator })
                .await
                .map_err(classify)?;
        } else {
            self.database
                .create_collection(COLLECTION)
                .validator(validator)
                .await
                .map_err(classify)?;
        }
        let index = IndexModel::builder()
            .keys(doc! { "author_id": 1, "created_at": -1, "_id": -1 })
            .options(IndexOptions::builder().name(TIMELINE_INDEX.to_owned()).build())
            .build();
        self.messages.create_index(index).await.map_err(classify)?;
        // A transaction cannot create a collection on every server version;
        // make sure the outbox exists before the first write needs it.
        for name in [OUTBOX, DEAD_LETTERS, REVOCATIONS, ERASURES, VISIBILITY] {
            if !existing.iter().any(|existing| existing == name) {
                self.database.create_collection(name).await.map_err(classify)?;
            }
        }
        let by_cutoff = IndexModel::builder()
            .keys(doc! { "issued_before": 1 })
            .options(IndexOptions::builder().name("issued_before".to_owned()).build())
            .build();
        self.revocations.create_index(by_cutoff).await.map_err(classify)?;
        for collection in [OUTBOX, DEAD_LETTERS] {
            let pending = IndexModel::builder()
                .keys(doc! { "destination": 1, "_id": 1 })
                .options(IndexOptions::builder().name("destination_id".to_owned()).build())
                .build();
            self.database
                .collection::<Document>(collection)
                .create_index(pending)
                .await
                .map_err(classify)?;
        }
        let meta = self.database.collection::<Document>(META);
        meta.update_one(
            doc! { "_id": "schema" },
            doc! { "$setOnInsert": { "version": SCHEMA_VERSION } },
        )
        .upsert(true)
        .await
        .map_err(classify)?;
        let stored = meta
            .find_one(doc! { "_id": "schema" })
            .await
            .map_err(classify)?
            .and_then(|d| d.get_i32("version").ok())
            .unwrap_or(SCHEMA_VERSION);
        if stored > SCHEMA_VERSION {
            return Err(Error::internal(anyhow::anyhow!(
                "MongoDB holds schema version {stored}; this build knows up to {SCHEMA_VERSION}"
            )));
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        service_kit::store::timed("mongodb", "ping", async move {
            self.database.run_command(doc! { "ping": 1 }).await.map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// Stores a message and its event in one transaction.
    pub async fn insert(&self, message: &Message, event: &Event) -> Result<()> {
        service_kit::store::timed("mongodb", "insert", async move {
            let messages = self.ready()?;
            let entries = OutboxDoc::for_event(event)?;
            let mut session = self.client.start_session().await.map_err(classify)?;
            session.start_transaction().await.map_err(classify)?;
            messages
                .insert_one(to_doc(message))
                .session(&mut session)
                .await
                .map_err(classify)?;
            self.outbox
                .insert_many(entries)
                .session(&mut session)
                .await
                .map_err(classify)?;
            session.commit_transaction().await.map_err(classify)
        })
        .await
    }

    /// A visible message.
    pub async fn get(&self, id: MessageId) -> Result<Option<Message>> {
        service_kit::store::timed("mongodb", "get", async move {
            let found = self
                .ready()?
                .find_one(doc! { "_id": id.to_string(), "hidden": false })
                .await
                .map_err(classify)?;
            found.map(from_doc).transpose()
        })
        .await
    }

    /// Visible messages of `authors`, newest first.
    pub async fn by_authors(&self, authors: &[UserId], page: PageRequest) -> Result<Page<Message>> {
        service_kit::store::timed("mongodb", "by_authors", async move {
            let authors: Vec<String> = authors.iter().map(ToString::to_string).collect();
            let mut filter = doc! { "author_id": { "$in": authors }, "hidden": false };
            if let Some(after) = page.after().copied() {
                let at = BsonDateTime::from_millis(after.created_at.timestamp_millis());
                filter.insert(
                    "$or",
                    vec![
                        Bson::Document(doc! { "created_at": { "$lt": at } }),
                        Bson::Document(doc! { "created_at": at, "_id": { "$lt": after.id.to_string() } }),
                    ],
                );
            }
            // One more than asked says whether another page follows.
            let limit = i64::from(page.size()) + 1;
            let docs: Vec<MessageDoc> = self
                .ready()?
                .find(filter)
                .sort(doc! { "created_at": -1, "_id": -1 })
                .limit(limit)
                .await
                .map_err(classify)?
                .try_collect()
                .await
                .map_err(classify)?;
            let mut items = docs.into_iter().map(from_doc).collect::<Result<Vec<_>>>()?;
            let more = items.len() > page.size() as usize;
            items.truncate(page.size() as usize);
            let next = if more {
                items.last().map(crate::domain::Cursor::of)
            } else {
                None
            };
            Ok(Page { items, next })
        })
        .await
    }

    /// Deletes a message and writes the event `event_for` makes of it, in
    /// one transaction; `false` when there was no such message.
    pub async fn delete(&self, id: MessageId, event_for: impl FnOnce(&Message) -> Event) -> Result<bool> {
        service_kit::store::timed("mongodb", "delete", async move {
            let messages = self.ready()?;
            let mut session = self.client.start_session().await.map_err(classify)?;
            session.start_transaction().await.map_err(classify)?;
            let deleted = messages
                .find_one_and_delete(doc! { "_id": id.to_string() })
                .session(&mut session)
                .await
                .map_err(classify)?;
            let Some(deleted) = deleted else {
                session.abort_transaction().await.map_err(classify)?;
                return Ok(false);
            };
            let entries = OutboxDoc::for_event(&event_for(&from_doc(deleted)?))?;
            self.outbox
                .insert_many(entries)
                .session(&mut session)
                .await
                .map_err(classify)?;
            session.commit_transaction().await.map_err(classify)?;
            Ok(true)
        })
        .await
    }

    /// The author of a message, visible or not.
    pub async fn author_of(&self, id: MessageId) -> Result<Option<UserId>> {
        service_kit::store::timed("mongodb", "author_of", async move {
            let found = self
                .ready()?
                .clone_with_type::<Document>()
                .find_one(doc! { "_id": id.to_string() })
                .projection(doc! { "author_id": 1 })
                .await
                .map_err(classify)?;
            found
                .map(|d| {
                    d.get_str("author_id")
                        .map_err(|e| Error::internal(anyhow::anyhow!("stored author_id: {e}")))
                        .and_then(|raw| {
                            UserId::parse("author_id", raw).map_err(|v| Error::internal(anyhow::anyhow!("{v}")))
                        })
                })
                .transpose()
        })
        .await
    }

    /// Hides or shows every message of `author`, writing the event
    /// `event_for` makes of each message changed, in one transaction; the
    /// number changed. Messages already in that state are left alone, so a
    /// repeat changes (and writes) nothing.
    pub async fn set_hidden(
        &self,
        author: UserId,
        hidden: bool,
        event_for: impl Fn(MessageId) -> Event,
    ) -> Result<u64> {
        service_kit::store::timed("mongodb", "set_hidden", async move {
            let mut total = 0;
            loop {
                let changed = self.set_hidden_chunk(author, hidden, &event_for).await?;
                total += changed;
                if changed < VISIBILITY_CHUNK as u64 {
                    return Ok(total);
                }
            }
        })
        .await
    }

    /// Hides or shows up to [`VISIBILITY_CHUNK`] of `author`'s messages
    /// not yet in that state, with their events, in one transaction; how
    /// many changed.
    async fn set_hidden_chunk(
        &self,
        author: UserId,
        hidden: bool,
        event_for: &impl Fn(MessageId) -> Event,
    ) -> Result<u64> {
        let messages = self.ready()?;
        let filter = doc! { "author_id": author.to_string(), "hidden": !hidden };
        let mut session = self.client.start_session().await.map_err(classify)?;
        session.start_transaction().await.map_err(classify)?;
        let ids = self.message_ids(&mut session, filter, VISIBILITY_CHUNK).await?;
        if ids.is_empty() {
            session.abort_transaction().await.map_err(classify)?;
            return Ok(0);
        }
        messages
            .update_many(doc! { "_id": { "$in": &ids } }, doc! { "$set": { "hidden": hidden } })
            .session(&mut session)
            .await
            .map_err(classify)?;
        let mut entries = Vec::with_capacity(ids.len() * 2);
        for id in ids.iter().filter_map(|id| MessageId::parse("_id", id).ok()) {
            entries.extend(OutboxDoc::for_event(&event_for(id))?);
        }
        self.outbox
            .insert_many(entries)
            .session(&mut session)
            .await
            .map_err(classify)?;
        session.commit_transaction().await.map_err(classify)?;
        Ok(ids.len() as u64)
    }

    /// Ids of up to `limit` messages matching `filter`, read in `session`.
    async fn message_ids(&self, session: &mut ClientSession, filter: Document, limit: i64) -> Result<Vec<String>> {
        let docs: Vec<Document> = self
            .messages
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! { "_id": 1 })
            .limit(limit)
            .session(&mut *session)
            .await
            .map_err(classify)?
            .stream(session)
            .try_collect()
            .await
            .map_err(classify)?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect())
    }

    /// Records that every message of `user` should end up `hidden` (a ban
    /// or its lifting); the latest request wins. The worker does it in
    /// chunks, so the call that delivers a ban returns at once however many
    /// messages the user wrote.
    pub async fn request_visibility(&self, user: UserId, hidden: bool) -> Result<()> {
        service_kit::store::timed("mongodb", "request_visibility", async move {
            self.ready()?;
            self.visibility
                .update_one(
                    doc! { "_id": user.to_string() },
                    doc! { "$set": { "hidden": hidden, "requested_at": BsonDateTime::now() } },
                )
                .upsert(true)
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    pub async fn visibility_pending(&self) -> Result<u64> {
        service_kit::store::timed("mongodb", "visibility_pending", async move {
            self.visibility.count_documents(doc! {}).await.map_err(classify)
        })
        .await
    }

    /// One chunk of the oldest visibility request; the request is dropped
    /// once a chunk comes back short, unless a newer one replaced it
    /// meanwhile. `false` when none is waiting.
    pub async fn visibility_step(&self, event_for: impl Fn(MessageId, UserId, bool) -> Event) -> Result<bool> {
        service_kit::store::timed("mongodb", "visibility_step", async move {
            self.ready()?;
            let Some(job) = oldest(&self.visibility).await? else {
                return Ok(false);
            };
            let author = UserId::parse("_id", &job.user_id)
                .map_err(|_| Error::internal(anyhow::anyhow!("a visibility request names a malformed user id")))?;
            let changed = self
                .set_hidden_chunk(author, job.hidden, &|id| event_for(id, author, job.hidden))
                .await?;
            if changed < VISIBILITY_CHUNK as u64 {
                self.visibility
                    .delete_one(doc! { "_id": &job.user_id, "hidden": job.hidden, "requested_at": job.requested_at })
                    .await
                    .map_err(classify)?;
            }
            Ok(true)
        })
        .await
    }

    /// Stores `revocation` unless a later one is stored already.
    pub async fn revoke(&self, revocation: &Revocation) -> Result<()> {
        service_kit::store::timed("mongodb", "revoke", async move {
            self.ready()?;
            let user = revocation.user_id.to_string();
            let cutoff = BsonDateTime::from_millis(revocation.issued_before.timestamp_millis());
            let result = self
                .revocations
                .update_one(
                    doc! { "_id": &user, "issued_before": { "$lte": cutoff } },
                    doc! { "$set": { "issued_before": cutoff, "reason": revocation.reason.as_str() } },
                )
                .upsert(true)
                .await;
            match result {
                Ok(_) => Ok(()),
                // The filter missed because a later revocation is stored, and the
                // upsert then hit its `_id`: nothing to do.
                Err(err) if is_duplicate_key(&err) => Ok(()),
                Err(err) => Err(classify(err)),
            }
        })
        .await
    }

    /// The revocations store, for the verifier's sync.
    #[must_use]
    pub fn revocation_store(&self) -> MongoRevocations {
        MongoRevocations {
            revocations: self.revocations.clone(),
        }
    }

    /// Records that `user`'s messages are to be erased (idempotent).
    pub async fn request_erasure(&self, user: UserId) -> Result<()> {
        service_kit::store::timed("mongodb", "request_erasure", async move {
            self.ready()?;
            self.erasures
                .update_one(
                    doc! { "_id": user.to_string() },
                    doc! { "$setOnInsert": { "requested_at": BsonDateTime::now() } },
                )
                .upsert(true)
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    pub async fn erasures_pending(&self) -> Result<u64> {
        service_kit::store::timed("mongodb", "erasures_pending", async move {
            self.erasures.count_documents(doc! {}).await.map_err(classify)
        })
        .await
    }

    /// Erases up to [`ERASE_CHUNK`] messages of the oldest erasure, with
    /// their `MessageDeleted` events, in one transaction; the job is
    /// removed in the transaction that finds nothing more. `false` when no
    /// erasure is waiting.
    pub async fn erase_step(&self, event_for: impl Fn(MessageId, UserId) -> Event) -> Result<bool> {
        service_kit::store::timed("mongodb", "erase_step", async move {
            let Some(job) = oldest(&self.erasures).await? else {
                return Ok(false);
            };
            let author = UserId::parse("_id", &job.user_id)
                .map_err(|_| Error::internal(anyhow::anyhow!("an erasure names a malformed user id")))?;
            let mut session = self.client.start_session().await.map_err(classify)?;
            session.start_transaction().await.map_err(classify)?;
            let ids = self
                .message_ids(&mut session, doc! { "author_id": &job.user_id }, ERASE_CHUNK)
                .await?;
            if ids.is_empty() {
                self.erasures
                    .delete_one(doc! { "_id": &job.user_id })
                    .session(&mut session)
                    .await
                    .map_err(classify)?;
            } else {
                self.messages
                    .delete_many(doc! { "_id": { "$in": &ids } })
                    .session(&mut session)
                    .await
                    .map_err(classify)?;
                let mut entries = Vec::with_capacity(ids.len() * 2);
                for id in ids.iter().filter_map(|id| MessageId::parse("_id", id).ok()) {
                    entries.extend(OutboxDoc::for_event(&event_for(id, author))?);
                }
                if !entries.is_empty() {
                    self.outbox
                        .insert_many(entries)
                        .session(&mut session)
                        .await
                        .map_err(classify)?;
                }
            }
            session.commit_transaction().await.map_err(classify)?;
            Ok(true)
        })
        .await
    }

    /// The outbox as `destination` sees it, for a relay.
    #[must_use]
    pub fn outbox(&self, destination: &'static str) -> MongoOutbox {
        MongoOutbox {
            client: self.client.clone(),
            outbox: self.outbox.clone_with_type(),
            dead_letters: self.database.collection(DEAD_LETTERS),
            destination,
        }
    }
}

/// The revocations collection, as the verifier's sync reads it.
#[derive(Clone)]
pub struct MongoRevocations {
    revocations: Collection<RevocationDoc>,
}

impl RevocationStore for MongoRevocations {
    async fn active(&self, since: DateTime<Utc>) -> anyhow::Result<Vec<Revocation>> {
        let since = BsonDateTime::from_millis(since.timestamp_millis());
        let docs: Vec<RevocationDoc> = self
            .revocations
            .find(doc! { "issued_before": { "$gt": since } })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                Some(Revocation {
                    user_id: uuid::Uuid::try_parse(&d.user_id).ok()?,
                    issued_before: Utc.timestamp_millis_opt(d.issued_before.timestamp_millis()).single()?,
                    reason: RevocationReason::parse(&d.reason)?,
                })
            })
            .collect())
    }

    async fn prune(&self, before: DateTime<Utc>) -> anyhow::Result<()> {
        let before = BsonDateTime::from_millis(before.timestamp_millis());
        self.revocations
            .delete_many(doc! { "issued_before": { "$lt": before } })
            .await?;
        Ok(())
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    use mongodb::error::{WriteError, WriteFailure};
    match &*err.kind {
        ErrorKind::Write(WriteFailure::WriteError(WriteError { code, .. })) => *code == 11000,
        ErrorKind::Command(command) => command.code == 11000,
        _ => false,
    }
}

/// One destination's entries of the outbox collection, as its relay sees
/// them. Entries are read as plain documents, so one that this version
/// cannot read is set aside rather than failing the whole batch.
#[derive(Clone)]
pub struct MongoOutbox {
    client: Client,
    outbox: Collection<Document>,
    dead_letters: Collection<Document>,
    destination: &'static str,
}

impl MongoOutbox {
    /// Moves up to `limit` documents matching `filter`, oldest first, from
    /// one collection to the other in one transaction (so each is in exactly
    /// one of them), changed by `edit` on the way.
    async fn move_docs(
        &self,
        from: &Collection<Document>,
        to: &Collection<Document>,
        filter: Document,
        limit: i64,
        mut edit: impl FnMut(&mut Document),
    ) -> anyhow::Result<u64> {
        let mut session = self.client.start_session().await?;
        session.start_transaction().await?;
        let mut docs: Vec<Document> = from
            .find(filter)
            .sort(doc! { "_id": 1 })
            .limit(limit)
            .session(&mut session)
            .await?
            .stream(&mut session)
            .try_collect()
            .await?;
        if docs.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Bson> = docs.iter().filter_map(|d| d.get("_id").cloned()).collect();
        docs.iter_mut().for_each(&mut edit);
        to.insert_many(&docs).session(&mut session).await?;
        from.delete_many(doc! { "_id": { "$in": ids } })
            .session(&mut session)
            .await?;
        session.commit_transaction().await?;
        Ok(docs.len() as u64)
    }
}

impl Outbox for MongoOutbox {
    async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let docs: Vec<Document> = self
            .outbox
            .find(doc! { "destination": self.destination })
            .sort(doc! { "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await?
            .try_collect()
            .await?;
        docs.into_iter()
            .map(|d| {
                let position = d.get_str("_id")?.to_owned();
                let event = d
                    .get_str("event")
                    .map_err(|e| e.to_string())
                    .and_then(|json| Event::from_json(json).map_err(|e| e.to_string()));
                Ok(Pending { position, event })
            })
            .collect()
    }

    async fn mark_delivered(&self, delivered: &[Pending]) -> anyhow::Result<()> {
        let ids: Vec<&str> = delivered.iter().map(|p| p.position.as_str()).collect();
        self.outbox.delete_many(doc! { "_id": { "$in": ids } }).await?;
        Ok(())
    }

    async fn dead_letter(&self, rejected: &[Rejected]) -> anyhow::Result<()> {
        let ids: Vec<&str> = rejected.iter().map(|r| r.position.as_str()).collect();
        let failed_at = BsonDateTime::now();
        self.move_docs(
            &self.outbox,
            &self.dead_letters,
            doc! { "_id": { "$in": ids } },
            i64::try_from(rejected.len()).unwrap_or(i64::MAX),
            |d| {
                let reason = d
                    .get_str("_id")
                    .ok()
                    .and_then(|id| rejected.iter().find(|r| r.position == id))
                    .map(|r| r.reason.clone())
                    .unwrap_or_default();
                d.insert("reason", reason);
                d.insert("failed_at", failed_at);
            },
        )
        .await?;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let docs: Vec<Document> = self
            .dead_letters
            .find(doc! { "destination": self.destination })
            .sort(doc! { "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .map(|d| DeadLetter {
                position: d.get_str("_id").unwrap_or_default().to_owned(),
                event_id: d
                    .get_str("_id")
                    .ok()
                    .and_then(|id| id.split_once(':'))
                    .map(|(_, event_id)| event_id.to_owned()),
                reason: d.get_str("reason").unwrap_or_default().to_owned(),
                failed_at: d
                    .get_datetime("failed_at")
                    .ok()
                    .and_then(|at| Utc.timestamp_millis_opt(at.timestamp_millis()).single())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn retry_dead_letters(&self, limit: usize) -> anyhow::Result<u64> {
        self.move_docs(
            &self.dead_letters,
            &self.outbox,
            doc! { "destination": self.destination },
            i64::try_from(limit).unwrap_or(i64::MAX),
            |d| {
                d.remove("reason");
                d.remove("failed_at");
            },
        )
        .await
    }

    async fn backlog(&self) -> anyhow::Result<Backlog> {
        let mine = doc! { "destination": self.destination };
        let depth = self.outbox.count_documents(mine.clone()).await?;
        let oldest = self
            .outbox
            .find_one(mine.clone())
            .sort(doc! { "_id": 1 })
            .await?
            .and_then(|d| d.get_datetime("occurred_at").ok().copied())
            .and_then(|at| Utc.timestamp_millis_opt(at.timestamp_millis()).single());
        let dead_letters = self.dead_letters.count_documents(mine).await?;
        Ok(Backlog {
            depth,
            oldest,
            dead_letters,
        })
    }
}

fn to_doc(message: &Message) -> MessageDoc {
    MessageDoc {
        id: message.id.to_string(),
        author_id: message.author_id.to_string(),
        body: message.body.as_str().to_owned(),
        created_at: BsonDateTime::from_millis(message.created_at.timestamp_millis()),
        hidden: false,
    }
}

fn from_doc(doc: MessageDoc) -> Result<Message> {
    let corrupt = |what: &str| Error::internal(anyhow::anyhow!("stored message {} has a bad {what}", doc.id));
    Ok(Message {
        id: MessageId::parse("_id", &doc.id).map_err(|_| corrupt("_id"))?,
        author_id: UserId::parse("author_id", &doc.author_id).map_err(|_| corrupt("author_id"))?,
        created_at: Utc
            .timestamp_millis_opt(doc.created_at.timestamp_millis())
            .single()
            .ok_or_else(|| corrupt("created_at"))?,
        body: Body::from_stored(doc.body),
    })
}

/// Tells "MongoDB is unreachable" (UNAVAILABLE) from everything else.
fn classify(err: mongodb::error::Error) -> Error {
    let unavailable = matches!(
        *err.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::Shutdown
    ) || err.contains_label("RetryableWriteError")
        || err.contains_label("TransientTransactionError");
    if unavailable {
        Error::store_unavailable(Some(anyhow::Error::new(err)))
    } else {
        Error::internal(anyhow::Error::new(err).context("querying MongoDB"))
    }
}

/// The oldest job waiting in `jobs` (erasures, visibility changes).
async fn oldest<T>(jobs: &Collection<T>) -> Result<Option<T>>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    jobs.find_one(doc! {})
        .sort(doc! { "requested_at": 1 })
        .await
        .map_err(classify)
}
