//! The one error type of message-service; it becomes a gRPC status in
//! exactly one place ([`crate::grpc`]).

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
    /// MongoDB cannot be reached; `None` when the store monitor already knows.
    #[error("the message store is unavailable")]
    StoreUnavailable(#[source] Option<anyhow::Error>),
    /// user-service could not say a user's role, so moderation cannot tell
    /// whether the caller outranks them.
    #[error("cannot check the user's role")]
    RankUnknown(tonic::Status),
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
