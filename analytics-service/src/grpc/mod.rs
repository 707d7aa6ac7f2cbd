//! The gRPC edge of analytics-service: requests become domain values here,
//! and [`Error`] becomes a [`Status`] in exactly one place.

use std::sync::Arc;

use chirp_proto::analytics::v1::{self as pb, analytics_service_server::AnalyticsService};
use chrono::{DateTime, TimeZone as _, Utc};
use service_kit::{
    auth::{Caller, TokenVerifier},
    events::Batch,
    validate::{violation, AllFields as _, FieldViolation},
};
use tonic::{metadata::MetadataMap, Request, Response, Status};

use crate::{
    domain::{Event, Granularity, HistogramRequest, MessageId, TopLimit, UserId, Window, MAX_BATCH},
    error::Error,
    service::Analytics,
};

/// Largest request analytics-service accepts: a RecordEvents batch of
/// [`MAX_BATCH`] events.
pub const MAX_REQUEST_BYTES: usize = MAX_BATCH * service_kit::events::MAX_EVENT_BYTES + 1024;

pub use pb::analytics_service_server::{AnalyticsServiceServer, SERVICE_NAME};

pub use service_kit::relay::INGEST_TOKEN_HEADER;

pub struct AnalyticsApi {
    analytics: Arc<Analytics>,
    verifier: Arc<TokenVerifier>,
    ingest_token: String,
}

