//! The rules of user-service, between the gRPC edge and the store: who may do
//! what, and what each operation means. Speaks domain types only.

use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use service_kit::{
    auth::{AuthError, PublicKey, Session as TokenSession, TokenSigner},
    events::{Event, Payload, RevocationReason},
};

use crate::{
    domain::{
        new_user_id, BanReason, Caller, DisplayName, NewUser, Page, PageRequest, Password, Registration, Role, User,
        UserId, UserIds, Username,
    },
    error::{Error, Result},
    password::Hasher,
    store::{Moderated, Standing, Store},
};

/// The earliest instant from which tokens are valid again after a revocation
/// decided now: the next whole second. Token `iat`s are whole seconds, so
/// every token issued up to and within this second is void, and a token
/// issued after the decision is stamped with at least the stored cutoff (see
/// [`issued_at`]); the store moves the cutoff further when an earlier one is
/// not yet past.
fn revocation_cutoff(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_opt(now.timestamp() + 1, 0).single().unwrap_or(now)
}

/// The `iat` of a token issued now to a user whose tokens are valid from
/// `valid_from`: never before it, so a login right after a revocation in the
/// same second is not void itself.
fn issued_at(now: DateTime<Utc>, valid_from: Option<DateTime<Utc>>) -> i64 {
    valid_from.map_or(now.timestamp(), |from| from.timestamp().max(now.timestamp()))
}

fn revoked(user_id: UserId, issued_before: DateTime<Utc>, reason: RevocationReason) -> Event {
    event(Payload::TokensRevoked {
        user_id: user_id.as_uuid(),
        issued_before,
        reason,
    })
}

