//! The key layout (schema version 2), for one server and a cluster alike.
//!
//! Every key is `{prefix}{tag}rest`. The tag, between braces, is all that
//! Redis Cluster hashes, so keys that share a tag share a hash slot and can
//! be written by one `MULTI`, pipeline or script:
//!
//! - a message's comments live in one of [`GROUPS`] *groups*, chosen by the
//!   low bits of the message id's last byte (random in a UUIDv7). A group
//!   holds, for its messages, the comments, the comment lists, the hidden
//!   flags, its authors' comment sets and an outbox stream, so adding,
//!   deleting, hiding and purging a batch are each one atomic step in one
//!   slot;
//! - a comment's id carries its group in the same bits, so a comment is
//!   found from its id alone (DeleteComment gives nothing else);
//! - everything that is not per message (the schema version, revocations,
//!   the purge queue) shares the tag `meta`.
//!
//! The sixteen group tags are chosen so that their slots fall one in each
//! sixteenth of the slot space: `redis-cli --cluster create` gives each
//! master an equal contiguous range, so with 2, 4, 8 or 16 masters each
//! holds the same number of groups, and with three (as `chirp up` and the
//! Kubernetes component run) 5, 6 and 5. Sixteen groups is also the most
//! masters the layout can spread over; more would cost the relay one more
//! stream to read per group on every pass.

use crate::domain::{CommentId, MessageId, UserId};

/// The number of groups (a power of two: the group is a bit mask).
pub const GROUPS: usize = 16;

/// Group `k`'s tag; its CRC16 slot lies in `[k, k + 1) × 1024` (checked
/// against a cluster's `CLUSTER KEYSLOT` in the tests).
pub const TAGS: [&str; GROUPS] = [
    "g0.315", "g1.1526", "g2.1189", "g3.1192", "g4.1", "g5.520", "g6.1302", "g7.614", "g8.507", "g9.2686", "g10.85",
    "g11.222", "g12.1466", "g13.556", "g14.417", "g15.951",
];

/// The tag of the keys that are not per message.
pub const META: &str = "meta";

/// A group: one hash slot's share of the messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group(usize);

impl Group {
    pub fn all() -> impl Iterator<Item = Self> {
        (0..GROUPS).map(Self)
    }

    fn of(id: uuid::Uuid) -> Self {
        Self(usize::from(id.as_bytes()[15]) % GROUPS)
    }

    #[must_use]
    pub fn of_message(id: MessageId) -> Self {
        Self::of(id.as_uuid())
    }

    #[must_use]
    pub fn of_comment(id: CommentId) -> Self {
        Self::of(id.as_uuid())
    }

    #[must_use]
    pub fn index(self) -> usize {
        self.0
    }

    #[must_use]
    pub fn tag(self) -> &'static str {
        TAGS[self.0]
    }

    /// The group whose tag is `tag`.
    #[must_use]
    pub fn by_tag(tag: &str) -> Option<Self> {
        TAGS.iter().position(|t| *t == tag).map(Self)
    }
}

/// A new comment id (a UUIDv7) for a comment on `message`: its group is
/// the message's, so the comment is stored beside it.
#[must_use]
pub fn new_comment_id(message: MessageId) -> CommentId {
    let mut bytes = *uuid::Uuid::now_v7().as_bytes();
    let group = Group::of_message(message).0 as u8;
    // The low bits of the last byte (random in a UUIDv7) become the group;
    // the id keeps its time order and 70 random bits.
    bytes[15] = (bytes[15] & !(GROUPS as u8 - 1)) | group;
    CommentId::from(uuid::Uuid::from_bytes(bytes))
}

