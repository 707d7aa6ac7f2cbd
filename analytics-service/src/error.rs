//! The one error type of analytics-service; it becomes a gRPC status in
//! exactly one place ([`crate::grpc`]).

use service_kit::{auth::AuthError, validate::FieldViolation};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    #[error("a valid x-chirp-ingest-token is required")]
    BadIngestToken,
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// Every reader stayed busy for the whole short wait.
    #[error("too many {0} at once; retry shortly")]
    Overloaded(&'static str),
    /// A read ran out of time and SQLite stopped it.
    #[error("the query ran past its deadline")]
    DeadlineExceeded,
    #[error("the analytics store is unavailable")]
    StoreUnavailable(#[source] Option<anyhow::Error>),
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
