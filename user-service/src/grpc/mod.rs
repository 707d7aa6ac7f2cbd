//! The gRPC edge of user-service: requests become domain values here (or
//! INVALID_ARGUMENT), replies are built here, and [`Error`] becomes a
//! [`Status`] in exactly one place.

mod convert;

use std::sync::Arc;

use chirp_proto::user::v1::{self as pb, user_service_server::UserService};
use service_kit::auth::TokenVerifier;
use service_kit::validate::AllFields as _;
use tonic::{Request, Response, Status};

use crate::{
    domain::{BanReason, Caller, UserId, UserIds},
    error::Error,
    limits::AuthLimits,
    service::Users,
};

/// Largest request user-service accepts: BatchGetUsers' 100 ids (under
/// 4 KiB) is the largest valid one; a Register of the longest username,
/// password and display name, in 4-byte characters, is under 1 KiB.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

pub use pb::user_service_server::UserServiceServer;

pub struct UserApi {
    users: Arc<Users>,
    verifier: TokenVerifier,
    limits: Arc<AuthLimits>,
    /// The producers' shared secret: what opens ListRevocations.
    ingest_token: String,
}

impl UserApi {
    #[must_use]
    pub fn new(users: Arc<Users>, limits: Arc<AuthLimits>, ingest_token: String) -> Self {
        let verifier = TokenVerifier::with_keys(&users.public_keys());
        Self {
            users,
            verifier,
            limits,
            ingest_token,
        }
    }