/// The keys under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, tag: &str, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}{{{tag}}}{rest}", self.prefix)
    }

    /// The comment: one string (see [`super::value`]).
    #[must_use]
    pub fn comment(&self, id: CommentId) -> String {
        self.key(Group::of_comment(id).tag(), format_args!("c:{id}"))
    }

    /// The message's comment ids: a sorted set, every score 0.
    #[must_use]
    pub fn message(&self, id: MessageId) -> String {
        self.key(Group::of_message(id).tag(), format_args!("m:{id}"))
    }

    /// The ids of `user`'s comments in `group`: a set, for purging.
    #[must_use]
    pub fn user(&self, group: Group, user: UserId) -> String {
        self.key(group.tag(), format_args!("u:{user}"))
    }

    /// The group's messages that message-service hides: a set.
    #[must_use]
    pub fn hidden(&self, group: Group) -> String {
        self.key(group.tag(), format_args!("hidden"))
    }

    /// The group's outbox stream.
    #[must_use]
    pub fn outbox(&self, group: Group) -> String {
        self.key(group.tag(), format_args!("outbox"))
    }

    /// The group's dead letters: a stream.
    #[must_use]
    pub fn dead_letters(&self, group: Group) -> String {
        self.key(group.tag(), format_args!("outbox:dead"))
    }

    #[must_use]
    pub fn schema_version(&self) -> String {
        self.key(META, format_args!("schema_version"))
    }

    #[must_use]
    pub fn revocations(&self) -> String {
        self.key(META, format_args!("revocations"))
    }

    #[must_use]
    pub fn purge_users(&self) -> String {
        self.key(META, format_args!("purge:users"))
    }

    #[must_use]
    pub fn purge_messages(&self) -> String {
        self.key(META, format_args!("purge:messages"))
    }

    #[must_use]
    pub fn purge_traces(&self) -> String {
        self.key(META, format_args!("purge:traces"))
    }
}

/// What kind of key `relative` (a key without its prefix) is, by the data
/// model, and its tag; `None` for a key the data model has no place for.
/// The kinds are the names a backup's manifest counts.
#[must_use]
pub fn kind(relative: &str) -> Option<(&'static str, &str)> {
    let (tag, rest) = relative.strip_prefix('{')?.split_once('}')?;
    // Only the hyphenated form the store writes: a key it would never read
    // is no key of the data model.
    let id = |raw: &str| uuid::Uuid::try_parse(raw).is_ok_and(|id| id.hyphenated().to_string() == raw);
    let kind = if tag == META {
        match rest {
            "schema_version" => "schema_version",
            "revocations" => "revocations",
            "purge:users" => "purge:users",
            "purge:messages" => "purge:messages",
            "purge:traces" => "purge:traces",
            _ => return None,
        }
    } else {
        Group::by_tag(tag)?;
        match rest {
            "hidden" => "hidden",
            "outbox" => "outbox",
            "outbox:dead" => "outbox:dead",
            _ => {
                let (kind, raw) = rest.split_once(':')?;
                if !id(raw) {
                    return None;
                }
                match kind {
                    "c" => "comments",
                    "m" => "message_comment_lists",
                    "u" => "user_comment_sets",
                    _ => return None,
                }
            }
        }
    };
    Some((kind, tag))
}

/// The Redis type each kind of key has.
#[must_use]
pub fn type_of(kind: &str) -> &'static str {
    match kind {
        "comments" | "schema_version" => "string",
        "revocations" | "purge:traces" => "hash",
        "message_comment_lists" => "zset",
        "outbox" | "outbox:dead" => "stream",
        _ => "set",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comment_lives_in_its_messages_group_and_keeps_its_time_order() {
        for _ in 0..200 {
            let message = MessageId::new();
            let first = new_comment_id(message);
            let second = new_comment_id(message);
            assert_eq!(Group::of_comment(first), Group::of_message(message));
            assert_eq!(first.as_uuid().get_version_num(), 7);
            assert!(first.as_uuid() < second.as_uuid(), "ids keep their time order");
            let keys = Keys::new("p:");
            let tag = Group::of_message(message).tag();
            assert!(keys.comment(first).starts_with(&format!("p:{{{tag}}}c:")));
            assert!(keys.message(message).starts_with(&format!("p:{{{tag}}}m:")));
        }
    }

    #[test]
    fn only_the_data_models_keys_are_known() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(kind(&format!("{{g4.1}}c:{id}")), Some(("comments", "g4.1")));
        assert_eq!(
            kind(&format!("{{g0.315}}m:{id}")),
            Some(("message_comment_lists", "g0.315"))
        );
        assert_eq!(kind("{meta}outbox"), None);
        assert_eq!(kind("{g4.1}outbox:dead"), Some(("outbox:dead", "g4.1")));
        assert_eq!(kind("{meta}revocations"), Some(("revocations", "meta")));
        for unknown in [
            "{g4.1}c:../x",
            "{g4.1}c:",
            "other",
            "{g99}outbox",
            "{meta}../x",
            "c:1",
            "{g4.1}x:1",
        ] {
            assert_eq!(kind(unknown), None, "{unknown}");
        }
    }
}
