//! user-service's domain: types that can only hold valid values, and the
//! rules of who may do what. Nothing here knows prost or sqlx.

mod user;

pub use service_kit::auth::{Caller, Role};
pub use user::{
    new_user_id, BanReason, DisplayName, NewUser, Page, PageRequest, Password, Registration, User, UserId, UserIds,
    Username,
};
