//! Calls to peers, speaking domain types.
//!
//! | call | on failure |
//! |---|---|
//! | message-service CheckMessage | AddComment answers UNAVAILABLE |
//! | user-service GetUser (a user's role, for moderation's rank rule) | the moderation is refused with UNAVAILABLE; never guessed |

use std::sync::Arc;

use chirp_proto::{
    message::v1::{self as pb, message_service_client::MessageServiceClient},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use service_kit::{
    auth::Role,
    client::{Idempotency, Peer},
};
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

/// Asks user-service for users' roles.
#[derive(Clone)]
pub struct UserClient {
    peer: Arc<Peer>,
}

impl UserClient {
    #[must_use]
    pub fn new(peer: Arc<Peer>) -> Self {
        Self { peer }
    }

    /// The role of `user`; one who no longer exists holds no rank (`User`).
    ///
    /// # Errors
    /// The status of a failed call.
    pub async fn role(&self, user: UserId) -> Result<Role, Status> {
        let request = upb::GetUserRequest {
            user_id: user.to_string(),
        };
        let reply = self
            .peer
            .call(Idempotency::Idempotent, request, |channel, request| async move {
                UserServiceClient::new(channel).get_user(request).await
            })
            .await;
        match reply {
            Ok(reply) => Ok(match reply.user.map(|u| upb::Role::try_from(u.role)) {
                Some(Ok(upb::Role::Admin)) => Role::Admin,
                Some(Ok(upb::Role::Moderator)) => Role::Moderator,
                _ => Role::User,
            }),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(Role::User),
            Err(status) => Err(status),
        }
    }
}
