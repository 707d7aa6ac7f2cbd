use std::{collections::HashMap, sync::Arc};

use chirp_proto::comment::v1::{self as pb, comment_service_client::CommentServiceClient};
use chrono::{TimeZone as _, Utc};
use service_kit::client::{Idempotency, Peer};
use tonic::Status;

use crate::domain::{CommentPreview, MessageId};

#[derive(Clone)]
pub struct CommentClient {
    peer: Arc<Peer>,
}

impl CommentClient {
    #[must_use]
    pub fn new(peer: Arc<Peer>) -> Self {
        Self { peer }
    }

    /// Comment counts of many messages in one call.
    ///
    /// # Errors
    /// The status of a failed call.
    pub async fn counts(&self, ids: &[MessageId]) -> Result<HashMap<MessageId, i64>, Status> {
        let request = pb::CountCommentsRequest {
            message_ids: ids.iter().map(ToString::to_string).collect(),
        };
        let reply = self
            .peer
            .call(Idempotency::Idempotent, request, |channel, request| async move {
                CommentServiceClient::new(channel).count_comments(request).await
            })
            .await?;
        Ok(reply
            .counts
            .into_iter()
            .filter_map(|(id, count)| Some((MessageId::parse("message_id", &id).ok()?, count)))
            .collect())
    }

    /// How many comments a message has, and the oldest `limit` of them: one
    /// call (ListComments carries the total), or two with a comment-service
    /// that predates the total.
    ///
    /// # Errors
    /// The status of a failed call.
    pub async fn preview(&self, id: MessageId, limit: u32) -> Result<(i64, Vec<CommentPreview>), Status> {
        let request = pb::ListCommentsRequest {
            message_id: id.to_string(),
            page_size: i32::try_from(limit).unwrap_or(i32::MAX),
            page_token: String::new(),
        };
        let reply = self
            .peer
            .call(Idempotency::Idempotent, request, |channel, request| async move {
                CommentServiceClient::new(channel).list_comments(request).await
            })
            .await?;
        let count = match reply.total_count {
            Some(count) => count,
            None => self.counts(&[id]).await?.get(&id).copied().unwrap_or(0),
        };
        let preview = reply
            .comments
            .into_iter()
            .map(|c| CommentPreview {
                id: c.id,
                author_id: c.author_id,
                body: c.body,
                created_at: c
                    .create_time
                    .and_then(|t| {
                        Utc.timestamp_opt(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
                            .single()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        Ok((count, preview))
    }
}

/// comment-service's ApplyEvents, for message deletions (their comments go
/// too). Authenticated with the producers' ingest token; comment-service
/// accepts only message events with it.
pub struct CommentEvents {
    peer: Arc<Peer>,
    ingest_token: service_kit::relay::IngestToken,
}

impl CommentEvents {
    /// # Errors
    /// When the token is not a valid metadata value.
    pub fn new(peer: Arc<Peer>, ingest_token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            peer,
            ingest_token: service_kit::relay::IngestToken::new(ingest_token)?,
        })
    }
}

impl service_kit::relay::Destination for CommentEvents {
    async fn deliver(
        &self,
        events: &[service_kit::events::Event],
    ) -> Result<Vec<service_kit::events::Outcome>, Status> {
        let request = pb::ApplyEventsRequest {
            events: events.iter().map(service_kit::events::Event::to_pb).collect(),
        };
        self.peer
            .call(Idempotency::Idempotent, request, |channel, mut request| {
                self.ingest_token.attach(&mut request);
                async move { CommentServiceClient::new(channel).apply_events(request).await }
            })
            .await
            .map(|reply| {
                reply
                    .outcomes
                    .iter()
                    .map(service_kit::events::Outcome::from_pb)
                    .collect()
            })
    }
}
