//! The events Chirp's services produce, as every producer writes them to its
//! outbox and every consumer reads them.
//!
//! Producers store [`Event`]s as JSON in the same atomic write as the change
//! that caused them (a PostgreSQL transaction, a MongoDB transaction, a Redis
//! `MULTI`/Lua script); the relay ([`crate::relay`]) delivers them. On the
//! wire an event is `chirp.events.v1.Event`; [`Event::to_pb`] and
//! [`Event::from_pb`] convert, so no service's domain code sees prost.

use chirp_proto::events::v1 as pb;
use chrono::{DateTime, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::validate::{self, violation, FieldViolation};

/// Most events one delivery carries (a relay's batch).
pub const MAX_BATCH: usize = 200;
/// Room for one encoded event in a request-size limit: a valid event is a
/// few ids, a timestamp and a kind, well under this.
pub const MAX_EVENT_BYTES: usize = 1024;
/// Largest request of an RPC that applies a batch of events.
pub const MAX_BATCH_REQUEST_BYTES: usize = MAX_BATCH * MAX_EVENT_BYTES + 1024;

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Payload {
    UserRegistered {
        user_id: Uuid,
    },
    UserFollowed {
        follower_id: Uuid,
        followee_id: Uuid,
    },
    UserUnfollowed {
        follower_id: Uuid,
        followee_id: Uuid,
    },
    UserBanned {
        user_id: Uuid,
        moderator_id: Uuid,
    },
    UserUnbanned {
        user_id: Uuid,
        moderator_id: Uuid,
    },
    UserDeleted {
        user_id: Uuid,
    },
    /// Every token of `user_id` issued (`iat`) before `issued_before` is void.
    TokensRevoked {
        user_id: Uuid,
        issued_before: DateTime<Utc>,
        reason: RevocationReason,
    },
    MessagePosted {
        message_id: Uuid,
        author_id: Uuid,
    },
    MessageDeleted {
        message_id: Uuid,
        author_id: Uuid,
    },
    MessageHidden {
        message_id: Uuid,
        author_id: Uuid,
        hidden: bool,
    },
    CommentAdded {
        comment_id: Uuid,
        message_id: Uuid,
        author_id: Uuid,
        message_author_id: Uuid,
    },
    CommentDeleted {
        comment_id: Uuid,
        message_id: Uuid,
        author_id: Uuid,
        message_author_id: Uuid,
    },
}

impl Payload {
    /// The event's kind, as in logs and span names (`user_banned`).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UserRegistered { .. } => "user_registered",
            Self::UserFollowed { .. } => "user_followed",
            Self::UserUnfollowed { .. } => "user_unfollowed",
            Self::UserBanned { .. } => "user_banned",
            Self::UserUnbanned { .. } => "user_unbanned",
            Self::UserDeleted { .. } => "user_deleted",
            Self::TokensRevoked { .. } => "tokens_revoked",
            Self::MessagePosted { .. } => "message_posted",
            Self::MessageDeleted { .. } => "message_deleted",
            Self::MessageHidden { .. } => "message_hidden",
            Self::CommentAdded { .. } => "comment_added",
            Self::CommentDeleted { .. } => "comment_deleted",
        }
    }
}

/// Why a user's tokens were revoked; decides how a void token is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    /// PERMISSION_DENIED: the account is banned.
    Banned,
    /// UNAUTHENTICATED: the account is gone.
    Deleted,
    /// UNAUTHENTICATED: log in again (password or role changed, ban lifted).
    SessionEnded,
}

impl RevocationReason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Banned => "banned",
            Self::Deleted => "deleted",
            Self::SessionEnded => "session_ended",
        }
    }

    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "banned" => Some(Self::Banned),
            "deleted" => Some(Self::Deleted),
            "session_ended" => Some(Self::SessionEnded),
            _ => None,
        }
    }
}

