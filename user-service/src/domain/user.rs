use chrono::{DateTime, Utc};
use service_kit::validate::{self, violation, FieldViolation};

pub use service_kit::domain::UserId;

/// A new user's id: random (UUIDv4), so an id does not tell when its user
/// joined or how many joined before.
#[must_use]
pub fn new_user_id() -> UserId {
    UserId::from(uuid::Uuid::new_v4())
}

/// 3 to 32 of `a-z`, `0-9`, `_`; input is lower-cased, so `Alice` and
/// `alice` are one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub const MIN: usize = 3;
    pub const MAX: usize = 32;

    /// # Errors
    /// A violation of `username`.
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        let name = raw.trim().to_ascii_lowercase();
        let len = name.chars().count();
        if !(Self::MIN..=Self::MAX).contains(&len) {
            return Err(violation(
                "username",
                format!("must be {} to {} characters", Self::MIN, Self::MAX),
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(violation("username", "may contain only letters a-z, digits and '_'"));
        }
        Ok(Self(name))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What others see as a user's name: 1 to 50 characters of text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    /// # Errors
    /// A violation of `display_name`.
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        validate::text("display_name", raw, 1, 50).map(Self)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password as typed: 8 to 128 characters. Never logged: `Debug` hides it.
#[derive(Clone)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(…)")
    }
}

impl Password {
    pub const MIN: usize = 8;
    pub const MAX: usize = 128;

    /// # Errors
    /// A violation of `password`.
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        let len = raw.chars().take(Self::MAX + 1).count();
        if !(Self::MIN..=Self::MAX).contains(&len) {
            return Err(violation(
                "password",
                format!("must be {} to {} characters", Self::MIN, Self::MAX),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// For login, where any length below the maximum is checked against the
    /// stored hash rather than rejected, so old rules cannot lock users out.
    ///
    /// # Errors
    /// A violation of `password` when empty or longer than the maximum.
    pub fn parse_for_login(raw: &str) -> Result<Self, FieldViolation> {
        let len = raw.chars().take(Self::MAX + 1).count();
        if len == 0 || len > Self::MAX {
            return Err(violation("password", format!("must be 1 to {} characters", Self::MAX)));
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Why a user was banned: up to 500 characters, may be empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BanReason(String);

impl BanReason {
    /// # Errors
    /// A violation of `reason`.
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        if raw.trim().is_empty() {
            return Ok(Self(String::new()));
        }
        validate::text("reason", raw, 1, 500).map(Self)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A valid registration request.
#[derive(Debug)]
pub struct Registration {
    pub(crate) username: Username,
    pub(crate) password: Password,
    pub(crate) display_name: Option<DisplayName>,
}

impl Registration {
    #[must_use]
    pub fn new(username: Username, password: Password, display_name: Option<DisplayName>) -> Self {
        Self {
            username,
            password,
            display_name,
        }
    }
}

/// A user about to be stored: the password already hashed.
#[derive(Debug)]
pub struct NewUser {
    pub id: UserId,
    pub username: Username,
    pub display_name: DisplayName,
    pub password_hash: String,
    pub role: Role,
}

use super::Role;

/// A stored user, as others may see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
    pub role: Role,
    pub banned: bool,
    pub created_at: DateTime<Utc>,
}

/// 1 to 100 distinct user ids, for batch reads (`user_ids`).
pub type UserIds = service_kit::domain::Ids<UserId>;

/// Which page of a list: its size and the user the previous one ended with.
pub type PageRequest = service_kit::domain::PageRequest<UserId>;

/// One page of users and, unless it is the last, the token of the next.
#[derive(Debug)]
pub struct Page {
    pub users: Vec<User>,
    pub next: Option<UserId>,
}

impl Page {
    /// The opaque token for the next page, empty on the last one.
    #[must_use]
    pub fn next_page_token(&self) -> String {
        service_kit::domain::next_page_token(self.next.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_lower_cased_and_limited_to_a_safe_alphabet() {
        assert_eq!(Username::parse(" Alice_1 ").unwrap().as_str(), "alice_1");
        assert!(Username::parse("al").is_err());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        assert!(Username::parse("al ice").is_err());
        assert!(Username::parse("élodie").is_err());
    }

    #[test]
    fn passwords_count_characters_and_never_show_in_debug_output() {
        assert!(Password::parse("ééééééé").is_err(), "7 characters, 14 bytes");
        assert!(Password::parse("éééééééé").is_ok());
        assert!(Password::parse(&"x".repeat(129)).is_err());
        assert_eq!(format!("{:?}", Password::parse("secret-pw").unwrap()), "Password(…)");
    }
}
