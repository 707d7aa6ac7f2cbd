//! Calls to peers, speaking domain types. Each call goes through the
//! service-kit client stack (deadline, retries for reads, circuit breaker);
//! what a failure means for the reply is decided in [`crate::service`].

mod comments;
mod users;

pub use comments::{CommentClient, CommentEvents};
pub use users::UserClient;
