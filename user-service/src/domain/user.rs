use chrono::{DateTime, Utc};
use service_kit::validate::{self, violation, FieldViolation};
use uuid::Uuid;

/// A user's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Uuid);

impl UserId {
    /// # Errors
    /// A violation of `field` when `raw` is not a UUID.
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        validate::uuid(field, raw).map(Self)
    }

    #[must_use]
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    #[must_use]
    pub fn as_uuid(self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for UserId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
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

/// 1 to 100 distinct user ids, for batch reads.
#[derive(Debug)]
pub struct UserIds(Vec<UserId>);

impl UserIds {
    pub const MAX: usize = 100;

    /// # Errors
    /// Violations of `user_ids[i]` for each bad id, or of `user_ids` when the
    /// list is empty or too long.
    pub fn parse(raw: &[String]) -> Result<Self, Vec<FieldViolation>> {
        validate::uuid_list("user_ids", raw, Self::MAX).map(|ids| Self(ids.into_iter().map(UserId).collect()))
    }

    #[must_use]
    pub fn as_slice(&self) -> &[UserId] {
        &self.0
    }
}

/// Which page of a list: its size and where the previous one ended.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest {
    pub size: u32,
    pub after: Option<UserId>,
}

impl PageRequest {
    /// # Errors
    /// Violations of `page_size` and `page_token`.
    pub fn parse(page_size: i32, page_token: &str) -> Result<Self, Vec<FieldViolation>> {
        let (size, after) = validate::page_after(page_size, page_token, |id| UserId::parse("page_token", id))?;
        Ok(Self { size, after })
    }
}

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
        self.next
            .map(|id| validate::encode_page_token(&id.to_string()))
            .unwrap_or_default()
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

    #[test]
    fn user_id_lists_are_bounded_deduplicated_and_report_each_bad_index() {
        let id = Uuid::new_v4().to_string();
        assert_eq!(UserIds::parse(&[id.clone(), id.clone()]).unwrap().as_slice().len(), 1);
        assert!(UserIds::parse(&[]).is_err());
        assert!(UserIds::parse(&vec![id.clone(); 101]).is_err());
        let errors = UserIds::parse(&[id, "x".into(), "y".into()]).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["user_ids[1]", "user_ids[2]"]);
    }

    #[test]
    fn page_requests_reject_foreign_tokens() {
        let token = validate::encode_page_token("not-a-uuid");
        assert!(PageRequest::parse(0, &token).is_err());
        let id = UserId::new_random();
        let token = validate::encode_page_token(&id.to_string());
        assert_eq!(PageRequest::parse(5, &token).unwrap().after, Some(id));
    }
}