impl AnalyticsApi {
    #[must_use]
    pub fn new(analytics: Arc<Analytics>, verifier: Arc<TokenVerifier>, ingest_token: String) -> Self {
        Self {
            analytics,
            verifier,
            ingest_token,
        }
    }

    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        Ok(self.verifier.authenticate(metadata).await?)
    }

    fn check_ingest_token(&self, metadata: &MetadataMap) -> Result<(), Error> {
        if service_kit::relay::presents_ingest_token(metadata, &self.ingest_token) {
            Ok(())
        } else {
            Err(Error::bad_ingest_token())
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn timestamp(field: &str, raw: Option<&prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>, FieldViolation> {
    raw.map(|t| {
        u32::try_from(t.nanos)
            .ok()
            .and_then(|nanos| Utc.timestamp_opt(t.seconds, nanos).single())
            .ok_or_else(|| violation(field, "is not a valid timestamp"))
    })
    .transpose()
}

fn window(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<Window, Vec<FieldViolation>> {
    let (start, end) = (timestamp("start_time", start), timestamp("end_time", end)).all()?;
    Window::parse(start, end)
}

// Each request's fields parsed into domain values, or every violation
// (property tested below).

fn parse_user_stats(r: &pb::GetUserStatsRequest) -> Result<UserId, Vec<FieldViolation>> {
    UserId::parse("user_id", &r.user_id).map_err(|v| vec![v])
}

fn parse_message_stats(r: &pb::GetMessageStatsRequest) -> Result<MessageId, Vec<FieldViolation>> {
    MessageId::parse("message_id", &r.message_id).map_err(|v| vec![v])
}

fn parse_top_messages(r: &pb::TopMessagesRequest) -> Result<(Window, TopLimit), Vec<FieldViolation>> {
    (
        window(r.start_time.as_ref(), r.end_time.as_ref()),
        TopLimit::parse(r.limit),
    )
        .all()
}

fn parse_histogram(r: &pb::GetActivityHistogramRequest) -> Result<HistogramRequest, Vec<FieldViolation>> {
    let granularity = match pb::Granularity::try_from(r.granularity) {
        Ok(pb::Granularity::Minute) => Ok(Granularity::Minute),
        Ok(pb::Granularity::Hour) => Ok(Granularity::Hour),
        Ok(pb::Granularity::Day) => Ok(Granularity::Day),
        _ => Err(violation("granularity", "must be MINUTE, HOUR or DAY")),
    };
    let (window, granularity) = (window(r.start_time.as_ref(), r.end_time.as_ref()), granularity).all()?;
    HistogramRequest::parse(window, granularity).map_err(|v| vec![v])
}

fn to_pb_time(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl AnalyticsService for AnalyticsApi {
    async fn record_events(&self, request: Request<pb::RecordEventsRequest>) -> Reply<pb::RecordEventsResponse> {
        self.check_ingest_token(request.metadata())?;
        let batch = Batch::parse(&request.get_ref().events, MAX_BATCH, None).map_err(Error::from)?;
        let events: Vec<Event> = batch.events().cloned().collect();
        let stored = self.analytics.record(&events).await?;
        let (accepted_count, duplicate_count) = service_kit::events::tally(&stored);
        Ok(Response::new(pb::RecordEventsResponse {
            accepted_count,
            duplicate_count,
            outcomes: batch.outcomes(&stored),
        }))
    }

    async fn get_user_stats(&self, request: Request<pb::GetUserStatsRequest>) -> Reply<pb::GetUserStatsResponse> {
        let caller = self.caller(request.metadata()).await?;
        let user = parse_user_stats(request.get_ref()).map_err(Error::from)?;
        let stats = self.analytics.user_stats(&caller, user).await?;
        Ok(Response::new(pb::GetUserStatsResponse {
            user_id: user.to_string(),
            message_count: stats.messages,
            comment_count: stats.comments,
            follower_count: stats.followers,
            following_count: stats.following,
            comments_received_count: stats.comments_received,
        }))
    }

    async fn get_message_stats(
        &self,
        request: Request<pb::GetMessageStatsRequest>,
    ) -> Reply<pb::GetMessageStatsResponse> {
        let caller = self.caller(request.metadata()).await?;
        let message = parse_message_stats(request.get_ref()).map_err(Error::from)?;
        let stats = self.analytics.message_stats(&caller, message).await?;
        Ok(Response::new(pb::GetMessageStatsResponse {
            message_id: message.to_string(),
            author_id: stats.author_id.unwrap_or_default(),
            comment_count: stats.comments,
            deleted: stats.deleted,
        }))
    }

    async fn top_messages(&self, request: Request<pb::TopMessagesRequest>) -> Reply<pb::TopMessagesResponse> {
        let caller = self.caller(request.metadata()).await?;
        let (window, limit) = parse_top_messages(request.get_ref()).map_err(Error::from)?;
        let top = self.analytics.top_messages(&caller, window, limit).await?;
        Ok(Response::new(pb::TopMessagesResponse {
            messages: top
                .into_iter()
                .map(|(message_id, comment_count)| pb::MessageRank {
                    message_id,
                    comment_count,
                })
                .collect(),
        }))
    }

    async fn get_activity_histogram(
        &self,
        request: Request<pb::GetActivityHistogramRequest>,
    ) -> Reply<pb::GetActivityHistogramResponse> {
        let caller = self.caller(request.metadata()).await?;
        Analytics::may_read_activity(&caller)?;
        let histogram = parse_histogram(request.get_ref()).map_err(Error::from)?;
        let buckets = self.analytics.activity(&caller, histogram).await?;
        Ok(Response::new(pb::GetActivityHistogramResponse {
            buckets: buckets
                .into_iter()
                .map(|b| pb::ActivityBucket {
                    start_time: Some(to_pb_time(b.start)),
                    messages_posted: b.messages_posted,
                    comments_added: b.comments_added,
                    users_registered: b.users_registered,
                    follows: b.follows,
                })
                .collect(),
        }))
    }
}

/// The one place an [`Error`] becomes a [`Status`]: the failures every
/// service shares through [`Common::into_status`](crate::error::Common::into_status),
/// which logs causes and never sends them, and this service's own here.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Common(common) => common.into_status(),
            Error::DeadlineExceeded => Status::deadline_exceeded(err.to_string()),
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use service_kit::testing::props::{named, number, text, timestamp as time, CASES};

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn user_stats_requests_parse_or_name_their_bad_fields(user_id in text()) {
            if let Err(v) = parse_user_stats(&pb::GetUserStatsRequest { user_id }) {
                named(&v, &["user_id"]);
            }
        }

        #[test]
        fn message_stats_requests_parse_or_name_their_bad_fields(message_id in text()) {
            if let Err(v) = parse_message_stats(&pb::GetMessageStatsRequest { message_id }) {
                named(&v, &["message_id"]);
            }
        }

        #[test]
        fn top_messages_requests_parse_or_name_their_bad_fields(start_time in time(), end_time in time(), limit in number()) {
            if let Err(v) = parse_top_messages(&pb::TopMessagesRequest { start_time, end_time, limit }) {
                named(&v, &["start_time", "end_time", "limit"]);
            }
        }

        #[test]
        fn histogram_requests_parse_or_name_their_bad_fields(start_time in time(), end_time in time(), granularity in number()) {
            if let Err(v) = parse_histogram(&pb::GetActivityHistogramRequest { start_time, end_time, granularity }) {
                named(&v, &["start_time", "end_time", "granularity"]);
            }
        }
    }
}
