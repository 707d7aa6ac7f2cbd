//! What every service's error has in common, and how it becomes a status.
//!
//! Each service keeps one error enum (ARCHITECTURE.md, "One error enum per
//! service"), but most of what can go wrong is the same everywhere: a bad
//! field, a missing token, a store or a peer that cannot answer, a bug. Those
//! live here once, as [`Common`], so a service's enum names only what is its
//! own (a wrong password, a query SQLite stopped) and a change to, say, how
//! internal causes are withheld is made in one place for all four.
//!
//! A service's enum wraps [`Common`] in a `Common` variant and calls
//! [`service_error!`](crate::service_error) once; the constructors it writes
//! (`Error::not_found(..)` and the others) keep call sites as short as when
//! every variant was written out per service.

use std::time::Duration;

use tonic::Status;

use crate::{auth::AuthError, validate::FieldViolation};

/// The failures every service can meet. Shown to clients only through
/// [`Common::into_status`]; causes stay in the logs.
#[derive(Debug, thiserror::Error)]
pub enum Common {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    /// A call only Chirp's own services may make, without their ingest token.
    #[error("a valid x-chirp-ingest-token is required")]
    BadIngestToken,
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    /// The service's own store cannot be reached; no cause when the store
    /// monitor already knew and the request was refused without trying.
    #[error("the {store} is unavailable")]
    StoreUnavailable {
        store: &'static str,
        #[source]
        cause: Option<anyhow::Error>,
    },
    /// A peer could not answer a question the request depends on (does the
    /// message exist, what is this user's role), so the request cannot be
    /// decided either way.
    #[error("cannot check {question}")]
    PeerUnavailable { question: &'static str, status: Status },
    /// Every slot for some bounded work stayed busy for the whole short wait.
    #[error("too many {what} at once; retry shortly")]
    Overloaded { what: &'static str, retry_after: Duration },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl Common {
    /// The status a client sees. Causes are logged here and never sent: a
    /// client learns what to do, not how the service is built.
    #[must_use]
    pub fn into_status(self) -> Status {
        match self {
            Self::InvalidArgument(violations) => crate::validate::invalid_argument(&violations),
            Self::Unauthenticated(auth) => auth.into(),
            Self::BadIngestToken => Status::unauthenticated(self.to_string()),
            Self::PermissionDenied(why) => Status::permission_denied(why),
            Self::NotFound(what) => Status::not_found(what),
            Self::StoreUnavailable { store, cause } => {
                if let Some(cause) = cause {
                    tracing::warn!(error = format!("{cause:#}"), "{store} unavailable");
                }
                Status::unavailable(format!("the {store} is unavailable; retry later"))
            }
            Self::PeerUnavailable { question, status } => {
                tracing::warn!(code = ?status.code(), reason = status.message(), "cannot check {question}");
                Status::unavailable(format!("cannot check {question}; retry later"))
            }
            Self::Overloaded { retry_after, .. } => crate::validate::resource_exhausted(self.to_string(), retry_after),
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}

impl From<Vec<FieldViolation>> for Common {
    fn from(violations: Vec<FieldViolation>) -> Self {
        Self::InvalidArgument(violations)
    }
}

impl From<FieldViolation> for Common {
    fn from(violation: FieldViolation) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

/// A service's error enum: [`Common`] and what is the service's own. Written
/// by [`service_error!`](crate::service_error), not by hand.
pub trait ServiceError: From<Common> + std::fmt::Debug {
    /// The common part, when the error is one.
    fn common(&self) -> Option<&Common>;

    /// The field violations, when the error is INVALID_ARGUMENT.
    fn violations(&self) -> Option<&[FieldViolation]> {
        match self.common() {
            Some(Common::InvalidArgument(violations)) => Some(violations),
            _ => None,
        }
    }
}

/// Makes `$error` (an enum with a `Common(Common)` variant) a
/// [`ServiceError`] whose store clients know as `$store`: `?` turns field
/// violations, token failures and internal causes into it, and it gets one
/// constructor per common failure (`Error::not_found("no user has that id")`),
/// inherent so that call sites need no import.
#[macro_export]
macro_rules! service_error {
    ($error:ident, store = $store:literal) => {
        impl $crate::error::ServiceError for $error {
            #[allow(unreachable_patterns)]
            fn common(&self) -> Option<&$crate::error::Common> {
                match self {
                    Self::Common(common) => Some(common),
                    _ => None,
                }
            }
        }

        #[allow(dead_code)]
        impl $error {
            pub fn not_found(what: &'static str) -> Self {
                Self::Common($crate::error::Common::NotFound(what))
            }

            pub fn permission_denied(why: &'static str) -> Self {
                Self::Common($crate::error::Common::PermissionDenied(why))
            }

            pub fn bad_ingest_token() -> Self {
                Self::Common($crate::error::Common::BadIngestToken)
            }

            /// The store failed with `cause`, or (`None`) is known to be down.
            pub fn store_unavailable(cause: Option<::anyhow::Error>) -> Self {
                Self::Common($crate::error::Common::StoreUnavailable { store: $store, cause })
            }

            /// A peer could not answer `question`, which the request needs.
            pub fn peer_unavailable(question: &'static str, status: ::tonic::Status) -> Self {
                Self::Common($crate::error::Common::PeerUnavailable { question, status })
            }

            pub fn overloaded(what: &'static str, retry_after: ::std::time::Duration) -> Self {
                Self::Common($crate::error::Common::Overloaded { what, retry_after })
            }

            pub fn internal(cause: ::anyhow::Error) -> Self {
                Self::Common($crate::error::Common::Internal(cause))
            }
        }

        impl From<::std::vec::Vec<$crate::validate::FieldViolation>> for $error {
            fn from(violations: ::std::vec::Vec<$crate::validate::FieldViolation>) -> Self {
                Self::Common(violations.into())
            }
        }

        impl From<$crate::validate::FieldViolation> for $error {
            fn from(violation: $crate::validate::FieldViolation) -> Self {
                Self::Common(violation.into())
            }
        }

        impl From<$crate::auth::AuthError> for $error {
            fn from(err: $crate::auth::AuthError) -> Self {
                Self::Common(err.into())
            }
        }

        impl From<::anyhow::Error> for $error {
            fn from(cause: ::anyhow::Error) -> Self {
                Self::Common(cause.into())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::validate::violation;

    #[derive(Debug, thiserror::Error)]
    enum Error {
        #[error(transparent)]
        Common(#[from] Common),
        #[error("the service's own failure")]
        Own,
    }
    crate::service_error!(Error, store = "test store");

    fn status(err: Error) -> Status {
        match err {
            Error::Common(common) => common.into_status(),
            Error::Own => Status::aborted(err.to_string()),
        }
    }

    #[test]
    fn internal_causes_and_peer_replies_are_withheld_from_clients() {
        let internal = status(anyhow::anyhow!("secret connection string").into());
        assert_eq!(
            (internal.code(), internal.message()),
            (Code::Internal, "internal error")
        );

        let store = status(Error::store_unavailable(Some(anyhow::anyhow!("10.0.0.7 refused"))));
        assert_eq!(store.code(), Code::Unavailable);
        assert_eq!(store.message(), "the test store is unavailable; retry later");

        let peer = status(Error::peer_unavailable(
            "the user's role",
            Status::internal("peer detail"),
        ));
        assert_eq!(peer.code(), Code::Unavailable);
        assert_eq!(peer.message(), "cannot check the user's role; retry later");
    }

    #[test]
    fn field_violations_are_invalid_argument_and_stay_readable() {
        let err: Error = violation("body", "must not be empty").into();
        assert_eq!(err.violations().map(<[_]>::len), Some(1));
        assert_eq!(status(err).code(), Code::InvalidArgument);
        assert_eq!(Error::Own.violations(), None);
        assert_eq!(status(Error::Own).code(), Code::Aborted);
    }

    #[test]
    fn overload_says_when_to_come_back() {
        use tonic_types::StatusExt as _;
        let busy = status(Error::overloaded("logins", Duration::from_secs(2)));
        assert_eq!(busy.code(), Code::ResourceExhausted);
        assert_eq!(busy.message(), "too many logins at once; retry shortly");
        let retry = busy.get_details_retry_info().and_then(|r| r.retry_delay);
        assert_eq!(retry, Some(Duration::from_secs(2)));
    }
}