/// An event with its identity: consumers apply each `id` once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: Uuid,
    pub producer: String,
    pub occurred_at: DateTime<Utc>,
    pub payload: Payload,
    /// The W3C `traceparent` of the request that wrote the event, when it
    /// was traced: a delivery links to it, however much later it happens.
    /// Absent from events written untraced (and from older outbox rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl Event {
    /// A new event, stamped now (to the millisecond, as stores keep it),
    /// carrying the current trace context when traces are exported.
    #[must_use]
    pub fn new(producer: &str, payload: Payload) -> Self {
        let now = Utc::now().timestamp_millis();
        Self {
            id: Uuid::now_v7(),
            producer: producer.to_owned(),
            occurred_at: Utc.timestamp_millis_opt(now).single().unwrap_or_else(Utc::now),
            payload,
            trace: crate::telemetry::current_traceparent(),
        }
    }

    /// The span a consumer applies this event in while traces are exported:
    /// a child of the delivery that brought it (the current span), linked to
    /// the request that wrote it.
    #[must_use]
    pub fn apply_span(&self) -> tracing::Span {
        if !crate::telemetry::tracing_here() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            target: "chirp::apply",
            "apply",
            otel.name = format!("apply {}", self.payload.kind()),
            otel.kind = "consumer",
            event.id = %self.id,
            event.producer = %self.producer,
        );
        if let Some(trace) = &self.trace {
            crate::telemetry::link(&span, trace);
        }
        span
    }

    /// # Errors
    /// When the event cannot be serialized (not expected).
    pub fn to_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// # Errors
    /// When the text is not an event (a corrupt outbox row).
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        Ok(serde_json::from_str(text)?)
    }

    #[must_use]
    pub fn to_pb(&self) -> pb::Event {
        use pb::event::Payload as P;
        let s = |id: &Uuid| id.to_string();
        let payload = match &self.payload {
            Payload::UserRegistered { user_id } => P::UserRegistered(pb::UserRegistered { user_id: s(user_id) }),
            Payload::UserFollowed {
                follower_id,
                followee_id,
            } => P::UserFollowed(pb::UserFollowed {
                follower_id: s(follower_id),
                followee_id: s(followee_id),
            }),
            Payload::UserUnfollowed {
                follower_id,
                followee_id,
            } => P::UserUnfollowed(pb::UserUnfollowed {
                follower_id: s(follower_id),
                followee_id: s(followee_id),
            }),
            Payload::UserBanned { user_id, moderator_id } => P::UserBanned(pb::UserBanned {
                user_id: s(user_id),
                moderator_id: s(moderator_id),
            }),
            Payload::UserUnbanned { user_id, moderator_id } => P::UserUnbanned(pb::UserUnbanned {
                user_id: s(user_id),
                moderator_id: s(moderator_id),
            }),
            Payload::UserDeleted { user_id } => P::UserDeleted(pb::UserDeleted { user_id: s(user_id) }),
            Payload::TokensRevoked {
                user_id,
                issued_before,
                reason,
            } => P::TokensRevoked(
                crate::revocation::Revocation {
                    user_id: *user_id,
                    issued_before: *issued_before,
                    reason: *reason,
                }
                .to_pb(),
            ),
            Payload::MessagePosted { message_id, author_id } => P::MessagePosted(pb::MessagePosted {
                message_id: s(message_id),
                author_id: s(author_id),
            }),
            Payload::MessageDeleted { message_id, author_id } => P::MessageDeleted(pb::MessageDeleted {
                message_id: s(message_id),
                author_id: s(author_id),
            }),
            Payload::MessageHidden {
                message_id,
                author_id,
                hidden,
            } => P::MessageHidden(pb::MessageHidden {
                message_id: s(message_id),
                author_id: s(author_id),
                hidden: *hidden,
            }),
            Payload::CommentAdded {
                comment_id,
                message_id,
                author_id,
                message_author_id,
            } => P::CommentAdded(pb::CommentAdded {
                comment_id: s(comment_id),
                message_id: s(message_id),
                author_id: s(author_id),
                message_author_id: s(message_author_id),
            }),
            Payload::CommentDeleted {
                comment_id,
                message_id,
                author_id,
                message_author_id,
            } => P::CommentDeleted(pb::CommentDeleted {
                comment_id: s(comment_id),
                message_id: s(message_id),
                author_id: s(author_id),
                message_author_id: s(message_author_id),
            }),
        };
        pb::Event {
            event_id: self.id.to_string(),
            producer: self.producer.clone(),
            occur_time: Some(prost_types::Timestamp {
                seconds: self.occurred_at.timestamp(),
                nanos: i32::try_from(self.occurred_at.timestamp_subsec_nanos()).unwrap_or(0),
            }),
            payload: Some(payload),
            traceparent: self.trace.clone().unwrap_or_default(),
        }
    }

    /// Parses an event from the wire; `field` prefixes violations (e.g.
    /// `events[3]`).
    ///
    /// # Errors
    /// The violations of the event's fields.
    pub fn from_pb(field: &str, event: &pb::Event) -> Result<Self, FieldViolation> {
        use pb::event::Payload as P;
        let id = |name: &str, raw: &str| validate::uuid(&format!("{field}.{name}"), raw);
        let event_id = id("event_id", &event.event_id)?;
        let producer = validate::text(&format!("{field}.producer"), &event.producer, 1, 64)?;
        let occurred_at = event
            .occur_time
            .as_ref()
            .and_then(|t| Utc.timestamp_opt(t.seconds, u32::try_from(t.nanos).ok()?).single())
            .ok_or_else(|| violation(&format!("{field}.occur_time"), "is required"))?;
        let payload = match event.payload.as_ref() {
            None => return Err(violation(&format!("{field}.payload"), "is required")),
            Some(P::UserRegistered(p)) => Payload::UserRegistered {
                user_id: id("user_id", &p.user_id)?,
            },
            Some(P::UserFollowed(p)) => Payload::UserFollowed {
                follower_id: id("follower_id", &p.follower_id)?,
                followee_id: id("followee_id", &p.followee_id)?,
            },
            Some(P::UserUnfollowed(p)) => Payload::UserUnfollowed {
                follower_id: id("follower_id", &p.follower_id)?,
                followee_id: id("followee_id", &p.followee_id)?,
            },
            Some(P::UserBanned(p)) => Payload::UserBanned {
                user_id: id("user_id", &p.user_id)?,
                moderator_id: id("moderator_id", &p.moderator_id)?,
            },
            Some(P::UserUnbanned(p)) => Payload::UserUnbanned {
                user_id: id("user_id", &p.user_id)?,
                moderator_id: id("moderator_id", &p.moderator_id)?,
            },
            Some(P::UserDeleted(p)) => Payload::UserDeleted {
                user_id: id("user_id", &p.user_id)?,
            },
            Some(P::TokensRevoked(p)) => {
                let revocation = crate::revocation::Revocation::from_pb(field, p)?;
                Payload::TokensRevoked {
                    user_id: revocation.user_id,
                    issued_before: revocation.issued_before,
                    reason: revocation.reason,
                }
            }
            Some(P::MessagePosted(p)) => Payload::MessagePosted {
                message_id: id("message_id", &p.message_id)?,
                author_id: id("author_id", &p.author_id)?,
            },
            Some(P::MessageDeleted(p)) => Payload::MessageDeleted {
                message_id: id("message_id", &p.message_id)?,
                author_id: id("author_id", &p.author_id)?,
            },
            Some(P::MessageHidden(p)) => Payload::MessageHidden {
                message_id: id("message_id", &p.message_id)?,
                author_id: id("author_id", &p.author_id)?,
                hidden: p.hidden,
            },
            Some(P::CommentAdded(p)) => Payload::CommentAdded {
                comment_id: id("comment_id", &p.comment_id)?,
                message_id: id("message_id", &p.message_id)?,
                author_id: id("author_id", &p.author_id)?,
                message_author_id: id("message_author_id", &p.message_author_id)?,
            },
            Some(P::CommentDeleted(p)) => Payload::CommentDeleted {
                comment_id: id("comment_id", &p.comment_id)?,
                message_id: id("message_id", &p.message_id)?,
                author_id: id("author_id", &p.author_id)?,
                message_author_id: id("message_author_id", &p.message_author_id)?,
            },
        };
        // A malformed traceparent is dropped rather than refused: it only
        // serves traces, and refusing would dead-letter a good event.
        let trace = Some(event.traceparent.as_str())
            .filter(|t| crate::telemetry::is_traceparent(t))
            .map(str::to_owned);
        Ok(Self {
            id: event_id,
            producer,
            occurred_at,
            payload,
            trace,
        })
    }
}

