//! The gRPC edge of comment-service: requests become domain values here,
//! and [`Error`] becomes a [`Status`] in exactly one place.

use std::sync::Arc;

use chirp_proto::comment::v1::{self as pb, comment_service_server::CommentService};
use service_kit::{
    auth::TokenVerifier,
    events::{Batch, Event},
    relay::{ingest_token_matches, INGEST_TOKEN_HEADER},
    validate::{AllFields as _, FieldViolation},
};
use tonic::{metadata::MetadataMap, Request, Response, Status};

use crate::{
    domain::{Body, Caller, Comment, CommentId, MessageId, MessageIds, PageRequest, UserId},
    error::Error,
    service::{Comments, Producer},
};

/// Largest request comment-service accepts: a batch of events
/// (ApplyEvents); CountComments' 100 ids and a comment's 500 characters are
/// far smaller.
pub const MAX_REQUEST_BYTES: usize = service_kit::events::MAX_BATCH_REQUEST_BYTES;

pub use pb::comment_service_server::{CommentServiceServer, SERVICE_NAME};

pub struct CommentApi {
    comments: Arc<Comments>,
    verifier: Arc<TokenVerifier>,
    ingest_token: String,
}

impl CommentApi {
    #[must_use]
    pub fn new(comments: Arc<Comments>, verifier: Arc<TokenVerifier>, ingest_token: String) -> Self {
        Self {
            comments,
            verifier,
            ingest_token,
        }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        Ok(self.verifier.authenticate(request.metadata()).await?)
    }

    /// Which producer sent a batch: the ingest token says message-service,
    /// user-service's service token says user-service; anything else is
    /// refused. A user's token, even an admin's, opens nothing here.
    async fn producer(&self, metadata: &MetadataMap) -> Result<Producer, Error> {
        if let Some(presented) = metadata.get(INGEST_TOKEN_HEADER) {
            return if ingest_token_matches(presented.as_bytes(), &self.ingest_token) {
                Ok(Producer::MessageService)
            } else {
                Err(Error::BadProducerCredential)
            };
        }
        self.verifier.authenticate_service(metadata).await?;
        Ok(Producer::UserService)
    }
}

type Reply<T> = Result<Response<T>, Status>;

// Each request's fields parsed into domain values, or every violation: the
// whole of what a handler takes from the wire before it acts (property
// tested below).

fn parse_add_comment(r: &pb::AddCommentRequest) -> Result<(MessageId, Body), Vec<FieldViolation>> {
    (MessageId::parse("message_id", &r.message_id), Body::parse(&r.body)).all()
}

fn parse_list_comments(r: &pb::ListCommentsRequest) -> Result<(MessageId, PageRequest), Vec<FieldViolation>> {
    (
        MessageId::parse("message_id", &r.message_id),
        PageRequest::parse(r.page_size, &r.page_token),
    )
        .all()
}

fn parse_count_comments(r: &pb::CountCommentsRequest) -> Result<MessageIds, Vec<FieldViolation>> {
    MessageIds::parse("message_ids", &r.message_ids)
}

fn parse_delete_comment(r: &pb::DeleteCommentRequest) -> Result<CommentId, Vec<FieldViolation>> {
    CommentId::parse("comment_id", &r.comment_id).map_err(|v| vec![v])
}

fn parse_purge_user_comments(r: &pb::PurgeUserCommentsRequest) -> Result<UserId, Vec<FieldViolation>> {
    UserId::parse("user_id", &r.user_id).map_err(|v| vec![v])
}

#[tonic::async_trait]
impl CommentService for CommentApi {
    async fn add_comment(&self, request: Request<pb::AddCommentRequest>) -> Reply<pb::AddCommentResponse> {
        let caller = self.caller(&request).await?;
        let (message, body) = parse_add_comment(request.get_ref()).map_err(Error::from)?;
        let comment = self.comments.add(caller, message, body).await?;
        Ok(Response::new(pb::AddCommentResponse {
            comment: Some(comment_to_pb(comment)),
        }))
    }

