//! Conversions between the wire types and the domain types.

use chirp_proto::user::v1 as pb;
use service_kit::{
    domain::PageCursor,
    validate::{violation, AllFields as _},
};

use crate::{
    domain::{DisplayName, PageRequest, Password, Registration, Role, User, UserId, Username},
    error::Error,
};

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = Error;

    fn try_from(r: pb::RegisterRequest) -> Result<Self, Error> {
        let display_name = if r.display_name.trim().is_empty() {
            Ok(None)
        } else {
            DisplayName::parse(&r.display_name).map(Some)
        };
        let (username, password, display_name) =
            (Username::parse(&r.username), Password::parse(&r.password), display_name).all()?;
        Ok(Registration::new(username, password, display_name))
    }
}

pub struct Login {
    pub username: Username,
    pub password: Password,
}

impl TryFrom<pb::LoginRequest> for Login {
    type Error = Error;

    fn try_from(r: pb::LoginRequest) -> Result<Self, Error> {
        let (username, password) = (Username::parse(&r.username), Password::parse_for_login(&r.password)).all()?;
        Ok(Self { username, password })
    }
}

pub struct PasswordChange {
    pub current: Password,
    pub new: Password,
}

impl TryFrom<pb::ChangePasswordRequest> for PasswordChange {
    type Error = Error;

    fn try_from(r: pb::ChangePasswordRequest) -> Result<Self, Error> {
        let named = |field: &str| {
            let field = field.to_owned();
            move |mut e: service_kit::validate::FieldViolation| {
                e.field = field;
                e
            }
        };
        let (current, new) = (
            Password::parse_for_login(&r.current_password).map_err(named("current_password")),
            Password::parse(&r.new_password).map_err(named("new_password")),
        )
            .all()?;
        Ok(Self { current, new })
    }
}

pub struct RoleChange {
    pub user_id: UserId,
    pub role: Role,
}

impl TryFrom<pb::SetRoleRequest> for RoleChange {
    type Error = Error;

    fn try_from(r: pb::SetRoleRequest) -> Result<Self, Error> {
        let role = match pb::Role::try_from(r.role) {
            Ok(pb::Role::User) => Ok(Role::User),
            Ok(pb::Role::Moderator) => Ok(Role::Moderator),
            Ok(pb::Role::Admin) => Ok(Role::Admin),
            Ok(pb::Role::Unspecified) | Err(_) => {
                Err(violation("role", "must be ROLE_USER, ROLE_MODERATOR or ROLE_ADMIN"))
            }
        };
        let (user_id, role) = (UserId::parse("user_id", &r.user_id), role).all()?;
        Ok(Self { user_id, role })
    }
}

/// The user and page of a List* request.
pub fn listing(user_id: &str, page_size: i32, page_token: &str) -> Result<(UserId, PageRequest), Error> {
    Ok((
        UserId::parse("user_id", user_id),
        PageRequest::parse(page_size, page_token),
    )
        .all()?)
}

fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::User => pb::Role::User,
        Role::Moderator => pb::Role::Moderator,
        Role::Admin => pb::Role::Admin,
    }
}

impl From<User> for pb::User {
    fn from(user: User) -> Self {
        Self {
            id: user.id.to_string(),
            username: user.username,
            display_name: user.display_name,
            role: role_to_pb(user.role).into(),
            banned: user.banned,
            create_time: Some(prost_types::Timestamp {
                seconds: user.created_at.timestamp(),
                nanos: i32::try_from(user.created_at.timestamp_subsec_nanos()).unwrap_or(0),
            }),
        }
    }
}

/// Where a page of ListRevocations continues: after this (cutoff, user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevocationCursor {
    pub issued_before: chrono::DateTime<chrono::Utc>,
    pub user_id: uuid::Uuid,
}

impl RevocationCursor {
    pub fn of(last: &service_kit::revocation::Revocation) -> Self {
        Self {
            issued_before: last.issued_before,
            user_id: last.user_id,
        }
    }
}

impl PageCursor for RevocationCursor {
    fn to_cursor(&self) -> String {
        format!("{}/{}", self.issued_before.timestamp_micros(), self.user_id)
    }

    fn from_cursor(text: &str) -> Option<Self> {
        use chrono::TimeZone as _;
        let (micros, user) = text.split_once('/')?;
        let issued_before = chrono::Utc.timestamp_micros(micros.parse().ok()?).single()?;
        let user_id = uuid::Uuid::try_parse(user).ok()?;
        Some(Self { issued_before, user_id })
    }
}

/// A page of ListRevocations.
pub type RevocationPage = service_kit::domain::PageRequest<RevocationCursor>;

/// # Errors
/// Violations of `page_size` and `page_token`.
pub fn revocation_page(r: &pb::ListRevocationsRequest) -> Result<RevocationPage, Error> {
    Ok(RevocationPage::parse(r.page_size, &r.page_token)?)
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use service_kit::testing::props::{number, only_invalid, text, texts, CASES};

    use super::*;
    use crate::domain::{BanReason, UserIds};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn register_requests_parse_or_name_their_bad_fields(username in text(), password in text(), display_name in text()) {
            only_invalid(Registration::try_from(pb::RegisterRequest { username, password, display_name }), &["username", "password", "display_name"]);
        }

        #[test]
        fn login_requests_parse_or_name_their_bad_fields(username in text(), password in text()) {
            only_invalid(Login::try_from(pb::LoginRequest { username, password }), &["username", "password"]);
        }

        #[test]
        fn change_password_requests_parse_or_name_their_bad_fields(current_password in text(), new_password in text()) {
            only_invalid(PasswordChange::try_from(pb::ChangePasswordRequest { current_password, new_password }), &["current_password", "new_password"]);
        }

        #[test]
        fn set_role_requests_parse_or_name_their_bad_fields(user_id in text(), role in number()) {
            only_invalid(RoleChange::try_from(pb::SetRoleRequest { user_id, role }), &["user_id", "role"]);
        }

        #[test]
        fn list_revocations_requests_parse_or_name_their_bad_fields(page_size in number(), page_token in text()) {
            only_invalid(revocation_page(&pb::ListRevocationsRequest { page_size, page_token }), &["page_size", "page_token"]);
        }

        #[test]
        fn follow_listings_parse_or_name_their_bad_fields(user_id in text(), page_size in number(), page_token in text()) {
            // ListFollowing and ListFollowers.
            let r = pb::ListFollowingRequest { user_id, page_size, page_token };
            only_invalid(listing(&r.user_id, r.page_size, &r.page_token), &["user_id", "page_size", "page_token"]);
        }

        #[test]
        fn user_id_requests_parse_or_name_their_bad_fields(user_id in text()) {
            // GetUser, Follow, Unfollow, UnbanUser and DeleteUser carry this one field.
            let r = pb::GetUserRequest { user_id };
            only_invalid(UserId::parse("user_id", &r.user_id).map_err(|v| Error::from(vec![v])), &["user_id"]);
        }

        #[test]
        fn batch_get_users_requests_parse_or_name_their_bad_fields(user_ids in texts()) {
            let r = pb::BatchGetUsersRequest { user_ids };
            only_invalid(UserIds::parse("user_ids", &r.user_ids).map_err(Error::from), &["user_ids"]);
        }

        #[test]
        fn ban_requests_parse_or_name_their_bad_fields(user_id in text(), reason in text()) {
            let r = pb::BanUserRequest { user_id, reason };
            only_invalid(
                (UserId::parse("user_id", &r.user_id), BanReason::parse(&r.reason)).all().map_err(Error::from),
                &["user_id", "reason"],
            );
        }
    }
}
