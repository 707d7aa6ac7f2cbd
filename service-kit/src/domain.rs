//! Values every service's domain shares: the ids that cross service
//! boundaries, the text of a post, and the request for a page of a list.
//!
//! They are defined once here so that a user id parsed by comment-service and
//! one parsed by user-service follow the same rule and the same field names,
//! and a change to the page token format reaches every list at once. Like the
//! rest of a domain they know neither prost nor any store driver.

use chrono::{DateTime, TimeZone as _, Utc};
use uuid::Uuid;

use crate::validate::{self, violation, AllFields as _, FieldViolation};

/// Declares a UUID newtype: parsed from a named request field, shown as the
/// canonical hyphenated form, usable as a page cursor. The `v7` form adds
/// `new()` and `created_at()` for ids that are minted in time order.
#[macro_export]
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(::uuid::Uuid);

        impl $name {
            /// # Errors
            /// A violation of `field` when `raw` is not a canonical UUID.
            pub fn parse(field: &str, raw: &str) -> Result<Self, $crate::validate::FieldViolation> {
                $crate::validate::uuid(field, raw).map(Self)
            }

            #[must_use]
            pub fn as_uuid(self) -> ::uuid::Uuid {
                self.0
            }
        }

        impl From<::uuid::Uuid> for $name {
            fn from(id: ::uuid::Uuid) -> Self {
                Self(id)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl $crate::domain::PageCursor for $name {
            fn to_cursor(&self) -> String {
                self.0.to_string()
            }

            fn from_cursor(text: &str) -> Option<Self> {
                $crate::validate::uuid("page_token", text).ok().map(Self)
            }
        }
    };
    (v7 $(#[$doc:meta])* $name:ident) => {
        $crate::uuid_id!($(#[$doc])* $name);

        impl $name {
            /// A new id, later than every id this process made before.
            #[must_use]
            pub fn new() -> Self {
                Self(::uuid::Uuid::now_v7())
            }

            /// When the id was made (to the millisecond).
            #[must_use]
            pub fn created_at(self) -> ::chrono::DateTime<::chrono::Utc> {
                $crate::domain::v7_time(self.0)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }
    };
}

uuid_id!(
    /// A user's id, as user-service issues them.
    UserId
);
uuid_id!(v7
    /// A message's id, as message-service issues them: a UUIDv7, so ids sort
    /// by creation time and break ties between messages of one millisecond.
    MessageId
);
uuid_id!(v7
    /// A comment's id: a UUIDv7, so ids sort by creation time, which is what
    /// lets comments page in time order with plain lexicographic ranges.
    CommentId
);

/// The time a UUIDv7 was minted; the epoch for any other UUID.
#[doc(hidden)]
#[must_use]
pub fn v7_time(id: Uuid) -> DateTime<Utc> {
    let millis = id
        .get_timestamp()
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            i64::try_from(secs).unwrap_or(0) * 1000 + i64::from(nanos / 1_000_000)
        })
        .unwrap_or(0);
    Utc.timestamp_millis_opt(millis).single().unwrap_or_default()
}

/// The text of a post (a message, a comment): 1 to `MAX` characters after
/// trimming, no control characters but newlines and tabs, in the `body`
/// field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Body<const MAX: usize>(String);

impl<const MAX: usize> Body<MAX> {
    /// Most characters a body may have.
    pub const MAX: usize = MAX;

    /// # Errors
    /// A violation of `body`.
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        validate::text("body", raw, 1, MAX).map(Self)
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

/// 1 to [`Ids::MAX`] distinct ids of one kind, for batch reads, in the order
/// first given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids<T>(Vec<T>);

impl<T: From<Uuid>> Ids<T> {
    /// Most ids one batch may name.
    pub const MAX: usize = 100;

    /// # Errors
    /// Violations of `field[i]` for each bad id, or of `field` when the list
    /// is empty or too long.
    pub fn parse(field: &str, raw: &[String]) -> Result<Self, Vec<FieldViolation>> {
        validate::uuid_list(field, raw, Self::MAX).map(|ids| Self(ids.into_iter().map(T::from).collect()))
    }
}

impl<T> Ids<T> {
    #[must_use]
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }
}

/// Where a list continues: written inside a page token by the service that
/// issued it, read back from the next request.
pub trait PageCursor: Sized {
    fn to_cursor(&self) -> String;

    /// `None` when `text` is not a cursor this type writes.
    fn from_cursor(text: &str) -> Option<Self>;

    /// The opaque page token a client sends to get the page after this one.
    fn to_page_token(&self) -> String {
        validate::encode_page_token(&self.to_cursor())
    }
}

/// Which page of a list: its size (`page_size`, 0 for the default) and the
/// cursor it continues after (`page_token`, empty for the first page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest<C> {
    size: u32,
    after: Option<C>,
}

impl<C: PageCursor> PageRequest<C> {
    /// # Errors
    /// Violations of `page_size` and `page_token`, both at once.
    pub fn parse(page_size: i32, page_token: &str) -> Result<Self, Vec<FieldViolation>> {
        let after = validate::decode_page_token(page_token).and_then(|cursor| {
            cursor
                .map(|text| {
                    C::from_cursor(&text)
                        .ok_or_else(|| violation("page_token", "is not a page token from a previous reply"))
                })
                .transpose()
        });
        let (size, after) = (validate::page_size(page_size), after).all()?;
        Ok(Self { size, after })
    }
}

impl<C> PageRequest<C> {
    /// The first page of `size` items.
    #[must_use]
    pub fn first(size: u32) -> Self {
        Self { size, after: None }
    }

    /// How many items the page holds at most.
    #[must_use]
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The cursor the page continues after; `None` for the first page.
    #[must_use]
    pub fn after(&self) -> Option<&C> {
        self.after.as_ref()
    }
}

/// The page token of the page after the one that ended at `next`: empty when
/// there is none.
#[must_use]
pub fn next_page_token<C: PageCursor>(next: Option<&C>) -> String {
    next.map(PageCursor::to_page_token).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_ids_sort_by_creation_time_and_tell_it() {
        let first = CommentId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = CommentId::new();
        assert!(first.to_string() < second.to_string());
        assert!(first.created_at() <= second.created_at());
        assert!((Utc::now() - second.created_at()).num_seconds().abs() < 5);
    }

    #[test]
    fn ids_are_canonical_uuids_named_by_their_field() {
        assert_eq!(UserId::parse("user_id", "nope").unwrap_err().field, "user_id");
        let id = Uuid::new_v4();
        assert_eq!(MessageId::parse("message_id", &id.to_string()).unwrap().as_uuid(), id);
    }

    #[test]
    fn id_lists_are_bounded_deduplicated_and_report_each_bad_index() {
        let id = Uuid::new_v4().to_string();
        let once = Ids::<UserId>::parse("user_ids", &[id.clone(), id.clone()]).unwrap();
        assert_eq!(once.as_slice().len(), 1);
        assert!(Ids::<UserId>::parse("user_ids", &[]).is_err());
        assert!(Ids::<UserId>::parse("user_ids", &vec![id.clone(); 101]).is_err());
        let errors = Ids::<MessageId>::parse("message_ids", &[id, "x".into(), "y".into()]).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["message_ids[1]", "message_ids[2]"]);
    }

    #[test]
    fn bodies_count_characters_up_to_their_bound() {
        assert!(Body::<280>::parse(&"é".repeat(280)).is_ok());
        assert!(Body::<280>::parse(&"é".repeat(281)).is_err());
        assert!(Body::<500>::parse(&"ü".repeat(500)).is_ok());
        assert!(Body::<500>::parse(&"ü".repeat(501)).is_err());
        assert!(Body::<500>::parse("  ").is_err());
        assert!(Body::<280>::parse("a\u{1b}[31m").is_err());
        assert_eq!(Body::<280>::MAX, 280);
    }

    #[test]
    fn a_page_request_round_trips_its_cursor_and_refuses_foreign_tokens() {
        let id = UserId::from(Uuid::new_v4());
        let page = PageRequest::<UserId>::parse(5, &id.to_page_token()).unwrap();
        assert_eq!((page.size(), page.after()), (5, Some(&id)));
        assert_eq!(PageRequest::<UserId>::parse(0, "").unwrap().size(), 20);
        assert!(PageRequest::<UserId>::parse(0, &validate::encode_page_token("not-a-uuid")).is_err());
        assert_eq!(next_page_token::<UserId>(None), "");
    }

    #[test]
    fn a_bad_size_and_a_bad_token_are_reported_together() {
        let fields: Vec<String> = PageRequest::<UserId>::parse(-1, &validate::encode_page_token("x"))
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["page_size", "page_token"]);
    }
}
