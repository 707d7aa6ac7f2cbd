//! analytics-service's domain: the requests it answers, parsed, and the
//! shapes of its answers. Nothing here knows prost or sqlx.

use chrono::{DateTime, Duration, Utc};
use service_kit::validate::{violation, FieldViolation};

pub use service_kit::events::{Event, Payload};

/// A batch for RecordEvents: 1 to 500 events.
pub const MAX_BATCH: usize = 500;

/// The ids numbers are asked for. Analytics keeps numbers, not accounts,
/// so any well-formed id has an answer.
pub use service_kit::domain::{MessageId, UserId};

/// How many messages TopMessages ranks: 1 to 100, 10 when not said (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopLimit(u32);

impl TopLimit {
    /// # Errors
    /// A violation of `limit` outside 0 to 100.
    pub fn parse(raw: i32) -> Result<Self, FieldViolation> {
        match u32::try_from(raw) {
            Ok(0) => Ok(Self(10)),
            Ok(n) if n <= 100 => Ok(Self(n)),
            _ => Err(violation("limit", "must be between 0 (default 10) and 100")),
        }
    }

    #[must_use]
    pub fn get(self) -> u32 {
        self.0
    }
}

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

/// A histogram asked for: a window cut into buckets of one granularity, at
/// most [`MAX_BUCKETS`] of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramRequest {
    window: Window,
    granularity: Granularity,
}

impl HistogramRequest {
    /// # Errors
    /// A violation of `granularity` when the window needs too many buckets.
    pub fn parse(window: Window, granularity: Granularity) -> Result<Self, FieldViolation> {
        if (window.end - window.start).num_minutes() / granularity.minutes() > MAX_BUCKETS {
            return Err(violation(
                "granularity",
                format!("the window would need over {MAX_BUCKETS} buckets"),
            ));
        }
        Ok(Self { window, granularity })
    }

    #[must_use]
    pub fn window(self) -> Window {
        self.window
    }

    #[must_use]
    pub fn granularity(self) -> Granularity {
        self.granularity
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_top_limit_defaults_to_ten_and_stays_within_a_hundred() {
        assert_eq!(TopLimit::parse(0).map(TopLimit::get), Ok(10));
        assert_eq!(TopLimit::parse(100).map(TopLimit::get), Ok(100));
        assert_eq!(TopLimit::parse(101).unwrap_err().field, "limit");
        assert_eq!(TopLimit::parse(-1).unwrap_err().field, "limit");
    }

    #[test]
    fn a_histogram_may_not_need_more_than_the_bucket_bound() {
        let start = DateTime::<Utc>::from_timestamp(0, 0).unwrap();
        let day = Window::parse(Some(start), Some(start + Duration::days(1))).unwrap();
        assert!(
            HistogramRequest::parse(day, Granularity::Minute).is_ok(),
            "1,440 buckets"
        );
        let week = Window::parse(Some(start), Some(start + Duration::days(7))).unwrap();
        assert_eq!(
            HistogramRequest::parse(week, Granularity::Minute).unwrap_err().field,
            "granularity",
            "10,080 buckets"
        );
        assert!(HistogramRequest::parse(week, Granularity::Hour).is_ok());
    }
}
