//! comment-service's domain: values that can only be valid. Nothing here
//! knows prost or the Redis driver.

use chrono::{DateTime, Utc};

pub use service_kit::{
    auth::{Caller, Role},
    domain::{CommentId, MessageId, UserId},
};

/// A comment's text: 1 to 500 characters after trimming, no control
/// characters but newlines and tabs.
pub type Body = service_kit::domain::Body<500>;

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

/// A page's size and the comment the previous one ended with.
pub type PageRequest = service_kit::domain::PageRequest<CommentId>;

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
        service_kit::domain::next_page_token(self.next.as_ref())
    }
}

/// 1 to 100 distinct message ids (`message_ids`).
pub type MessageIds = service_kit::domain::Ids<MessageId>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_1_to_500_characters() {
        assert!(Body::parse(&"ü".repeat(500)).is_ok());
        assert!(Body::parse(&"ü".repeat(501)).is_err());
    }
}
