//! The gRPC edge of comment-service: requests become domain values here,
//! and [`Error`] becomes a [`Status`] in exactly one place.

use std::sync::Arc;

use chirp_proto::comment::v1::{self as pb, comment_service_server::CommentService};
use service_kit::{
    auth::TokenVerifier,
    validate::{invalid_argument, Violations},
};
use tonic::{Request, Response, Status};

use crate::{
    domain::{Body, Caller, Comment, CommentId, MessageId, MessageIds, PageRequest, UserId},
    error::Error,
    service::Comments,
};

pub use pb::comment_service_server::{CommentServiceServer, SERVICE_NAME};

pub struct CommentApi {
    comments: Arc<Comments>,
    verifier: Arc<TokenVerifier>,
}

impl CommentApi {
    #[must_use]
    pub fn new(comments: Arc<Comments>, verifier: Arc<TokenVerifier>) -> Self {
        Self { comments, verifier }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        Ok(self.verifier.authenticate(request.metadata()).await?)
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn missing() -> Error {
    Error::Internal(anyhow::anyhow!("a request passed validation but did not parse"))
}

#[tonic::async_trait]
impl CommentService for CommentApi {
    async fn add_comment(&self, request: Request<pb::AddCommentRequest>) -> Reply<pb::AddCommentResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let mut v = Violations::new();
        let message = v.check(MessageId::parse("message_id", &r.message_id));
        let body = v.check(Body::parse(&r.body));
        v.finish().map_err(Error::from)?;
        let (Some(message), Some(body)) = (message, body) else {
            return Err(missing().into());
        };
        let comment = self.comments.add(caller, message, body).await?;
        Ok(Response::new(pb::AddCommentResponse {
            comment: Some(comment_to_pb(comment)),
        }))
    }

    async fn list_comments(&self, request: Request<pb::ListCommentsRequest>) -> Reply<pb::ListCommentsResponse> {
        let r = request.get_ref();
        let mut v = Violations::new();
        let message = v.check(MessageId::parse("message_id", &r.message_id));
        let page = PageRequest::parse(r.page_size, &r.page_token, &mut v);
        v.finish().map_err(Error::from)?;
        let (Some(message), Some(page)) = (message, page) else {
            return Err(missing().into());
        };
        let page = self.comments.list(message, page).await?;
        Ok(Response::new(pb::ListCommentsResponse {
            next_page_token: page.next_page_token(),
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
            Error::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}