    async fn list_comments(&self, request: Request<pb::ListCommentsRequest>) -> Reply<pb::ListCommentsResponse> {
        let (message, page) = parse_list_comments(request.get_ref()).map_err(Error::from)?;
        let page = self.comments.list(message, page).await?;
        Ok(Response::new(pb::ListCommentsResponse {
            next_page_token: page.next_page_token(),
            total_count: Some(page.total),
            comments: page.comments.into_iter().map(comment_to_pb).collect(),
        }))
    }

    async fn count_comments(&self, request: Request<pb::CountCommentsRequest>) -> Reply<pb::CountCommentsResponse> {
        let ids = parse_count_comments(request.get_ref()).map_err(Error::from)?;
        let counts = self.comments.counts(&ids).await?;
        Ok(Response::new(pb::CountCommentsResponse {
            counts: counts.into_iter().map(|(id, n)| (id.to_string(), n)).collect(),
        }))
    }

    async fn delete_comment(&self, request: Request<pb::DeleteCommentRequest>) -> Reply<pb::DeleteCommentResponse> {
        let caller = self.caller(&request).await?;
        let id = parse_delete_comment(request.get_ref()).map_err(Error::from)?;
        self.comments.delete(caller, id).await?;
        Ok(Response::new(pb::DeleteCommentResponse {}))
    }

    async fn purge_user_comments(
        &self,
        request: Request<pb::PurgeUserCommentsRequest>,
    ) -> Reply<pb::PurgeUserCommentsResponse> {
        let caller = self.caller(&request).await?;
        let user = parse_purge_user_comments(request.get_ref()).map_err(Error::from)?;
        let deleted = self.comments.purge(caller, user).await?;
        Ok(Response::new(pb::PurgeUserCommentsResponse {
            deleted_count: i64::try_from(deleted).unwrap_or(i64::MAX),
        }))
    }

    async fn apply_events(&self, request: Request<pb::ApplyEventsRequest>) -> Reply<pb::ApplyEventsResponse> {
        let producer = self.producer(request.metadata()).await?;
        let batch = Batch::parse(
            &request.get_ref().events,
            service_kit::events::MAX_BATCH,
            Some(producer_name(producer)),
        )
        .map_err(Error::from)?;
        let events: Vec<Event> = batch.events().cloned().collect();
        let applied = self.comments.apply_events(producer, &events).await?;
        let (applied_count, ignored_count) = service_kit::events::tally(&applied);
        Ok(Response::new(pb::ApplyEventsResponse {
            applied_count,
            ignored_count,
            outcomes: batch.outcomes(&applied),
        }))
    }
}

fn producer_name(producer: Producer) -> &'static str {
    match producer {
        Producer::UserService => "user-service",
        Producer::MessageService => "message-service",
    }
}

fn comment_to_pb(comment: Comment) -> pb::Comment {
    let at = comment.created_at();
    pb::Comment {
        id: comment.id.to_string(),
        message_id: comment.message_id.to_string(),
        author_id: comment.author_id.to_string(),
        body: comment.body.as_str().to_owned(),
        create_time: Some(prost_types::Timestamp {
            seconds: at.timestamp(),
            nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
        }),
    }
}

/// The one place an [`Error`] becomes a [`Status`]: the failures every
/// service shares through [`Common::into_status`](crate::error::Common::into_status),
/// which logs causes and never sends them, and this service's own here.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Common(common) => common.into_status(),
            Error::BadProducerCredential => Status::unauthenticated(err.to_string()),
        }
    }
}

#[cfg(test)]
mod properties {
    use chirp_proto::events::v1 as events;
    use proptest::{collection::vec, prelude::*};
    use service_kit::testing::props::{named, number, text, texts, timestamp, CASES};

    use super::*;

