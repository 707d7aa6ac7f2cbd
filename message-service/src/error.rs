//! The one error type of message-service. Everything that can go wrong here
//! is something every service meets ([`Common`]): message-service has no
//! failure of its own yet, and a new one would be a variant beside `Common`.
//! It becomes a gRPC status in exactly one place ([`crate::grpc`]).

pub use service_kit::error::Common;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] Common),
}

service_kit::service_error!(Error, store = "message store");

pub type Result<T, E = Error> = std::result::Result<T, E>;
