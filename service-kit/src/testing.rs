//! Helpers for the services' tests (feature `testing`): the kinds of token an
//! authorization matrix calls with, in the order of
//! `test_support::authz::CALLERS`.

use std::time::Duration;

use uuid::Uuid;

use crate::{
    auth::{Caller, Claims, Role, TokenSigner, ISSUER},
    events::{Event, Payload, RevocationReason},
};

/// `None` (no token), an expired admin token of `user`, an admin token of
/// `admin` signed by another key, user-service's service token, then valid
/// tokens of `user`, `moderator` and `admin` with those roles.
///
/// # Panics
/// When signing fails (not expected).
#[must_use]
pub fn matrix_tokens(signer: &TokenSigner, user: Uuid, moderator: Uuid, admin: Uuid) -> Vec<Option<String>> {
    let now = chrono::Utc::now().timestamp();
    let valid = |user_id, role| signer.issue(Caller { user_id, role }, now).expect("a token").0;
    let expired = signer
        .sign(&Claims {
            sub: user.to_string(),
            role: Role::Admin,
            iss: ISSUER.into(),
            iat: now - 7200,
            exp: now - 3600,
            scope: None,
        })
        .expect("a token");
    let forged = TokenSigner::generate(Duration::from_secs(600))
        .expect("a key")
        .issue(
            Caller {
                user_id: admin,
                role: Role::Admin,
            },
            now,
        )
        .expect("a token")
        .0;
    let system = signer.service_token(now, Duration::from_secs(600)).expect("a token");
    vec![
        None,
        Some(expired),
        Some(forged),
        Some(system),
        Some(valid(user, Role::User)),
        Some(valid(moderator, Role::Moderator)),
        Some(valid(admin, Role::Admin)),
    ]
}

/// A harmless event of user-service's (a stranger's tokens revoked), for
/// calls that apply user-service's events.
#[must_use]
pub fn revocation_event() -> Event {
    Event::new(
        "user-service",
        Payload::TokensRevoked {
            user_id: Uuid::new_v4(),
            issued_before: chrono::Utc::now(),
            reason: RevocationReason::SessionEnded,
        },
    )
}
