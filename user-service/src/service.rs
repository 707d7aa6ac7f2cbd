//! The rules of user-service, between the gRPC edge and the store: who may do
//! what, and what each operation means. Speaks domain types only.

use chrono::Utc;
use service_kit::{
    auth::{PublicKey, TokenSigner},
    events::{Event, Payload},
};

use crate::{
    domain::{
        BanReason, Caller, DisplayName, NewUser, Page, PageRequest, Password, Registration, Role, User, UserId,
        UserIds, Username,
    },
    error::{Error, Result},
    password::Hasher,
    store::{Moderated, Store},
};

/// Producer name in the events this service writes.
pub const PRODUCER: &str = "user-service";

fn event(payload: Payload) -> Event {
    Event::new(PRODUCER, payload)
}

/// The configured first administrator.
#[derive(Clone, Debug)]
pub struct AdminAccount {
    pub username: Username,
    pub password: Password,
}

pub struct Users {
    store: Store,
    hasher: Hasher,
    signer: TokenSigner,
    admin: Option<AdminAccount>,
    /// A real hash to verify against when the username is unknown, so a
    /// failed login takes as long whether or not the account exists.
    decoy_hash: String,
}

/// A successful login.
pub struct Session {
    pub token: String,
    pub expires_at: i64,
    pub user: User,
}

impl Users {
    /// # Errors
    /// When the decoy hash cannot be made.
    pub async fn new(store: Store, hasher: Hasher, signer: TokenSigner, admin: Option<AdminAccount>) -> Result<Self> {
        let decoy = Password::parse("decoy-password-never-matches").map_err(|v| anyhow::anyhow!("{v}"))?;
        let decoy_hash = hasher.hash(decoy).await?;
        Ok(Self {
            store,
            hasher,
            signer,
            admin,
            decoy_hash,
        })
    }

