//! Where user-service delivers its decisions: revocations, bans, unbans and
//! erasures go to message-service (ApplyUserEvents: void tokens, hide or show
//! messages, erase them) and comment-service (ApplyEvents: void tokens,
//! purge comments, erase them). Both apply each event idempotently, so the
//! relay may repeat a batch; both accept only user-service's service token.

use std::sync::Arc;

use chirp_proto::{
    comment::v1::{comment_service_client::CommentServiceClient, ApplyEventsRequest},
    message::v1::{message_service_client::MessageServiceClient, ApplyUserEventsRequest},
};
use service_kit::{
    client::{Idempotency, Peer},
    events::{Event, Outcome},
    relay::Destination,
};
use tonic::{metadata::MetadataValue, Status};

use crate::service::Users;

fn bearer(users: &Users) -> Result<MetadataValue<tonic::metadata::Ascii>, Status> {
    let token = users.service_token().map_err(|e| {
        tracing::error!(error = format!("{e:#}"), "signing a service token");
        Status::internal("cannot sign a service token")
    })?;
    format!("Bearer {token}")
        .parse()
        .map_err(|_| Status::internal("a token is not a valid header"))
}

/// comment-service's ApplyEvents.
pub struct CommentService {
    pub peer: Arc<Peer>,
    pub users: Arc<Users>,
}

impl Destination for CommentService {
    async fn deliver(&self, events: &[Event]) -> Result<Vec<Outcome>, Status> {
        let auth = bearer(&self.users)?;
        let request = ApplyEventsRequest {
            events: events.iter().map(Event::to_pb).collect(),
        };
        self.peer
            .call(Idempotency::Idempotent, request, |channel, mut request| {
                request.metadata_mut().insert("authorization", auth.clone());
                async move { CommentServiceClient::new(channel).apply_events(request).await }
            })
            .await
            .map(|reply| reply.outcomes.iter().map(Outcome::from_pb).collect())
    }
}

/// message-service's ApplyUserEvents.
pub struct MessageService {
    pub peer: Arc<Peer>,
    pub users: Arc<Users>,
}

impl Destination for MessageService {
    async fn deliver(&self, events: &[Event]) -> Result<Vec<Outcome>, Status> {
        let auth = bearer(&self.users)?;
        let request = ApplyUserEventsRequest {
            events: events.iter().map(Event::to_pb).collect(),
        };
        self.peer
            .call(Idempotency::Idempotent, request, |channel, mut request| {
                request.metadata_mut().insert("authorization", auth.clone());
                async move { MessageServiceClient::new(channel).apply_user_events(request).await }
            })
            .await
            .map(|reply| reply.outcomes.iter().map(Outcome::from_pb).collect())
    }
}
