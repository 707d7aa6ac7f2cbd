//! comment-service's domain: values that can only be valid. Nothing here
//! knows prost or the Redis driver.

use chrono::{DateTime, TimeZone as _, Utc};
use service_kit::validate::{self, FieldViolation};
use uuid::Uuid;

pub use service_kit::auth::{Caller, Role};

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// # Errors
            /// A violation of `field`.
            pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
                validate::uuid(field, raw).map(Self)
            }

            #[must_use]
            pub fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A comment's id: a UUIDv7, so ids sort by creation time, which is what
    /// lets comments page in time order with plain lexicographic ranges.
    CommentId
);
uuid_id!(
    /// A message's id, as message-service issues them.
    MessageId
);
uuid_id!(
    /// A user's id, as user-service issues them.
    UserId
);

impl CommentId {
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// When the id was made (to the millisecond).
    #[must_use]
    pub fn created_at(self) -> DateTime<Utc> {
        let millis = self
            .0
            .get_timestamp()
            .map(|t| {
                let (secs, nanos) = t.to_unix();
                i64::try_from(secs).unwrap_or(0) * 1000 + i64::from(nanos / 1_000_000)
            })
            .unwrap_or(0);
        Utc.timestamp_millis_opt(millis).single().unwrap_or_default()
    }
}

impl Default for CommentId {
    fn default() -> Self {
        Self::new()
    }
}

/// A comment's text: 1 to 500 characters after trimming, no control
/// characters but newlines and tabs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Body(String);

impl Body {
    pub const MAX: usize = 500;

    /// # Errors
    /// A violation of `body`.
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        validate::text("body", raw, 1, Self::MAX).map(Self)
    }

    /// For text read back from the store, which was valid when written.
    #[must_use]
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored comment: references to its message and author, never copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment {
    pub id: CommentId,
    pub message_id: MessageId,
    pub author_id: UserId,
    /// Who wrote the message, as message-service said when the comment was
    /// accepted; carried into events so consumers need not ask.
    pub message_author_id: UserId,
    pub body: Body,
}

impl Comment {
    #[must_use]
    pub fn created_at(&self) -> DateTime<Utc> {
        self.id.created_at()
    }
}

/// A page's size and where the previous one ended.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest {
    pub size: u32,
    pub after: Option<CommentId>,
}

impl PageRequest {
    /// # Errors
    /// Violations of `page_size` and `page_token`.
    pub fn parse(page_size: i32, page_token: &str) -> Result<Self, Vec<FieldViolation>> {
        let (size, after) = validate::page_after(page_size, page_token, |id| CommentId::parse("page_token", id))?;
        Ok(Self { size, after })
    }
}

/// A page of comments, oldest first.
#[derive(Debug)]
pub struct Page {
    pub comments: Vec<Comment>,
    pub next: Option<CommentId>,
    /// Comments the message has in all.
    pub total: i64,
}

impl Page {
    #[must_use]
    pub fn next_page_token(&self) -> String {
        self.next
            .map(|id| validate::encode_page_token(&id.to_string()))
            .unwrap_or_default()
    }
}

/// 1 to 100 distinct message ids.
#[derive(Debug)]
pub struct MessageIds(Vec<MessageId>);

impl MessageIds {
    pub const MAX: usize = 100;

    /// # Errors
    /// Violations of `message_ids` or `message_ids[i]`.
    pub fn parse(raw: &[String]) -> Result<Self, Vec<FieldViolation>> {
        validate::uuid_list("message_ids", raw, Self::MAX).map(|ids| Self(ids.into_iter().map(MessageId).collect()))
    }

    #[must_use]
    pub fn as_slice(&self) -> &[MessageId] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_ids_sort_by_creation_time_and_tell_it() {
        let first = CommentId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = CommentId::new();
        assert!(first.to_string() < second.to_string());
        assert!(first.created_at() <= second.created_at());
        assert!((Utc::now() - second.created_at()).num_seconds().abs() < 5);
    }

    #[test]
    fn bodies_are_1_to_500_characters() {
        assert!(Body::parse(&"ü".repeat(500)).is_ok());
        assert!(Body::parse(&"ü".repeat(501)).is_err());
        assert!(Body::parse("\u{0}").is_err());
    }
}
