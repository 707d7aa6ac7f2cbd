//! Calls to peers, speaking domain types.

use std::sync::Arc;

use chirp_proto::message::v1::{self as pb, message_service_client::MessageServiceClient};
use service_kit::client::{Idempotency, Peer};
use tonic::Status;

use crate::domain::{MessageId, UserId};

/// Asks message-service whether messages exist.
#[derive(Clone)]
pub struct MessageClient {
    peer: Arc<Peer>,
}

impl MessageClient {
    #[must_use]
    pub fn new(peer: Arc<Peer>) -> Self {
        Self { peer }
    }

    /// The author of a visible message, `None` if there is no such message.
    ///
    /// # Errors
    /// The status of a failed call.
    pub async fn author_of(&self, id: MessageId) -> Result<Option<UserId>, Status> {
        let request = pb::CheckMessageRequest {
            message_id: id.to_string(),
        };
        let reply = self
            .peer
            .call(Idempotency::Idempotent, request, |channel, request| async move {
                MessageServiceClient::new(channel).check_message(request).await
            })
            .await?;
        if !reply.exists {
            return Ok(None);
        }
        UserId::parse("author_id", &reply.author_id)
            .map(Some)
            .map_err(|_| Status::internal("message-service sent a malformed author id"))
    }
}
