//! The gRPC edge of comment-service: requests become domain values here,
//! and [`Error`] becomes a [`Status`] in exactly one place.

use std::sync::Arc;

use chirp_proto::comment::v1::{self as pb, comment_service_server::CommentService};
use service_kit::{
    auth::TokenVerifier,
    events::{Batch, Event},
    relay::{ingest_token_matches, INGEST_TOKEN_HEADER},
    validate::{invalid_argument, AllFields as _},
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

#[tonic::async_trait]
impl CommentService for CommentApi {
    async fn add_comment(&self, request: Request<pb::AddCommentRequest>) -> Reply<pb::AddCommentResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let (message, body) = (MessageId::parse("message_id", &r.message_id), Body::parse(&r.body))
            .all()
            .map_err(Error::from)?;
        let comment = self.comments.add(caller, message, body).await?;
        Ok(Response::new(pb::AddCommentResponse {
            comment: Some(comment_to_pb(comment)),
        }))
    }

    async fn list_comments(&self, request: Request<pb::ListCommentsRequest>) -> Reply<pb::ListCommentsResponse> {
        let r = request.get_ref();
        let (message, page) = (
            MessageId::parse("message_id", &r.message_id),
            PageRequest::parse(r.page_size, &r.page_token),
        )
            .all()
            .map_err(Error::from)?;
        let page = self.comments.list(message, page).await?;
        Ok(Response::new(pb::ListCommentsResponse {
            next_page_token: page.next_page_token(),
            total_count: Some(page.total),
            comments: page.comments.into_iter().map(comment_to_pb).collect(),
        }))
    }

    async fn count_comments(&self, request: Request<pb::CountCommentsRequest>) -> Reply<pb::CountCommentsResponse> {
        let ids = MessageIds::parse(&request.get_ref().message_ids).map_err(Error::from)?;
        let counts = self.comments.counts(&ids).await?;
        Ok(Response::new(pb::CountCommentsResponse {
            counts: counts.into_iter().map(|(id, n)| (id.to_string(), n)).collect(),
        }))
    }

    async fn delete_comment(&self, request: Request<pb::DeleteCommentRequest>) -> Reply<pb::DeleteCommentResponse> {
        let caller = self.caller(&request).await?;
        let id = CommentId::parse("comment_id", &request.get_ref().comment_id).map_err(Error::from)?;
        self.comments.delete(caller, id).await?;
        Ok(Response::new(pb::DeleteCommentResponse {}))
    }

    async fn purge_user_comments(
        &self,
        request: Request<pb::PurgeUserCommentsRequest>,
    ) -> Reply<pb::PurgeUserCommentsResponse> {
        let caller = self.caller(&request).await?;
        let user = UserId::parse("user_id", &request.get_ref().user_id).map_err(Error::from)?;
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

/// The one place an [`Error`] becomes a [`Status`]; causes are logged here,
/// never sent.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(violations) => invalid_argument(&violations),
            Error::Unauthenticated(auth) => auth.into(),
            Error::PermissionDenied(why) => Status::permission_denied(why),
            Error::NotFound(what) => Status::not_found(what),
            Error::StoreUnavailable(cause) => {
                if let Some(cause) = cause {
                    tracing::warn!(error = format!("{cause:#}"), "comment store unavailable");
                }
                Status::unavailable("the comment store is unavailable; retry later")
            }
            Error::MessageCheckUnavailable(status) => {
                tracing::warn!(code = ?status.code(), reason = status.message(), "cannot check a message");
                Status::unavailable("cannot check that the message exists; retry later")
            }
            Error::RankUnknown(status) => {
                tracing::warn!(code = ?status.code(), reason = status.message(), "cannot check a user's role");
                Status::unavailable("cannot check the user's role; retry later")
            }
            Error::BadProducerCredential => Status::unauthenticated(err.to_string()),
            Error::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}
