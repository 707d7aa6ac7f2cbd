//! Where user-service delivers moderation: comment-service purges a banned
//! user's comments, message-service hides (and on unban shows) their
//! messages. Both calls are idempotent, so the relay may repeat them.

use std::sync::Arc;

use chirp_proto::{
    comment::v1::{comment_service_client::CommentServiceClient, PurgeUserCommentsRequest},
    message::v1::{message_service_client::MessageServiceClient, SetUserMessagesHiddenRequest},
};
use service_kit::{
    client::{Idempotency, Peer},
    events::{Event, Payload},
    relay::Destination,
};
use tonic::{metadata::MetadataValue, Status};

use crate::service::Users;

fn bearer(users: &Users) -> Result<MetadataValue<tonic::metadata::Ascii>, Status> {
    let token = users.system_token().map_err(|e| {
        tracing::error!(error = format!("{e:#}"), "signing a system token");
        Status::internal("cannot sign a system token")
    })?;
    format!("Bearer {token}")
        .parse()
        .map_err(|_| Status::internal("a token is not a valid header"))
}

/// PurgeUserComments for every ban.
pub struct CommentPurge {
    pub peer: Arc<Peer>,
    pub users: Arc<Users>,
}

impl Destination for CommentPurge {
    async fn deliver(&self, events: &[Event]) -> Result<(), Status> {
        for event in events {
            let Payload::UserBanned { user_id, .. } = &event.payload else {
                continue;
            };
            let auth = bearer(&self.users)?;
            let request = PurgeUserCommentsRequest {
                user_id: user_id.to_string(),
            };
            self.peer
                .call(Idempotency::Idempotent, request, |channel, mut request| {
                    request.metadata_mut().insert("authorization", auth.clone());
                    async move { CommentServiceClient::new(channel).purge_user_comments(request).await }
                })
                .await?;
        }
        Ok(())
    }
}

/// SetUserMessagesHidden for every ban (hide) and unban (show).
pub struct MessageVisibility {
    pub peer: Arc<Peer>,
    pub users: Arc<Users>,
}

impl Destination for MessageVisibility {
    async fn deliver(&self, events: &[Event]) -> Result<(), Status> {
        for event in events {
            let (user_id, hidden) = match &event.payload {
                Payload::UserBanned { user_id, .. } => (user_id, true),
                Payload::UserUnbanned { user_id, .. } => (user_id, false),
                _ => continue,
            };
            let auth = bearer(&self.users)?;
            let request = SetUserMessagesHiddenRequest {
                user_id: user_id.to_string(),
                hidden,
            };
            self.peer
                .call(Idempotency::Idempotent, request, |channel, mut request| {
                    request.metadata_mut().insert("authorization", auth.clone());
                    async move {
                        MessageServiceClient::new(channel)
                            .set_user_messages_hidden(request)
                            .await
                    }
                })
                .await?;
        }
        Ok(())
    }
}