/// How long a service token for one delivery lives.
const SERVICE_TOKEN_TTL: Duration = Duration::from_secs(300);

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
    /// Keys that signed earlier and still verify during a rotation.
    retired_keys: Vec<PublicKey>,
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
    pub async fn new(
        store: Store,
        hasher: Hasher,
        signer: TokenSigner,
        retired_keys: Vec<PublicKey>,
        admin: Option<AdminAccount>,
    ) -> Result<Self> {
        let decoy = Password::parse("decoy-password-never-matches").map_err(|v| anyhow::anyhow!("{v}"))?;
        let decoy_hash = hasher.hash(decoy).await?;
        Ok(Self {
            store,
            hasher,
            signer,
            admin,
            retired_keys,
            decoy_hash,
        })
    }

    /// Runs when the store first answers: migrations, then the configured
    /// administrator.
    pub async fn prepare_store(&self) -> Result<()> {
        self.store.migrate().await?;
        if let Some(admin) = &self.admin {
            let account = NewUser {
                id: new_user_id(),
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
        if self.admin.as_ref().is_some_and(|a| a.username == registration.username)
            || self.store.username_taken(registration.username.as_str()).await?
        {
            return Err(Error::AlreadyExists("the username is taken"));
        }
        let display_name = match registration.display_name {
            Some(name) => name,
            None => DisplayName::parse(registration.username.as_str())?,
        };
        let user = NewUser {
            id: new_user_id(),
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
        let Some((standing, hash)) = self.store.credentials(username.as_str()).await? else {
            // Spend the same time as a real check before saying no.
            self.hasher.verify(password, self.decoy_hash.clone()).await?;
            return Err(Error::BadCredentials);
        };
        if !self.hasher.verify(password, hash).await? {
            return Err(Error::BadCredentials);
        }
        if standing.user.banned {
            return Err(Error::permission_denied("the account is banned"));
        }
        self.session(standing.user, standing.tokens_valid_from)
    }

    fn session(&self, user: User, valid_from: Option<DateTime<Utc>>) -> Result<Session> {
        let (token, expires_at) = self.signer.issue(
            Caller {
                user_id: user.id.as_uuid(),
                role: user.role,
            },
            issued_at(Utc::now(), valid_from),
        )?;
        Ok(Session {
            token,
            expires_at,
            user,
        })
    }

    /// The caller as this service's own database says they are now: the
    /// token's signature proved who they were when it was issued; whether
    /// they still exist, are banned, hold the role, or ended that session
    /// since, only the database knows. The role returned is the stored one,
    /// never the token's claim.
    pub async fn actor(&self, session: TokenSession) -> Result<Caller> {
        Ok(self.standing_of(session).await?.0)
    }

    async fn standing_of(&self, session: TokenSession) -> Result<(Caller, Standing, String)> {
        let id = UserId::from(session.caller.user_id);
        let Some((standing, hash)) = self.store.standing(id).await? else {
            return Err(AuthError::Revoked.into());
        };
        if standing.user.banned {
            return Err(AuthError::Banned.into());
        }
        if standing
            .tokens_valid_from
            .is_some_and(|from| session.issued_at < from.timestamp())
        {
            return Err(AuthError::Revoked.into());
        }
        let caller = Caller {
            user_id: session.caller.user_id,
            role: standing.user.role,
        };
        Ok((caller, standing, hash))
    }

    /// Changes the caller's password given the current one; every earlier
    /// token is void, and a fresh one comes back.
    pub async fn change_password(&self, session: TokenSession, current: Password, new: Password) -> Result<Session> {
        let (caller, standing, hash) = self.standing_of(session).await?;
        if !self.hasher.verify(current, hash).await? {
            return Err(Error::BadCredentials);
        }
        let id = UserId::from(caller.user_id);
        let new_hash = self.hasher.hash(new).await?;
        let ended = |cutoff| revoked(id, cutoff, RevocationReason::SessionEnded);
        let Some(valid_from) = self
            .store
            .change_password(id, &new_hash, revocation_cutoff(Utc::now()), &ended)
            .await?
        else {
            return Err(AuthError::Revoked.into());
        };
        self.session(standing.user, Some(valid_from))
    }

    pub async fn user(&self, id: UserId) -> Result<User> {
        self.store
            .user(id)
            .await?
            .ok_or(Error::not_found("no user has that id"))
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
            return Err(Error::from(vec![service_kit::validate::violation(
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
            return Err(Error::permission_denied("only admins may change roles"));
        }
        if UserId::from(caller.user_id) == target {
            // Keeps the last admin from demoting themself by accident.
            return Err(Error::permission_denied("admins cannot change their own role"));
        }
        let ended = |cutoff| revoked(target, cutoff, RevocationReason::SessionEnded);
        self.store
            .set_role(target, role, revocation_cutoff(Utc::now()), &ended)
            .await?
            .ok_or(Error::not_found("no user has that id"))
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
            return Err(Error::permission_denied("only moderators and admins may ban or unban"));
        }
        if UserId::from(caller.user_id) == target {
            return Err(Error::permission_denied("users cannot ban or unban themselves"));
        }
        let (user_id, moderator_id) = (target.as_uuid(), caller.user_id);
        // A lifted ban voids tokens too: none can exist from the ban's time,
        // and the older ones should now say "log in again", not "banned".
        let (change, reason) = if ban.is_some() {
            (Payload::UserBanned { user_id, moderator_id }, RevocationReason::Banned)
        } else {
            (
                Payload::UserUnbanned { user_id, moderator_id },
                RevocationReason::SessionEnded,
            )
        };
        let void = |cutoff| revoked(target, cutoff, reason);
        match self
            .store
            .set_banned(
                target,
                ban,
                caller.role,
                revocation_cutoff(Utc::now()),
                &[event(change)],
                &void,
            )
            .await?
        {
            Moderated::Changed(user) | Moderated::Unchanged(user) => Ok(user),
            Moderated::NotAllowed => Err(Error::permission_denied("the user's role is not below the caller's")),
            Moderated::NoSuchUser => Err(Error::not_found("no user has that id")),
        }
    }

    pub async fn delete(&self, caller: Caller, target: UserId) -> Result<()> {
        if UserId::from(caller.user_id) != target && caller.role != Role::Admin {
            return Err(Error::permission_denied(
                "only the user themself or an admin may delete an account",
            ));
        }
        let void = |cutoff| revoked(target, cutoff, RevocationReason::Deleted);
        let deleted = [event(Payload::UserDeleted {
            user_id: target.as_uuid(),
        })];
        if self
            .store
            .delete_user(target, revocation_cutoff(Utc::now()), &void, &deleted)
            .await?
        {
            Ok(())
        } else {
            Err(Error::not_found("no user has that id"))
        }
    }

    /// Revocations that may still void a live token, in (cutoff, user)
    /// order after `after`: at most `limit`.
    pub async fn revocations(
        &self,
        after: Option<(DateTime<Utc>, uuid::Uuid)>,
        limit: u32,
    ) -> Result<Vec<service_kit::revocation::Revocation>> {
        let since = service_kit::revocation::horizon(Utc::now());
        self.store.revocations(since, after, limit).await
    }

    /// The signing key first, then retired keys still verifying.
    #[must_use]
    pub fn public_keys(&self) -> Vec<PublicKey> {
        let signing = self.signer.public_key();
        let retired = self.retired_keys.iter().filter(|k| **k != signing).cloned();
        std::iter::once(signing.clone()).chain(retired).collect()
    }

    /// A short-lived service token for user-service's own deliveries of its
    /// decisions (revocations, bans, erasures; authorised here already). It
    /// opens only the RPCs that apply those events, nothing a user or an
    /// admin may call.
    ///
    /// # Errors
    /// When signing fails (not expected).
    pub fn service_token(&self) -> anyhow::Result<String> {
        self.signer.service_token(Utc::now().timestamp(), SERVICE_TOKEN_TTL)
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