/// What a consumer did with one delivered event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It changed something.
    Applied,
    /// Nothing to do: seen before, or of a kind the consumer ignores.
    Skipped,
    /// Never applicable as it stands; the producer dead-letters it.
    Rejected(String),
}

impl Outcome {
    /// Reads a consumer's answer. A disposition this version does not know
    /// counts as delivered: only an explicit rejection sets an event aside.
    #[must_use]
    pub fn from_pb(outcome: &pb::EventOutcome) -> Self {
        match pb::EventDisposition::try_from(outcome.disposition) {
            Ok(pb::EventDisposition::Applied) => Self::Applied,
            Ok(pb::EventDisposition::Rejected) => Self::Rejected(outcome.reason.clone()),
            _ => Self::Skipped,
        }
    }

    #[must_use]
    pub fn to_pb(&self, event_id: &str) -> pb::EventOutcome {
        let (disposition, reason) = match self {
            Self::Applied => (pb::EventDisposition::Applied, String::new()),
            Self::Skipped => (pb::EventDisposition::Skipped, String::new()),
            Self::Rejected(reason) => (pb::EventDisposition::Rejected, reason.clone()),
        };
        pb::EventOutcome {
            event_id: event_id.to_owned(),
            disposition: disposition.into(),
            reason,
        }
    }
}

