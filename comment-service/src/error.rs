//! The one error type of comment-service: the failures every service shares
//! ([`Common`]) and the one that is comment-service's own. It becomes a gRPC
//! status in exactly one place ([`crate::grpc`]).

pub use service_kit::error::Common;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] Common),
    /// An ApplyEvents caller presented neither credential.
    #[error("events must come with the ingest token or user-service's service token")]
    BadProducerCredential,
}

service_kit::service_error!(Error, store = "comment store");

pub type Result<T, E = Error> = std::result::Result<T, E>;