    /// Runs when the store first answers: migrations, then the configured
    /// administrator.
    pub async fn prepare_store(&self) -> Result<()> {
        self.store.migrate().await?;
        if let Some(admin) = &self.admin {
            let account = NewUser {
                id: UserId::new_random(),
                username: admin.username.clone(),
                display_name: DisplayName::parse(admin.username.as_str())?,
                password_hash: self.hasher.hash(admin.password.clone()).await?,
                role: Role::Admin,
            };
            self.store.ensure_admin(&account).await?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    pub async fn register(&self, registration: Registration) -> Result<User> {
        if self.admin.as_ref().is_some_and(|a| a.username == registration.username) {
            return Err(Error::AlreadyExists("the username is taken"));
        }
        let display_name = match registration.display_name {
            Some(name) => name,
            None => DisplayName::parse(registration.username.as_str())?,
        };
        let user = NewUser {
            id: UserId::new_random(),
            username: registration.username,
            display_name,
            password_hash: self.hasher.hash(registration.password).await?,
            role: Role::User,
        };
        let registered = event(Payload::UserRegistered {
            user_id: user.id.as_uuid(),
        });
        self.store.insert_user(&user, &registered).await
    }

    pub async fn login(&self, username: &Username, password: Password) -> Result<Session> {
        let Some((user, hash)) = self.store.credentials(username.as_str()).await? else {
            // Spend the same time as a real check before saying no.
            self.hasher.verify(password, self.decoy_hash.clone()).await?;
            return Err(Error::BadCredentials);
        };
        if !self.hasher.verify(password, hash).await? {
            return Err(Error::BadCredentials);
        }
        if user.banned {
            return Err(Error::PermissionDenied("the account is banned"));
        }
        let (token, expires_at) = self.signer.issue(
            Caller {
                user_id: user.id.as_uuid(),
                role: user.role,
            },
            Utc::now().timestamp(),
        )?;
        Ok(Session {
            token,
            expires_at,
            user,
        })
    }

    pub async fn user(&self, id: UserId) -> Result<User> {
        self.store.user(id).await?.ok_or(Error::NotFound("no user has that id"))
    }

    /// Found users, and the requested ids that have none.
    pub async fn users(&self, ids: &UserIds) -> Result<(Vec<User>, Vec<UserId>)> {
        let users = self.store.users(ids.as_slice()).await?;
        let missing = ids
            .as_slice()
            .iter()
            .filter(|id| !users.iter().any(|u| u.id == **id))
            .copied()
            .collect();
        Ok((users, missing))
    }

    pub async fn follow(&self, caller: Caller, followee: UserId) -> Result<()> {
        let follower = UserId::from(caller.user_id);
        if follower == followee {
            return Err(Error::InvalidArgument(vec![service_kit::validate::violation(
                "user_id",
                "users cannot follow themselves",
            )]));
        }
        let followed = event(Payload::UserFollowed {
            follower_id: follower.as_uuid(),
            followee_id: followee.as_uuid(),
        });
        self.store.follow(follower, followee, &followed).await
    }

    pub async fn unfollow(&self, caller: Caller, followee: UserId) -> Result<()> {
        let unfollowed = event(Payload::UserUnfollowed {
            follower_id: caller.user_id,
            followee_id: followee.as_uuid(),
        });
        self.store.unfollow(caller.user_id.into(), followee, &unfollowed).await
    }

    pub async fn following(&self, user: UserId, page: PageRequest) -> Result<Page> {
        self.store.following(user, page).await
    }

    pub async fn followers(&self, user: UserId, page: PageRequest) -> Result<Page> {
        self.store.followers(user, page).await
    }

    pub async fn set_role(&self, caller: Caller, target: UserId, role: Role) -> Result<User> {
        if caller.role != Role::Admin {
            return Err(Error::PermissionDenied("only admins may change roles"));
        }
        if UserId::from(caller.user_id) == target {
            // Keeps the last admin from demoting themself by accident.
            return Err(Error::PermissionDenied("admins cannot change their own role"));
        }
        self.store
            .set_role(target, role)
            .await?
            .ok_or(Error::NotFound("no user has that id"))
    }

    pub async fn ban(&self, caller: Caller, target: UserId, reason: &BanReason) -> Result<User> {
        self.moderate(caller, target, Some(reason)).await
    }

    pub async fn unban(&self, caller: Caller, target: UserId) -> Result<User> {
        self.moderate(caller, target, None).await
    }

    /// Moderators and admins act only on users whose role is below their own.
    async fn moderate(&self, caller: Caller, target: UserId, ban: Option<&BanReason>) -> Result<User> {
        if !caller.role.can_moderate() {
            return Err(Error::PermissionDenied("only moderators and admins may ban or unban"));
        }
        if UserId::from(caller.user_id) == target {
            return Err(Error::PermissionDenied("users cannot ban or unban themselves"));
        }
        let (user_id, moderator_id) = (target.as_uuid(), caller.user_id);
        let change = event(if ban.is_some() {
            Payload::UserBanned { user_id, moderator_id }
        } else {
            Payload::UserUnbanned { user_id, moderator_id }
        });
        match self.store.set_banned(target, ban, caller.role, &change).await? {
            Moderated::Changed(user) | Moderated::Unchanged(user) => Ok(user),
            Moderated::NotAllowed => Err(Error::PermissionDenied("the user's role is not below the caller's")),
            Moderated::NoSuchUser => Err(Error::NotFound("no user has that id")),
        }
    }

    pub async fn delete(&self, caller: Caller, target: UserId) -> Result<()> {
        if UserId::from(caller.user_id) != target && caller.role != Role::Admin {
            return Err(Error::PermissionDenied(
                "only the user themself or an admin may delete an account",
            ));
        }
        let deleted = event(Payload::UserDeleted {
            user_id: target.as_uuid(),
        });
        if self.store.delete_user(target, &deleted).await? {
            Ok(())
        } else {
            Err(Error::NotFound("no user has that id"))
        }
    }

    #[must_use]
    pub fn public_keys(&self) -> Vec<PublicKey> {
        vec![self.signer.public_key()]
    }

    /// A short-lived admin token for user-service itself, to act on other
    /// services when delivering moderation (the decision was authorised
    /// here already). Its subject is the nil UUID, which no user has.
    ///
    /// # Errors
    /// When signing fails (not expected).
    pub fn system_token(&self) -> anyhow::Result<String> {
        let now = Utc::now().timestamp();
        self.signer.sign(&service_kit::auth::Claims {
            sub: uuid::Uuid::nil().to_string(),
            role: Role::Admin,
            iss: service_kit::auth::ISSUER.to_owned(),
            iat: now,
            exp: now + 300,
        })
    }
}

impl service_kit::store::Probe for Users {
    async fn prepare(&self) -> anyhow::Result<()> {
        Ok(self.prepare_store().await?)
    }

    async fn ping(&self) -> anyhow::Result<()> {
        Ok(Users::ping(self).await?)
    }
}
