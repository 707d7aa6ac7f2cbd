//! The one error type of analytics-service: the failures every service
//! shares ([`Common`]) and the one that is analytics-service's own. It becomes
//! a gRPC status in exactly one place ([`crate::grpc`]).

pub use service_kit::error::Common;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] Common),
    /// A read ran out of time and SQLite stopped it.
    #[error("the query ran past its deadline")]
    DeadlineExceeded,
}

service_kit::service_error!(Error, store = "analytics store");

pub type Result<T, E = Error> = std::result::Result<T, E>;
