//! The one error type of user-service. It becomes a gRPC status in exactly one
//! place ([`crate::grpc`]), where internal causes are logged and withheld.

use service_kit::{auth::AuthError, validate::FieldViolation};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    #[error("invalid username or password")]
    BadCredentials,
    /// A call only Chirp's services may make, without their ingest token.
    #[error("a valid x-chirp-ingest-token is required")]
    BadServiceCredential,
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    AlreadyExists(&'static str),
    /// The database cannot be reached; `None` when the store monitor already
    /// knows and the request was refused without trying.
    #[error("the user store is unavailable")]
    StoreUnavailable(#[source] Option<anyhow::Error>),
    /// Every password-hashing slot stayed busy for the whole short wait.
    #[error("too many {what} at once; retry shortly")]
    Overloaded {
        what: &'static str,
        retry_after: std::time::Duration,
    },
    /// A client address or a username used its allowance.
    #[error("too many {what}; retry later")]
    RateLimited {
        what: &'static str,
        retry_after: std::time::Duration,
    },
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