/// A delivered batch, parsed event by event: the batch as a whole is refused
/// only when its size is wrong, and a bad event is rejected on its own so
/// that the events behind it still apply.
#[derive(Debug)]
pub struct Batch {
    /// Each event's id as sent, and the event or why it is rejected.
    entries: Vec<(String, Result<Event, String>)>,
}

impl Batch {
    /// Parses 1 to `max` events (a relay sends at most [`MAX_BATCH`]); an
    /// event that does not parse, or
    /// whose producer is not `producer` (when the credential names one), is
    /// rejected with the reason.
    ///
    /// # Errors
    /// A violation of `events` when the batch is empty or too large.
    pub fn parse(raw: &[pb::Event], max: usize, producer: Option<&str>) -> Result<Self, Vec<FieldViolation>> {
        if raw.is_empty() || raw.len() > max {
            return Err(vec![violation("events", format!("must hold 1 to {max} events"))]);
        }
        let entries = raw
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let field = format!("events[{i}]");
                let parsed = Event::from_pb(&field, e)
                    .map_err(|v| v.to_string())
                    .and_then(|event| match producer {
                        Some(producer) if event.producer != producer => Err(format!(
                            "{field}.producer: must be {producer}, the producer the credential names"
                        )),
                        _ => Ok(event),
                    });
                (e.event_id.clone(), parsed)
            })
            .collect();
        Ok(Self { entries })
    }

    /// The events that parsed, in the order sent.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.entries.iter().filter_map(|(_, parsed)| parsed.as_ref().ok())
    }

    /// The answer for every event sent, in order: `applied[i]` tells whether
    /// the `i`-th event of [`Self::events`] changed something.
    #[must_use]
    pub fn outcomes(&self, applied: &[bool]) -> Vec<pb::EventOutcome> {
        let mut applied = applied.iter();
        self.entries
            .iter()
            .map(|(id, parsed)| {
                let outcome = match parsed {
                    Err(reason) => Outcome::Rejected(reason.clone()),
                    Ok(_) if applied.next().copied().unwrap_or(false) => Outcome::Applied,
                    Ok(_) => Outcome::Skipped,
                };
                outcome.to_pb(id)
            })
            .collect()
    }
}

