//! analytics-service's domain: the requests it answers, parsed, and the
//! shapes of its answers. Nothing here knows prost or sqlx.

use chrono::{DateTime, Duration, Utc};
use service_kit::validate::{violation, FieldViolation};

pub use service_kit::events::{Event, Payload};

/// A batch for RecordEvents: 1 to 500 events.
pub const MAX_BATCH: usize = 500;

/// A time window `[start, end)`, at most a year long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// # Errors
    /// Violations of `start_time` / `end_time`.
    pub fn parse(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> Result<Self, Vec<FieldViolation>> {
        match (start, end) {
            (Some(start), Some(end)) if start < end && end - start <= Duration::days(366) => Ok(Self { start, end }),
            (Some(start), Some(end)) if start < end => {
                Err(vec![violation("end_time", "the window is at most 366 days")])
            }
            (Some(_), Some(_)) => Err(vec![violation("end_time", "must be after start_time")]),
            (start, end) => {
                let mut violations = Vec::new();
                if start.is_none() {
                    violations.push(violation("start_time", "is required"));
                }
                if end.is_none() {
                    violations.push(violation("end_time", "is required"));
                }
                Err(violations)
            }
        }
    }
}

/// Width of a histogram bucket, in minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    #[must_use]
    pub fn minutes(self) -> i64 {
        match self {
            Self::Minute => 1,
            Self::Hour => 60,
            Self::Day => 1440,
        }
    }
}

/// Most buckets one histogram may have.
pub const MAX_BUCKETS: i64 = 2_000;

/// Counts of one user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserStats {
    pub messages: i64,
    pub comments: i64,
    pub followers: i64,
    pub following: i64,
    pub comments_received: i64,
}

/// Counts of one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageStats {
    pub author_id: Option<String>,
    pub comments: i64,
    pub deleted: bool,
}

/// Activity in one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub messages_posted: i64,
    pub comments_added: i64,
    pub users_registered: i64,
    pub follows: i64,
}
