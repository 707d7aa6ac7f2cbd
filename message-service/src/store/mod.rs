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

use std::time::Duration;

use chrono::{TimeZone as _, Utc};
use futures::TryStreamExt as _;
use mongodb::{
    bson::{doc, Bson, DateTime as BsonDateTime, Document},
    error::ErrorKind,
    options::{ClientOptions, IndexOptions},
    Client, Collection, Database, IndexModel,
};
use serde::{Deserialize, Serialize};
use service_kit::{
    events::Event,
    relay::{Backlog, Outbox, Pending},
    store::StoreStatus,
};

use crate::{
    domain::{Body, Message, MessageId, Page, PageRequest, UserId},
    error::{Error, Result},
};

const COLLECTION: &str = "messages";
const OUTBOX: &str = "outbox";
/// The one destination of message-service's events.
pub const ANALYTICS: &str = "analytics";
const TIMELINE_INDEX: &str = "author_time_id";

/// A message as stored: references only (DESIGN.md invariant 2).
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
    fn new(event: &Event) -> Result<Self> {
        Ok(Self {
            id: event.id.to_string(),
            destination: ANALYTICS.to_owned(),
            event: event.to_json()?,
            occurred_at: BsonDateTime::from_millis(event.occurred_at.timestamp_millis()),
        })
    }
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    database: Database,
    messages: Collection<MessageDoc>,
    outbox: Collection<OutboxDoc>,
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
        // Without these a request would wait the driver's default 30 s for a
        // server that is gone.
        options.server_selection_timeout = Some(Duration::from_secs(1));
        options.connect_timeout = Some(Duration::from_secs(1));
        let client = Client::with_options(options)?;
        let database = client.database(database);
        Ok(Self {
            messages: database.collection(COLLECTION),
            outbox: database.collection(OUTBOX),
            database,
            client,
            status,
        })
    }

    fn ready(&self) -> Result<&Collection<MessageDoc>> {
        if self.status.is_up() {
            Ok(&self.messages)
        } else {
            Err(Error::StoreUnavailable(None))
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
        if !existing.iter().any(|name| name == OUTBOX) {
            self.database.create_collection(OUTBOX).await.map_err(classify)?;
        }
        let pending = IndexModel::builder()
            .keys(doc! { "destination": 1, "_id": 1 })
            .options(IndexOptions::builder().name("destination_id".to_owned()).build())
            .build();
        self.outbox.create_index(pending).await.map_err(classify)?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        self.database.run_command(doc! { "ping": 1 }).await.map_err(classify)?;
        Ok(())
    }

    /// Stores a message and its event in one transaction.
    pub async fn insert(&self, message: &Message, event: &Event) -> Result<()> {
        let messages = self.ready()?;
        let entry = OutboxDoc::new(event)?;
        let mut session = self.client.start_session().await.map_err(classify)?;
        session.start_transaction().await.map_err(classify)?;
        messages
            .insert_one(to_doc(message))
            .session(&mut session)
            .await
            .map_err(classify)?;
        self.outbox
            .insert_one(entry)
            .session(&mut session)
            .await
            .map_err(classify)?;
        session.commit_transaction().await.map_err(classify)
    }

    /// A visible message.
    pub async fn get(&self, id: MessageId) -> Result<Option<Message>> {
        let found = self
            .ready()?
            .find_one(doc! { "_id": id.to_string(), "hidden": false })
            .await
            .map_err(classify)?;
        found.map(from_doc).transpose()
    }

    /// Visible messages of `authors`, newest first.
    pub async fn by_authors(&self, authors: &[UserId], page: PageRequest) -> Result<Page<Message>> {
        let authors: Vec<String> = authors.iter().map(ToString::to_string).collect();
        let mut filter = doc! { "author_id": { "$in": authors }, "hidden": false };
        if let Some(after) = page.after {
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
        let limit = i64::from(page.size) + 1;
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
        let more = items.len() > page.size as usize;
        items.truncate(page.size as usize);
        let next = if more {
            items.last().map(crate::domain::Cursor::of)
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// Deletes a message and writes the event `event_for` makes of it, in
    /// one transaction; `false` when there was no such message.
    pub async fn delete(&self, id: MessageId, event_for: impl FnOnce(&Message) -> Event) -> Result<bool> {
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
        let entry = OutboxDoc::new(&event_for(&from_doc(deleted)?))?;
        self.outbox
            .insert_one(entry)
            .session(&mut session)
            .await
            .map_err(classify)?;
        session.commit_transaction().await.map_err(classify)?;
        Ok(true)
    }

    /// The author of a message, visible or not.
    pub async fn author_of(&self, id: MessageId) -> Result<Option<UserId>> {
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
                    .map_err(|e| Error::Internal(anyhow::anyhow!("stored author_id: {e}")))
                    .and_then(|raw| {
                        UserId::parse("author_id", raw).map_err(|v| Error::Internal(anyhow::anyhow!("{v}")))
                    })
            })
            .transpose()
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
        let messages = self.ready()?;
        let filter = doc! { "author_id": author.to_string(), "hidden": !hidden };
        let mut session = self.client.start_session().await.map_err(classify)?;
        session.start_transaction().await.map_err(classify)?;
        let ids: Vec<String> = messages
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! { "_id": 1 })
            .session(&mut session)
            .await
            .map_err(classify)?
            .stream(&mut session)
            .try_collect::<Vec<Document>>()
            .await
            .map_err(classify)?
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect();
        if ids.is_empty() {
            session.abort_transaction().await.map_err(classify)?;
            return Ok(0);
        }
        messages
            .update_many(doc! { "_id": { "$in": &ids } }, doc! { "$set": { "hidden": hidden } })
            .session(&mut session)
            .await
            .map_err(classify)?;
        let entries = ids
            .iter()
            .filter_map(|id| MessageId::parse("_id", id).ok())
            .map(|id| OutboxDoc::new(&event_for(id)))
            .collect::<Result<Vec<_>>>()?;
        self.outbox
            .insert_many(entries)
            .session(&mut session)
            .await
            .map_err(classify)?;
        session.commit_transaction().await.map_err(classify)?;
        Ok(ids.len() as u64)
    }

    /// The outbox, for the relay.
    #[must_use]
    pub fn outbox(&self) -> MongoOutbox {
        MongoOutbox {
            outbox: self.outbox.clone(),
        }
    }
}