    /// The caller as the database says they are now (see
    /// [`Users::actor`]): the token proves identity, the store decides.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        let session = self.verifier.authenticate_session(request.metadata()).await?;
        self.users.actor(session).await
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl UserService for UserApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Reply<pb::RegisterResponse> {
        let address = request.remote_addr().map(|a| a.ip());
        let registration = request.into_inner().try_into()?;
        self.limits.address(address)?;
        let user = self.users.register(registration).await?;
        Ok(Response::new(pb::RegisterResponse {
            user: Some(user.into()),
        }))
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Reply<pb::ListRevocationsResponse> {
        if !service_kit::relay::presents_ingest_token(request.metadata(), &self.ingest_token) {
            return Err(Error::bad_ingest_token().into());
        }
        let page = convert::revocation_page(request.get_ref())?;
        let after = page.after().map(|c| (c.issued_before, c.user_id));
        let size = page.size();
        let mut revocations = self.users.revocations(after, size + 1).await?;
        let next_page_token = if revocations.len() > size as usize {
            revocations.truncate(size as usize);
            let last = revocations.last().map(convert::RevocationCursor::of);
            service_kit::domain::next_page_token(last.as_ref())
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRevocationsResponse {
            revocations: revocations
                .iter()
                .map(service_kit::revocation::Revocation::to_pb)
                .collect(),
            next_page_token,
        }))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Reply<pb::LoginResponse> {
        let address = request.remote_addr().map(|a| a.ip());
        let convert::Login { username, password } = request.into_inner().try_into()?;
        self.limits.address(address)?;
        self.limits.username(&username)?;
        let session = self.users.login(&username, password).await?;
        Ok(Response::new(pb::LoginResponse {
            access_token: session.token,
            expire_time: Some(prost_types::Timestamp {
                seconds: session.expires_at,
                nanos: 0,
            }),
            user: Some(session.user.into()),
        }))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Reply<pb::GetUserResponse> {
        let id = UserId::parse("user_id", &request.get_ref().user_id).map_err(Error::from)?;
        let user = self.users.user(id).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn batch_get_users(&self, request: Request<pb::BatchGetUsersRequest>) -> Reply<pb::BatchGetUsersResponse> {
        let ids = UserIds::parse("user_ids", &request.get_ref().user_ids).map_err(Error::from)?;
        let (users, missing) = self.users.users(&ids).await?;
        Ok(Response::new(pb::BatchGetUsersResponse {
            users: users.into_iter().map(Into::into).collect(),
            missing_user_ids: missing.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn follow(&self, request: Request<pb::FollowRequest>) -> Reply<pb::FollowResponse> {
        let caller = self.caller(&request).await?;
        let target = UserId::parse("user_id", &request.get_ref().user_id).map_err(Error::from)?;
        self.users.follow(caller, target).await?;
        Ok(Response::new(pb::FollowResponse {}))
    }

    async fn unfollow(&self, request: Request<pb::UnfollowRequest>) -> Reply<pb::UnfollowResponse> {
        let caller = self.caller(&request).await?;
        let target = UserId::parse("user_id", &request.get_ref().user_id).map_err(Error::from)?;
        self.users.unfollow(caller, target).await?;
        Ok(Response::new(pb::UnfollowResponse {}))
    }

    async fn list_following(&self, request: Request<pb::ListFollowingRequest>) -> Reply<pb::ListFollowingResponse> {
        let r = request.into_inner();
        let (user, page) = convert::listing(&r.user_id, r.page_size, &r.page_token)?;
        let page = self.users.following(user, page).await?;
        Ok(Response::new(pb::ListFollowingResponse {
            next_page_token: page.next_page_token(),
            users: page.users.into_iter().map(Into::into).collect(),
        }))
    }

    async fn list_followers(&self, request: Request<pb::ListFollowersRequest>) -> Reply<pb::ListFollowersResponse> {
        let r = request.into_inner();
        let (user, page) = convert::listing(&r.user_id, r.page_size, &r.page_token)?;
        let page = self.users.followers(user, page).await?;
        Ok(Response::new(pb::ListFollowersResponse {
            next_page_token: page.next_page_token(),
            users: page.users.into_iter().map(Into::into).collect(),
        }))
    }

    async fn set_role(&self, request: Request<pb::SetRoleRequest>) -> Reply<pb::SetRoleResponse> {
        let caller = self.caller(&request).await?;
        let convert::RoleChange { user_id, role } = request.into_inner().try_into()?;
        let user = self.users.set_role(caller, user_id, role).await?;
        Ok(Response::new(pb::SetRoleResponse {
            user: Some(user.into()),
        }))
    }

    async fn ban_user(&self, request: Request<pb::BanUserRequest>) -> Reply<pb::BanUserResponse> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let (target, reason) = (UserId::parse("user_id", &r.user_id), BanReason::parse(&r.reason))
            .all()
            .map_err(Error::from)?;
        let user = self.users.ban(caller, target, &reason).await?;
        Ok(Response::new(pb::BanUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn unban_user(&self, request: Request<pb::UnbanUserRequest>) -> Reply<pb::UnbanUserResponse> {
        let caller = self.caller(&request).await?;
        let target = UserId::parse("user_id", &request.get_ref().user_id).map_err(Error::from)?;
        let user = self.users.unban(caller, target).await?;
        Ok(Response::new(pb::UnbanUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn delete_user(&self, request: Request<pb::DeleteUserRequest>) -> Reply<pb::DeleteUserResponse> {
        let caller = self.caller(&request).await?;
        let target = UserId::parse("user_id", &request.get_ref().user_id).map_err(Error::from)?;
        self.users.delete(caller, target).await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn change_password(&self, request: Request<pb::ChangePasswordRequest>) -> Reply<pb::ChangePasswordResponse> {
        let session = self
            .verifier
            .authenticate_session(request.metadata())
            .await
            .map_err(Error::from)?;
        let convert::PasswordChange { current, new } = request.into_inner().try_into()?;
        let session = self.users.change_password(session, current, new).await?;
        Ok(Response::new(pb::ChangePasswordResponse {
            access_token: session.token,
            expire_time: Some(prost_types::Timestamp {
                seconds: session.expires_at,
                nanos: 0,
            }),
        }))
    }

    async fn get_public_keys(&self, _request: Request<pb::GetPublicKeysRequest>) -> Reply<pb::GetPublicKeysResponse> {
        Ok(Response::new(pb::GetPublicKeysResponse {
            keys: self
                .users
                .public_keys()
                .into_iter()
                .map(|key| pb::PublicKey {
                    key_id: key.key_id,
                    algorithm: "EdDSA".to_owned(),
                    public_key: key.bytes.to_vec(),
                })
                .collect(),
        }))
    }
}

/// The one place an [`Error`] becomes a [`Status`]: the failures every
/// service shares through [`Common::into_status`](crate::error::Common::into_status),
/// which logs causes and never sends them, and this service's own here.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Common(common) => common.into_status(),
            Error::BadCredentials => Status::unauthenticated(err.to_string()),
            Error::AlreadyExists(what) => Status::already_exists(what),
            Error::RateLimited { retry_after, .. } => {
                service_kit::validate::resource_exhausted(err.to_string(), retry_after)
            }
        }
    }
}
