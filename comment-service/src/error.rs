//! The one error type of comment-service; it becomes a gRPC status in exactly
//! one place ([`crate::grpc`]).

use service_kit::{auth::AuthError, validate::FieldViolation};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    /// Redis cannot be reached; `None` when the store monitor already knows.
    #[error("the comment store is unavailable")]
    StoreUnavailable(#[source] Option<anyhow::Error>),
    /// message-service could not say whether the message exists.
    #[error("cannot check the message now")]
    MessageCheckUnavailable(tonic::Status),
    /// user-service could not say a user's role, so moderation cannot tell
    /// whether the caller outranks them.
    #[error("cannot check the user's role")]
    RankUnknown(tonic::Status),
    /// An ApplyEvents caller presented neither credential.
    #[error("events must come with the ingest token or user-service's service token")]
    BadProducerCredential,
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<Vec<FieldViolation>> for Error {
    fn from(violations: Vec<FieldViolation>) -> Self {
        Self::InvalidArgument(violations)
    }
}

impl From<FieldViolation> for Error {
    fn from(violation: FieldViolation) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
