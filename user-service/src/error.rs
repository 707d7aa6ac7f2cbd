//! The one error type of user-service: the failures every service shares
//! ([`Common`]) and the few that are user-service's own. It becomes a gRPC
//! status in exactly one place ([`crate::grpc`]), where internal causes are
//! logged and withheld.

pub use service_kit::error::Common;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] Common),
    #[error("invalid username or password")]
    BadCredentials,
    #[error("{0}")]
    AlreadyExists(&'static str),
    /// A client address or a username used its allowance.
    #[error("too many {what}; retry later")]
    RateLimited {
        what: &'static str,
        retry_after: std::time::Duration,
    },
}

service_kit::service_error!(Error, store = "user store");

pub type Result<T, E = Error> = std::result::Result<T, E>;
