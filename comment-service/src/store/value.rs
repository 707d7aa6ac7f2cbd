//! A comment as one Redis string, so that a page of comments is one `MGET`:
//! `<message_id> <author_id> <message_author_id> <body>`, the three ids in
//! their 36-character form. The comment's own id is its key's.

use crate::{
    domain::{Body, Comment, CommentId, MessageId, UserId},
    error::{Error, Result},
};

const ID: usize = 36;

#[must_use]
pub fn encode(comment: &Comment) -> String {
    let body = comment.body.as_str();
    let mut value = String::with_capacity(3 * (ID + 1) + body.len());
    for id in [
        comment.message_id.to_string(),
        comment.author_id.to_string(),
        comment.message_author_id.to_string(),
    ] {
        value.push_str(&id);
        value.push(' ');
    }
    value.push_str(body);
    value
}

/// The comment `id` whose stored value is `value`.
///
/// # Errors
/// When the value is not one this module wrote.
pub fn decode(id: CommentId, value: &str) -> Result<Comment> {
    let corrupt = || Error::internal(anyhow::anyhow!("Redis holds a malformed comment {id}"));
    let mut fields = value.splitn(4, ' ');
    let mut next = || fields.next().ok_or_else(corrupt);
    let (message, author, message_author, body) = (next()?, next()?, next()?, next()?);
    Ok(Comment {
        id,
        message_id: MessageId::parse("message_id", message).map_err(|_| corrupt())?,
        author_id: UserId::parse("author_id", author).map_err(|_| corrupt())?,
        message_author_id: UserId::parse("message_author_id", message_author).map_err(|_| corrupt())?,
        body: Body::from_stored(body.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comment_reads_back_as_written_whatever_its_body_holds() {
        let comment = Comment {
            id: CommentId::new(),
            message_id: MessageId::new(),
            author_id: UserId::from(uuid::Uuid::new_v4()),
            message_author_id: UserId::from(uuid::Uuid::new_v4()),
            body: Body::parse("spaces  and\nlines: 🐦 ").unwrap(),
        };
        let back = decode(comment.id, &encode(&comment)).unwrap();
        assert_eq!(back.message_id, comment.message_id);
        assert_eq!(back.author_id, comment.author_id);
        assert_eq!(back.message_author_id, comment.message_author_id);
        assert_eq!(back.body.as_str(), comment.body.as_str());
        assert!(decode(comment.id, "not a comment").is_err());
    }
}
