use std::{collections::HashMap, sync::Arc};

use chirp_proto::user::v1::{self as pb, user_service_client::UserServiceClient};
use service_kit::{
    auth::Role,
    client::{Idempotency, Peer},
};
use tonic::Status;

use crate::domain::{Author, UserId};

/// Most followees a timeline reads (ten pages of user-service's maximum).
/// Beyond it, a timeline shows the first ones; following more is unusual
/// enough that a fan-out-on-write design would be the answer, not this.
const MAX_FOLLOWING: usize = 1_000;

#[derive(Clone)]
pub struct UserClient {
    peer: Arc<Peer>,
}

impl UserClient {
    #[must_use]
    pub fn new(peer: Arc<Peer>) -> Self {
        Self { peer }
    }

    /// Authors by id, in one call; ids user-service does not know are absent.
    ///
    /// # Errors
    /// The status of a failed call.
    pub async fn authors(&self, ids: &[UserId]) -> Result<HashMap<UserId, Author>, Status> {
        let request = pb::BatchGetUsersRequest {
            user_ids: ids.iter().map(ToString::to_string).collect(),
        };
        let reply = self
            .peer
            .call(Idempotency::Idempotent, request, |channel, request| async move {
                UserServiceClient::new(channel).batch_get_users(request).await
            })
            .await?;
        Ok(reply
            .users
            .into_iter()
            .filter_map(|u| {
                let id = UserId::parse("id", &u.id).ok()?;
                Some((
                    id,
                    Author {
                        id,
                        username: u.username,
                        display_name: u.display_name,
                        role: match pb::Role::try_from(u.role) {
                            Ok(pb::Role::Admin) => Role::Admin,
                            Ok(pb::Role::Moderator) => Role::Moderator,
                            _ => Role::User,
                        },
                    },
                ))
            })
            .collect())
    }

    /// The role of `user`, for the rank rule of moderation; a user who no
    /// longer exists holds no rank (`User`).
    ///
    /// # Errors
    /// The status of a failed call: the caller must then refuse, not guess.
    pub async fn role(&self, user: UserId) -> Result<Role, Status> {
        Ok(self.authors(&[user]).await?.get(&user).map_or(Role::User, |a| a.role))
    }

    /// Everyone `user` follows, up to [`MAX_FOLLOWING`].
    ///
    /// # Errors
    /// The status of the first failed page.
    pub async fn following(&self, user: UserId) -> Result<Vec<UserId>, Status> {
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListFollowingRequest {
                user_id: user.to_string(),
                page_size: 100,
                page_token,
            };
            let reply = self
                .peer
                .call(Idempotency::Idempotent, request, |channel, request| async move {
                    UserServiceClient::new(channel).list_following(request).await
                })
                .await?;
            ids.extend(reply.users.iter().filter_map(|u| UserId::parse("id", &u.id).ok()));
            if reply.next_page_token.is_empty() || ids.len() >= MAX_FOLLOWING {
                ids.truncate(MAX_FOLLOWING);
                return Ok(ids);
            }
            page_token = reply.next_page_token;
        }
    }
}