/// The outbox collection as the relay sees it.
#[derive(Clone)]
pub struct MongoOutbox {
    outbox: Collection<OutboxDoc>,
}

impl Outbox for MongoOutbox {
    async fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let docs: Vec<OutboxDoc> = self
            .outbox
            .find(doc! { "destination": ANALYTICS })
            .sort(doc! { "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await?
            .try_collect()
            .await?;
        docs.into_iter()
            .map(|d| {
                Ok(Pending {
                    event: Event::from_json(&d.event)?,
                    position: d.id,
                })
            })
            .collect()
    }

    async fn mark_delivered(&self, delivered: &[Pending]) -> anyhow::Result<()> {
        let ids: Vec<&str> = delivered.iter().map(|p| p.position.as_str()).collect();
        self.outbox.delete_many(doc! { "_id": { "$in": ids } }).await?;
        Ok(())
    }

    async fn backlog(&self) -> anyhow::Result<Backlog> {
        let depth = self.outbox.count_documents(doc! { "destination": ANALYTICS }).await?;
        let oldest = self
            .outbox
            .find_one(doc! { "destination": ANALYTICS })
            .sort(doc! { "_id": 1 })
            .await?
            .and_then(|d| Utc.timestamp_millis_opt(d.occurred_at.timestamp_millis()).single());
        Ok(Backlog { depth, oldest })
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
    let corrupt = |what: &str| Error::Internal(anyhow::anyhow!("stored message {} has a bad {what}", doc.id));
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
        Error::StoreUnavailable(Some(anyhow::Error::new(err)))
    } else {
        Error::Internal(anyhow::Error::new(err).context("querying MongoDB"))
    }
}