/// How many of a batch's applied flags are set and unset, as the
/// `applied_count`/`ignored_count` fields of a reply carry them.
#[must_use]
pub fn tally(applied: &[bool]) -> (i64, i64) {
    let set = applied.iter().filter(|a| **a).count();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    (count(set), count(applied.len() - set))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_json_and_the_wire() {
        let ids = || Uuid::new_v4();
        for payload in [
            Payload::UserRegistered { user_id: ids() },
            Payload::UserBanned {
                user_id: ids(),
                moderator_id: ids(),
            },
            Payload::CommentDeleted {
                comment_id: ids(),
                message_id: ids(),
                author_id: ids(),
                message_author_id: ids(),
            },
            Payload::MessageHidden {
                message_id: ids(),
                author_id: ids(),
                hidden: true,
            },
            Payload::TokensRevoked {
                user_id: ids(),
                issued_before: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
                reason: RevocationReason::Banned,
            },
        ] {
            let event = Event::new("test", payload);
            assert_eq!(Event::from_json(&event.to_json().unwrap()).unwrap(), event);
            assert_eq!(Event::from_pb("e", &event.to_pb()).unwrap(), event);
        }
    }

    #[test]
    fn a_full_batch_of_the_largest_events_fits_the_request_limit() {
        use prost::Message as _;
        let ids = || Uuid::new_v4();
        let largest = Event::new(
            "comment-service",
            Payload::CommentDeleted {
                comment_id: ids(),
                message_id: ids(),
                author_id: ids(),
                message_author_id: ids(),
            },
        )
        .to_pb();
        assert!(largest.encoded_len() < MAX_EVENT_BYTES / 4, "{}", largest.encoded_len());
        let batch = chirp_proto::comment::v1::ApplyEventsRequest {
            events: vec![largest; MAX_BATCH],
        };
        assert!(batch.encoded_len() < MAX_BATCH_REQUEST_BYTES);
    }

    #[test]
    fn wire_events_with_bad_fields_name_them() {
        let mut event = Event::new(
            "test",
            Payload::UserDeleted {
                user_id: Uuid::new_v4(),
            },
        )
        .to_pb();
        event.event_id = "nope".into();
        assert_eq!(
            Event::from_pb("events[2]", &event).unwrap_err().field,
            "events[2].event_id"
        );
        let mut event = Event::new(
            "test",
            Payload::UserDeleted {
                user_id: Uuid::new_v4(),
            },
        )
        .to_pb();
        event.payload = None;
        assert_eq!(
            Event::from_pb("events[0]", &event).unwrap_err().field,
            "events[0].payload"
        );
    }

    #[test]
    fn a_bad_event_is_rejected_on_its_own_and_the_others_still_apply() {
        let good = || {
            Event::new(
                "user-service",
                Payload::UserDeleted {
                    user_id: Uuid::new_v4(),
                },
            )
            .to_pb()
        };
        let mut malformed = good();
        malformed.payload = None;
        let mut foreign = good();
        foreign.producer = "message-service".into();
        let raw = [good(), malformed.clone(), foreign, good()];
        let batch = Batch::parse(&raw, MAX_BATCH, Some("user-service")).unwrap();
        assert_eq!(batch.events().count(), 2);
        let outcomes: Vec<Outcome> = batch.outcomes(&[true, false]).iter().map(Outcome::from_pb).collect();
        assert_eq!(outcomes[0], Outcome::Applied);
        assert_eq!(outcomes[1], Outcome::Rejected("events[1].payload: is required".into()));
        assert!(matches!(&outcomes[2], Outcome::Rejected(r) if r.starts_with("events[2].producer")));
        assert_eq!(outcomes[3], Outcome::Skipped);
        assert_eq!(batch.outcomes(&[]).len(), 4, "one answer per event sent");
        assert_eq!(batch.outcomes(&[])[1].event_id, malformed.event_id);
    }

    #[test]
    fn a_batch_of_the_wrong_size_is_refused_whole() {
        assert!(Batch::parse(&[], MAX_BATCH, None).is_err());
        let raw = vec![
            Event::new(
                "x",
                Payload::UserRegistered {
                    user_id: Uuid::new_v4()
                }
            )
            .to_pb();
            MAX_BATCH + 1
        ];
        assert_eq!(Batch::parse(&raw, MAX_BATCH, None).unwrap_err()[0].field, "events");
    }
}