    /// An event as a producer might send it, well formed or not.
    fn event() -> BoxedStrategy<events::Event> {
        use events::event::Payload;
        // Boxed arms: the nested strategy types of a debug build would
        // otherwise overflow a test thread's stack.
        let text = || text().boxed();
        let time = timestamp().boxed();
        let payload = proptest::option::of(prop_oneof![
            text()
                .prop_map(|user_id| Payload::UserRegistered(events::UserRegistered { user_id }))
                .boxed(),
            (text(), text())
                .prop_map(
                    |(follower_id, followee_id)| Payload::UserFollowed(events::UserFollowed {
                        follower_id,
                        followee_id
                    })
                )
                .boxed(),
            (text(), text())
                .prop_map(|(user_id, moderator_id)| Payload::UserBanned(events::UserBanned { user_id, moderator_id }))
                .boxed(),
            text()
                .prop_map(|user_id| Payload::UserDeleted(events::UserDeleted { user_id }))
                .boxed(),
            (text(), time.clone(), number())
                .prop_map(
                    |(user_id, issued_before, reason)| Payload::TokensRevoked(events::TokensRevoked {
                        user_id,
                        issued_before,
                        reason
                    })
                )
                .boxed(),
            (text(), text())
                .prop_map(
                    |(message_id, author_id)| Payload::MessageDeleted(events::MessageDeleted { message_id, author_id })
                )
                .boxed(),
            (text(), text(), text(), text())
                .prop_map(
                    |(comment_id, message_id, author_id, message_author_id)| Payload::CommentAdded(
                        events::CommentAdded {
                            comment_id,
                            message_id,
                            author_id,
                            message_author_id
                        }
                    )
                )
                .boxed(),
        ]);
        let producer = prop_oneof![Just("user-service".to_owned()), text()];
        (text(), producer.boxed(), time, text(), payload.boxed())
            .prop_map(|(event_id, producer, occur_time, traceparent, payload)| events::Event {
                event_id,
                producer,
                occur_time,
                traceparent,
                payload,
            })
            .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn add_comment_requests_parse_or_name_their_bad_fields(message_id in text(), body in text()) {
            if let Err(v) = parse_add_comment(&pb::AddCommentRequest { message_id, body }) {
                named(&v, &["message_id", "body"]);
            }
        }

        #[test]
        fn list_comments_requests_parse_or_name_their_bad_fields(
            message_id in text(), page_size in number(), page_token in text()
        ) {
            if let Err(v) = parse_list_comments(&pb::ListCommentsRequest { message_id, page_size, page_token }) {
                named(&v, &["message_id", "page_size", "page_token"]);
            }
        }

        #[test]
        fn count_comments_requests_parse_or_name_their_bad_fields(message_ids in texts()) {
            if let Err(v) = parse_count_comments(&pb::CountCommentsRequest { message_ids }) {
                named(&v, &["message_ids"]);
            }
        }

        #[test]
        fn delete_comment_requests_parse_or_name_their_bad_fields(comment_id in text()) {
            if let Err(v) = parse_delete_comment(&pb::DeleteCommentRequest { comment_id }) {
                named(&v, &["comment_id"]);
            }
        }

        #[test]
        fn event_batches_parse_whole_or_per_event_or_name_the_batch(
            events in prop_oneof![
                9 => vec(event(), 0..6),
                // Around the bound on a batch's size: blank events, cheap to make.
                1 => (service_kit::events::MAX_BATCH - 2..service_kit::events::MAX_BATCH + 3)
                    .prop_map(|n| vec![events::Event::default(); n]),
            ]
        ) {
            // ApplyEvents (and every other consumer: the same parse): a
            // batch of the wrong size is refused as a whole; otherwise each
            // event parses or gets its own outcome, and nothing panics.
            match Batch::parse(&events, service_kit::events::MAX_BATCH, Some("user-service")) {
                Ok(batch) => {
                    let parsed = batch.events().count();
                    prop_assert!(parsed <= events.len());
                    prop_assert_eq!(batch.outcomes(&vec![false; parsed]).len(), events.len());
                }
                Err(v) => named(&v, &["events"]),
            }
        }

        #[test]
        fn purge_requests_parse_or_name_their_bad_fields(user_id in text()) {
            if let Err(v) = parse_purge_user_comments(&pb::PurgeUserCommentsRequest { user_id }) {
                named(&v, &["user_id"]);
            }
        }
    }
}
