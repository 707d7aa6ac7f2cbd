//! message-service's domain: values that can only be valid, and the shape of
//! an enriched reply. Nothing here knows prost or the MongoDB driver.

use chrono::{DateTime, TimeZone as _, Utc};

pub use service_kit::{
    auth::{Caller, Role},
    domain::{MessageId, PageCursor, UserId},
};

/// A message's text: 1 to 280 characters after trimming, no control
/// characters but newlines and tabs.
pub type Body = service_kit::domain::Body<280>;

/// The current time at the store's precision (milliseconds), so the instant a
/// client is told is exactly the one stored, in v1 and v2 alike.
#[must_use]
pub fn now() -> DateTime<Utc> {
    let millis = Utc::now().timestamp_millis();
    Utc.timestamp_millis_opt(millis).single().unwrap_or_else(Utc::now)
}

/// A stored message. It holds its author's id, never their name or role
/// (ARCHITECTURE.md invariant 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub author_id: UserId,
    pub body: Body,
    pub created_at: DateTime<Utc>,
}

/// Where a page of messages (newest first) starts: after this message.
/// Ties on time are broken by id, so paging over equal timestamps neither
/// repeats nor skips.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: MessageId,
}

impl Cursor {
    #[must_use]
    pub fn of(message: &Message) -> Self {
        Self {
            created_at: message.created_at,
            id: message.id,
        }
    }
}

impl PageCursor for Cursor {
    fn to_cursor(&self) -> String {
        format!("{}:{}", self.created_at.timestamp_millis(), self.id)
    }

    fn from_cursor(text: &str) -> Option<Self> {
        let (millis, id) = text.split_once(':')?;
        let created_at = Utc.timestamp_millis_opt(millis.parse().ok()?).single()?;
        let id = MessageId::parse("page_token", id).ok()?;
        Some(Self { created_at, id })
    }
}

/// A page's size and the message the previous one ended with.
pub type PageRequest = service_kit::domain::PageRequest<Cursor>;

/// A page of messages, newest first.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

impl<T> Page<T> {
    #[must_use]
    pub fn next_page_token(&self) -> String {
        service_kit::domain::next_page_token(self.next.as_ref())
    }
}

/// A part of a reply that another service owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part<T> {
    Ok(T),
    /// The owner did not answer in time (or at all).
    Unavailable,
    /// The owner answered that the referenced item does not exist.
    NotFound,
}

/// What user-service says about an author.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
    /// For moderation's rank rule; never shown in a reply.
    pub role: service_kit::auth::Role,
}

/// A comment as shown under a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommentPreview {
    pub id: String,
    pub author_id: String,
    pub body: String,
    pub created_at: DateTime<Utc>,
}

/// What comment-service says about a message's comments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comments {
    pub count: i64,
    pub preview: Vec<CommentPreview>,
}

/// A message with the parts its neighbours own.
#[derive(Clone, Debug)]
pub struct Enriched {
    pub message: Message,
    pub author: Part<Author>,
    pub comments: Part<Comments>,
}

/// A home timeline page, and whether it was built from a stale or missing
/// following list.
#[derive(Debug)]
pub struct Timeline {
    pub page: Page<Enriched>,
    pub degraded: bool,
}

#[cfg(test)]
mod tests {
    use service_kit::validate;

    use super::*;

    #[test]
    fn a_cursor_survives_its_page_token() {
        let cursor = Cursor {
            created_at: now(),
            id: MessageId::new(),
        };
        let page = PageRequest::parse(0, &cursor.to_page_token()).unwrap();
        assert_eq!(page.after(), Some(&cursor));
        assert_eq!(page.size(), 20);
    }

    #[test]
    fn forged_page_tokens_are_violations() {
        for raw in [
            validate::encode_page_token("12"),
            validate::encode_page_token("x:y"),
            validate::encode_page_token("12:not-a-uuid"),
            "%%%".to_owned(),
        ] {
            assert!(PageRequest::parse(0, &raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn bodies_are_1_to_280_characters() {
        assert!(Body::parse(&"é".repeat(280)).is_ok());
        assert!(Body::parse(&"é".repeat(281)).is_err());
    }
}
